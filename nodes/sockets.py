"""The pack's socket types, its node category, and the inputs several nodes share (one definition each,
so a tooltip or range is changed once). Node IDs and socket type names are public: never rename."""
from __future__ import annotations

from comfy_api.latest import io

from .model_folder import adapter_names

CATEGORY = "FeRA"
FeRAAdapterType = io.Custom("FERA_ADAPTER")
FeRATraceType = io.Custom("FERA_TRACE")
FeRAScheduleType = io.Custom("FERA_SCHEDULE")  # fera_core.schedule's JSON form, a plain dict
SODAAdapterType = io.Custom("SODA_ADAPTER")


def adapter_name_input():
    return io.Combo.Input("adapter_name", options=adapter_names(),
                          tooltip="Adapter file from models/fera (files in models/loras are listed too).")


def strength_input(tooltip: str = "Multiplier of the experts' update; 0 leaves the model exactly as it was."):
    return io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01, tooltip=tooltip)


def percent_inputs(start: str, end: str) -> list:
    """start_percent and end_percent: a window of the sampling schedule (0 = first step, 1 = last)."""
    return [io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.001, optional=True, tooltip=start),
            io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001, optional=True, tooltip=end)]


def temperature_input(tooltip: str):
    return io.Float.Input("temperature", default=0.0, min=0.0, max=100.0, step=0.01, optional=True, tooltip=tooltip)


def model_space_input():
    return io.Model.Input("model", optional=True,
                          tooltip="The model the adapter runs on: the latent is then read in that model's latent "
                                  "space, as the router reads it (Wan's per-channel normalisation, Flux's shift). "
                                  "Unconnected: the LATENT as stored.")


def schedule_input(tooltip: str):
    """An optional drawn expert schedule (FeRA Schedule's output)."""
    return FeRAScheduleType.Input("schedule", optional=True, tooltip=tooltip)
