"""Nodes that load FeRA adapters and apply them to a MODEL. Node IDs are public: never rename."""
from __future__ import annotations

from comfy_api.latest import io

from ..fera_core.router import RoutingControls
from ..fera_core.schedule import ExpertSchedule
from .model_folder import load_named_adapter
from .routing import apply_fera
from .sockets import (CATEGORY, FeRAAdapterType, adapter_name_input, percent_inputs, schedule_input, strength_input,
                      temperature_input)


class LoadFeRAAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoadFeRAAdapter",
            display_name="Load FeRA Adapter",
            category=CATEGORY,
            description="Reads a FeRA adapter (router + experts): this pack's .safetensors or a file written by "
                        "the authors' reference code (.pt, read without unpickling).",
            inputs=[
                adapter_name_input(),
                io.Float.Input("reference_alpha", default=1.0, min=0.0, max=1024.0, step=0.01, optional=True,
                               tooltip="LoRA alpha for reference .pt files, which do not record it (reference "
                                       "default 1.0). Ignored for .safetensors."),
                io.Float.Input("reference_tau", default=0.7, min=0.01, max=100.0, step=0.01, optional=True,
                               tooltip="Router temperature for reference .pt files (reference default 0.7). "
                                       "Ignored for .safetensors."),
            ],
            outputs=[FeRAAdapterType.Output(display_name="fera_adapter", tooltip="The loaded FeRA adapter.")],
        )

    @classmethod
    def execute(cls, adapter_name: str, reference_alpha: float = 1.0, reference_tau: float = 0.7) -> io.NodeOutput:
        return io.NodeOutput(load_named_adapter(adapter_name, reference_alpha, reference_tau))


class ApplyFeRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ApplyFeRA",
            display_name="Apply FeRA",
            category=CATEGORY,
            description="Adds the adapter's experts to the model. At every model call the router reads the "
                        "band energies of the current latent and mixes the experts per batch row.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model to adapt (left unchanged; a patched copy is returned)."),
                FeRAAdapterType.Input("fera_adapter", tooltip="From Load FeRA Adapter."),
                strength_input(),
                temperature_input("Router softmax temperature; 0 keeps the adapter's own. Lower = one expert dominates."),
                io.Int.Input("force_expert", default=-1, min=-1, max=63, optional=True,
                             tooltip="Use only this expert at every step (-1: let the router decide)."),
                io.String.Input("mix", default="", optional=True,
                                tooltip="Fixed expert weights instead of the router, e.g. '0.5, 0.5, 0'. Empty: router."),
                io.String.Input("gains", default="", optional=True,
                                tooltip="Per-expert multipliers applied after routing, e.g. '1, 1, 1.5'. Empty: all 1."),
                *percent_inputs("Fraction of the sampling schedule at which the experts start acting.",
                                "Fraction of the sampling schedule after which the experts stop acting."),
                schedule_input("Expert weights drawn over the schedule (FeRA Schedule), mixed with the router's "
                               "by blend. Unconnected: the router alone."),
                io.Float.Input("blend", default=1.0, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="With a schedule: 0 = the router's weights, 1 = the schedule's, in between "
                                       "a mix of both at every step. Experts without a curve keep the router's."),
            ],
            outputs=[io.Model.Output(tooltip="The model with FeRA routing.")],
        )

    @classmethod
    def execute(cls, model, fera_adapter, strength: float, temperature: float = 0.0, force_expert: int = -1,
                mix: str = "", gains: str = "", start_percent: float = 0.0, end_percent: float = 1.0,
                schedule: dict | None = None, blend: float = 1.0) -> io.NodeOutput:
        controls = RoutingControls.from_text(fera_adapter.config.num_experts, temperature, force_expert, mix, gains)
        drawn = None if schedule is None else ExpertSchedule.parse(schedule)
        return io.NodeOutput(apply_fera(model, fera_adapter, strength, controls, start_percent, end_percent,
                                        name=fera_adapter.name, schedule=drawn, blend=blend))


class LoadFeRAModelOnly(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoadFeRAModelOnly",
            display_name="Load FeRA (model only)",
            category=CATEGORY,
            description="Load FeRA Adapter and Apply FeRA in one node, with the router's own routing.",
            inputs=[io.Model.Input("model", tooltip="The diffusion model to adapt."), adapter_name_input(), strength_input()],
            outputs=[io.Model.Output(tooltip="The model with FeRA routing.")],
        )

    @classmethod
    def execute(cls, model, adapter_name: str, strength: float) -> io.NodeOutput:
        return io.NodeOutput(apply_fera(model, load_named_adapter(adapter_name), strength, name=adapter_name))


NODES = [LoadFeRAAdapter, ApplyFeRA, LoadFeRAModelOnly]
