"""The FeRA Schedule node: expert weights drawn over the sampling schedule (web/fera_schedule.js draws
the editor). Node IDs and socket types are public: never rename."""
from __future__ import annotations

import json

from comfy_api.latest import io

from ..fera_core.bake.schedule import trace_steps
from ..fera_core.plot import EXPERT_COLORS
from ..fera_core.schedule import ExpertSchedule
from .sockets import CATEGORY, FeRAScheduleType, FeRATraceType

EDITOR = "FERA_SCHEDULE_EDITOR"  # the frontend widget (web/fera_schedule.js) that edits the keyframes
EMPTY = json.dumps(ExpertSchedule(((), (), ())).to_dict(), separators=(",", ":"))


def keyframes_input():
    """A STRING input (to the server, the API and other frontends) that this pack's frontend draws as
    its curve editor (the frontend picks a widget by widgetType before type), in fera_core.plot's expert
    colours (cycled), as the routing chart and the Routing Plot draw the experts."""
    widget = io.String.Input("keyframes", default=EMPTY,
                             tooltip="The keyframes of each expert's curve as JSON, edited in the chart: drag a "
                                     "point, click to add one, right-click to delete it.")
    widget.extra_dict.update(widgetType=EDITOR, expert_colors=list(EXPERT_COLORS))
    return widget


class FeRASchedule(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="FeRASchedule",
            display_name="FeRA Schedule",
            category=CATEGORY,
            description="Draw how strongly each expert acts over the denoising steps (0 = first step, 1 = last), "
                        "for Apply FeRA to mix with the router's own choice. Curves are linear between keyframes; "
                        "an expert without keyframes keeps the router's weight, so an empty schedule is the "
                        "router's own routing.",
            is_output_node=True,
            inputs=[
                keyframes_input(),
                FeRATraceType.Input("trace", optional=True,
                                    tooltip="A traced run: queue once and the preset 'start from what the router "
                                            "did' draws its mean mix at every step."),
            ],
            outputs=[FeRAScheduleType.Output(display_name="schedule",
                                             tooltip="The schedule (plain JSON), for Apply FeRA's schedule input.")],
        )

    @classmethod
    def execute(cls, keyframes: str, trace=None) -> io.NodeOutput:
        schedule = ExpertSchedule.parse(keyframes).to_dict()
        if trace is None:
            return io.NodeOutput(schedule)
        traced = ExpertSchedule.from_steps(trace_steps(trace)).to_dict()
        return io.NodeOutput(schedule, ui={"fera_schedule_trace": [traced]})


NODES = [FeRASchedule]
