"""Nodes that show what the router did: trace, plot, export, and the band energies of any latent.

Node IDs are public: never rename. The figures are drawn by fera_core.plot (matplotlib).
"""
from __future__ import annotations

import json
import os

import torch
from comfy_api.latest import io

import folder_paths

from ..fera_core.atomic import atomic_write_text
from ..fera_core.indicator import DEFINITIONS, REFERENCE, band_energies
from ..fera_core.plot import X_LABELS, plot_band_energies, plot_routing
from ..fera_core.trace import RoutingTrace
from .latents import model_space, video_part
from .model_folder import free_stem
from .routing import routings_of
from .sockets import CATEGORY, FeRATraceType, model_space_input
from .tracing import TRACE_NODE, chart_head


def _image(pixels) -> torch.Tensor:
    """(H, W, 3) uint8 -> ComfyUI IMAGE (1, H, W, 3) float in [0, 1]."""
    return torch.from_numpy(pixels).float().div(255.0)[None]


def chart_data(run_id: str, trace: RoutingTrace) -> dict:
    """What the node's chart draws of a finished run (the web module aggregates the rows itself)."""
    meta = trace.meta
    return {"run": run_id, "node": meta.get("sampler_node"), **chart_head(meta),
            "rows": [{k: r[k] for k in ("step", "sigma", "percent", "cond", "row", "energies", "weights")}
                     for r in trace.rows()]}


class FeRARoutingTrace(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=TRACE_NODE,
            display_name="FeRA Routing Trace",
            category=CATEGORY,
            description="The router's record of the sampling run that produced this latent: per model call the "
                        "step, sigma, cond/uncond, band energies and expert weights (after temperature, mix, gains "
                        "and start/end percent). Its presence in the workflow turns tracing on; a chart inside the "
                        "node follows the run live.",
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The model with FeRA applied that the sampler used (same wire as "
                                                "the sampler's model input)."),
                io.Latent.Input("latent", tooltip="The sampler's output LATENT: the trace is of the run that "
                                                  "produced it, so re-queues and other samplers never mix in."),
                io.Boolean.Input("live", default=True,
                                 tooltip="Draw the routing in this node at every step while sampling runs. This "
                                         "copies each step's few numbers from the device to the host (one small "
                                         "synchronisation per step); off: one copy when the run ends."),
                io.Int.Input("adapter_index", default=0, min=0, max=63, optional=True,
                             tooltip="Which FeRA adapter of the model, when several are chained (0 = first applied)."),
            ],
            outputs=[FeRATraceType.Output(display_name="trace", tooltip="The run's routing trace.")],
        )

    @classmethod
    def execute(cls, model, latent, live: bool, adapter_index: int = 0) -> io.NodeOutput:
        routings = routings_of(model)
        if not routings:
            raise ValueError("This MODEL has no FeRA adapter applied: wire the model that goes into the sampler, "
                             "after Apply FeRA or Load FeRA (model only).")
        if adapter_index >= len(routings):
            raise ValueError(f"adapter_index {adapter_index} is out of range: the model has {len(routings)} "
                             "FeRA adapter(s)")
        samples = latent["samples"]
        run = routings[adapter_index].log.find(samples)
        if run is None:
            raise ValueError(
                "No traced sampling run of this FeRA model produced this latent. Either the sampler's result came "
                "from ComfyUI's cache, made before this trace node was in the workflow (queue again with another "
                "seed), or the latent was changed after sampling (wire the sampler's LATENT output straight here).")
        trace = run.trace.frozen()
        return io.NodeOutput(trace, ui={"fera_trace": [chart_data(run.id, trace)]})


class FeRARoutingPlot(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FeRARoutingPlot",
            display_name="FeRA Routing Plot",
            category=CATEGORY,
            description="Draws a routing trace: router weight of each expert (cond solid, uncond dashed) and the "
                        "stacked band energies of the latent against the sampling step or sigma.",
            inputs=[
                FeRATraceType.Input("trace", tooltip="From FeRA Routing Trace."),
                io.Combo.Input("x_axis", options=list(X_LABELS), default="step",
                               tooltip="Horizontal axis: sampling step, or sigma (noise level, log scale)."),
                io.String.Input("title", default="", optional=True,
                                tooltip="Title of the figure; empty: the adapter's name and settings."),
            ],
            outputs=[io.Image.Output(display_name="image", tooltip="The plot (800 x 600), for Save/Preview Image.")],
        )

    @classmethod
    def execute(cls, trace: RoutingTrace, x_axis: str, title: str = "") -> io.NodeOutput:
        return io.NodeOutput(_image(plot_routing(trace, title, x_axis)))


class SaveFeRATrace(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="SaveFeRATrace",
            display_name="Save FeRA Trace",
            category=CATEGORY,
            description="Writes a routing trace to the output folder as JSON (format fera.routing_trace, version 2, "
                        "with the adapter and settings) and CSV (one line per row of each model call).",
            is_output_node=True,
            inputs=[
                FeRATraceType.Input("trace", tooltip="From FeRA Routing Trace."),
                io.String.Input("filename_prefix", default="fera/trace",
                                tooltip="Path under the output folder; a counter keeps names from colliding."),
            ],
            outputs=[],
        )

    @classmethod
    def execute(cls, trace: RoutingTrace, filename_prefix: str) -> io.NodeOutput:
        output_dir = folder_paths.get_output_directory()
        stem = free_stem(filename_prefix, [(output_dir, ["_.json", "_.csv"])])
        subfolder, name = os.path.split(stem)
        for ext, text in (("_.json", trace.to_json()), ("_.csv", trace.to_csv())):
            atomic_write_text(os.path.join(output_dir, stem + ext), text)
        return io.NodeOutput(ui={"fera_files": [{"filename": name + ext, "subfolder": subfolder, "type": "output"}
                                                for ext in ("_.json", "_.csv")]})


class FeRALatentBandEnergy(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FeRALatentBandEnergy",
            display_name="Latent Band Energy",
            category=CATEGORY,
            description="How the energy of each latent in a batch is spread over frequency bands (FeRA's "
                        "indicator), as numbers and a chart. Needs no adapter: inspect a data set before training "
                        "or compare the spectra of two images.",
            inputs=[
                io.Latent.Input("latent", tooltip="Any LATENT (each batch row is measured on its own)."),
                io.Int.Input("num_bands", default=3, min=1, max=16,
                             tooltip="Number of frequency bands (FeRA adapters use 3)."),
                io.Combo.Input("indicator", options=list(DEFINITIONS), default=REFERENCE,
                               tooltip="reference: the authors' difference-of-Gaussians bands (finest band dropped, "
                                       "what reference adapters were trained with); partition: DCT bands that sum "
                                       "to the latent's energy."),
                model_space_input(),
            ],
            outputs=[
                io.String.Output(display_name="energies", tooltip="JSON: indicator, num_bands and one list of band "
                                                                  "energies (low band first, shares of 1) per row."),
                io.Image.Output(display_name="chart", tooltip="One stacked bar per latent row."),
            ],
        )

    @classmethod
    def execute(cls, latent, num_bands: int, indicator: str, model=None) -> io.NodeOutput:
        samples = video_part(latent["samples"])
        if model is not None:
            samples = model_space(model, samples)
        energies = band_energies(samples, num_bands, indicator).cpu()
        text = json.dumps({"indicator": indicator, "num_bands": num_bands, "rows": energies.tolist()})
        chart = plot_band_energies(energies.numpy(), title=f"band energies ({indicator}, {num_bands} bands)")
        return io.NodeOutput(text, _image(chart))


NODES = [FeRARoutingTrace, FeRARoutingPlot, SaveFeRATrace, FeRALatentBandEnergy]
