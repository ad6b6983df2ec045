"""Nodes that bake a FeRA adapter into standard LoRA files for tools without FeRA. Node IDs are public."""
from __future__ import annotations

import json
import os

from comfy_api.latest import io

import folder_paths

from ..fera_core.atomic import atomic_write_text
from ..fera_core.bake.lora import bake_lora, save_lora
from ..fera_core.bake.mix import ROWS, resolve_mix, trace_rows
from ..fera_core.bake.schedule import drawn_steps, expert_loras, to_json, trace_steps
from ..fera_core.bake.schedule import schedule as lora_schedule  # the node's input `schedule` takes the name
from ..fera_core.bake.workflow import hook_workflow
from ..fera_core.router import parse_numbers
from ..fera_core.schedule import ExpertSchedule
from .latents import model_space
from .model_folder import free_stem
from .sockets import (CATEGORY, FeRAAdapterType, FeRATraceType, model_space_input, percent_inputs, schedule_input,
                      strength_input, temperature_input)
from .tracing import percent_function

SOURCES = ("mix", "expert", "router (latent)", "trace window")
_STRENGTH = "Apply FeRA's strength, folded into the LoRA (load it at strength 1 to match)."


def _prefix_input():
    return io.String.Input("filename_prefix", default="fera_baked",
                           tooltip="Name of the file(s) in models/loras; a counter is appended, nothing is overwritten.")


def _rows_input():
    return io.Combo.Input("rows", options=list(ROWS), default="all", optional=True,
                          tooltip="Which traced rows are averaged: all, or only the cond or uncond rows.")


class BakeFeRAToLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BakeFeRAToLoRA",
            display_name="Bake FeRA to LoRA",
            category=CATEGORY,
            description="Writes the adapter at one fixed expert mix as a standard LoRA file into models/loras, "
                        "loadable by any LoRA loader (ComfyUI, diffusers, kohya-style tools). Lost: routing per "
                        "row and per step from the actual latent.",
            is_output_node=True,
            inputs=[
                FeRAAdapterType.Input("fera_adapter", tooltip="The FeRA adapter to bake."),
                io.Combo.Input("mix_source", options=list(SOURCES), default="mix",
                               tooltip="mix: the weights below; expert: one expert alone; router (latent): the "
                                       "router's own mix for the latent input (mean over its rows); trace window: "
                                       "the mean mix of a routing trace between start and end percent."),
                _prefix_input(),
                strength_input(_STRENGTH),
                io.String.Input("mix", default="1, 1, 1", optional=True,
                                tooltip="Expert weights for mix_source 'mix', e.g. '0.2, 0.5, 0.3' (normalised)."),
                io.Int.Input("expert", default=0, min=0, max=63, optional=True,
                             tooltip="The expert for mix_source 'expert'."),
                io.Latent.Input("latent", optional=True,
                                tooltip="Latent whose band energies the router reads, for 'router (latent)'."),
                model_space_input(),
                FeRATraceType.Input("trace", optional=True, tooltip="Routing trace, for 'trace window'."),
                *percent_inputs("Start of the trace window (fraction of the schedule).",
                                "End of the trace window (fraction of the schedule)."),
                _rows_input(),
                temperature_input("Router temperature for 'router (latent)'; 0 = the adapter's own."),
            ],
            outputs=[io.String.Output(display_name="lora_name", tooltip="The written file, as LoRA loaders list it.")],
        )

    @classmethod
    def execute(cls, fera_adapter, mix_source: str, filename_prefix: str, strength: float, mix: str = "1, 1, 1",
                expert: int = 0, latent=None, trace=None, start_percent: float = 0.0, end_percent: float = 1.0,
                rows: str = "all", temperature: float = 0.0, model=None) -> io.NodeOutput:
        def router_latent():
            samples = _connected(latent, "latent", mix_source)["samples"]
            return samples if model is None else model_space(model, samples)
        sources = {"mix": lambda: dict(mix=parse_numbers(mix, "mix")), "expert": lambda: dict(expert=expert),
                   "router (latent)": lambda: dict(latent=router_latent(), temperature=temperature),
                   "trace window": lambda: dict(trace=_connected(trace, "trace", mix_source),
                                                window=(start_percent, end_percent), rows=rows)}
        if mix_source not in sources:
            raise ValueError(f"unknown mix_source {mix_source!r}; expected one of {SOURCES}")
        weights, source = resolve_mix(fera_adapter, **sources[mix_source]())
        tensors, meta = bake_lora(fera_adapter, weights, strength, source)
        folder = folder_paths.get_folder_paths("loras")[0]
        name = free_stem(filename_prefix, [(folder, [".safetensors"])]) + ".safetensors"
        save_lora(tensors, meta, os.path.join(folder, name))
        text = f"{name}: mix {', '.join(f'{w:.4f}' for w in weights)}"
        return io.NodeOutput(name, ui={"text": [text]})


class BakeFeRAToLoRASchedule(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="BakeFeRAToLoRASchedule",
            display_name="Bake FeRA to LoRA Schedule",
            category=CATEGORY,
            description="Writes one LoRA per expert into models/loras and the per-step expert strengths of a traced "
                        "run (mean over the step's rows) or of a drawn schedule as a JSON schedule and as a workflow "
                        "of ComfyUI's built-in hook keyframe nodes (in the output folder). Use the traced run's (or "
                        "the sigmas') sampler, scheduler and steps.",
            is_output_node=True,
            inputs=[
                FeRAAdapterType.Input("fera_adapter", tooltip="The FeRA adapter the trace was recorded with."),
                FeRATraceType.Input("trace", optional=True,
                                    tooltip="Routing trace of a sampling run (FeRA Routing Trace); or give a schedule."),
                _prefix_input(),
                strength_input(_STRENGTH),
                _rows_input(),
                schedule_input("A drawn schedule (FeRA Schedule) instead of a trace; every expert needs a curve. "
                               "Needs model and sigmas."),
                io.Model.Input("model", optional=True,
                               tooltip="With a schedule: the model it will sample, whose sigma <-> percent places "
                                       "the steps."),
                io.Sigmas.Input("sigmas", optional=True,
                                tooltip="With a schedule: the sigmas it will sample (e.g. BasicScheduler with the "
                                        "sampler's scheduler and steps); one keyframe per step."),
            ],
            outputs=[io.String.Output(display_name="lora_names", tooltip="The expert LoRA files, one per line."),
                     io.String.Output(display_name="schedule", tooltip="The schedule as JSON.")],
        )

    @classmethod
    def execute(cls, fera_adapter, trace=None, filename_prefix: str = "fera_baked", strength: float = 1.0,
                rows: str = "all", schedule: dict | None = None, model=None, sigmas=None) -> io.NodeOutput:
        m_count = fera_adapter.config.num_experts
        steps = _steps(trace, rows, schedule, model, sigmas, m_count)
        if len(steps[0]["strengths"]) != m_count:
            raise ValueError(f"the trace has {len(steps[0]['strengths'])} experts, the adapter {m_count}")
        loras, output = folder_paths.get_folder_paths("loras")[0], folder_paths.get_output_directory()
        suffixes = [f"_expert{m}.safetensors" for m in range(m_count)]
        stem = free_stem(filename_prefix, [(loras, suffixes), (output, ["_schedule.json", "_workflow.json"])])
        names = [stem + s for s in suffixes]
        data = lora_schedule(fera_adapter, steps, names, strength, rows)
        for (tensors, meta), name in zip(expert_loras(fera_adapter, {"kind": "schedule"}), names):
            save_lora(tensors, meta, os.path.join(loras, name))
        texts = {"_schedule.json": to_json(data)}
        if data["keyframes"]:
            texts["_workflow.json"] = json.dumps(hook_workflow(data), indent=1)
        for suffix, text in texts.items():
            atomic_write_text(os.path.join(output, stem + suffix), text)
        return io.NodeOutput("\n".join(names), to_json(data), ui={"text": names})


def _steps(trace, rows: str, drawn: dict | None, model, sigmas, num_experts: int) -> list[dict]:
    """Per step: its percent and the experts' strengths, of the trace or of the drawn schedule."""
    if (trace is None) == (drawn is None):
        raise ValueError("Bake FeRA to LoRA Schedule needs a trace, or a schedule with the model and sigmas it will "
                         "sample with (one of the two)")
    if trace is not None:
        return trace_steps(trace, trace_rows(rows))
    if model is None or sigmas is None:
        raise ValueError("a drawn schedule needs the model and sigmas it will sample with to place its steps")
    sampling = model.get_model_object("model_sampling")
    return drawn_steps(ExpertSchedule.parse(drawn).check(num_experts), sigmas.tolist(), percent_function(sampling))


def _connected(value, name: str, source: str):
    if value is None:
        raise ValueError(f"mix_source {source!r} needs the {name} input connected")
    return value


NODES = [BakeFeRAToLoRA, BakeFeRAToLoRASchedule]
