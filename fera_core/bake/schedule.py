"""Bake a traced FeRA run to a schedule: one LoRA per expert plus per-step strengths.

A mix that changes over the steps is M LoRAs (expert m alone, scale folded in) whose strengths at
step k are the traced run's mean router weights at k (averaged over the step's rows), or a drawn
expert schedule's weights at step k's percent. That is what
ComfyUI's hook keyframes express (one keyframe per step and expert) and what step-scheduled LoRA
tools elsewhere can read from the plain JSON schedule.

Keyframe timing: ComfyUI switches to a keyframe once the step's sigma is at or below
percent_to_sigma(start_percent), and moves at most one keyframe per step while each keyframe
guarantees one step. Keyframe k therefore starts midway (in schedule percent) between steps k-1
and k, which lands it on step k for any monotone percent <-> sigma map; keyframe 0 starts at 0.
"""
from __future__ import annotations

import json

from ..adapter_file import FeRAAdapter
from ..schedule import ExpertSchedule
from .lora import bake_lora

FORMAT, VERSION = "fera.lora_schedule", 1


def expert_loras(adapter: FeRAAdapter, source: dict | None = None) -> list[tuple[dict, dict]]:
    """[(tensors, metadata)] of each expert alone at weight 1 (its strength comes from the schedule)."""
    m_count = adapter.config.num_experts
    return [bake_lora(adapter, [float(i == m) for i in range(m_count)], source={**(source or {}), "expert": m})
            for m in range(m_count)]


def trace_steps(trace, cond: str | None = None) -> list[dict]:
    """[{step, sigma, percent, strengths}] of a RoutingTrace: per step, the mean weights of its rows."""
    percent = {}
    for r in trace.rows():
        percent.setdefault(r["step"], r["percent"])
    steps = [{"step": step, "sigma": sigma, "percent": percent.get(step), "strengths": weights}
             for step, sigma, weights in trace.step_weights(cond)]
    if not steps:
        raise ValueError(f"the trace has no rows (cond={cond}) to bake a schedule from")
    if any(s["step"] is None for s in steps):
        raise ValueError("the trace does not say which step each call belongs to; record it with a schedule")
    return steps


def drawn_steps(schedule: ExpertSchedule, sigmas: list[float], percent_of) -> list[dict]:
    """trace_steps' form for a drawn schedule sampled at `sigmas` (the run's, ending at the final sigma):
    each step's strengths are the curves at its percent, which percent_of(sigma) gives."""
    undrawn = [m for m, drawn in enumerate(schedule.drawn) if not drawn]
    if undrawn:
        raise ValueError(f"expert {undrawn[0]} has no keyframes, so its weight would be the router's, unknown "
                         "without a run: draw a curve for every expert, or bake the trace of a run with the schedule")
    percents = [percent_of(sigma) for sigma in sigmas[:-1]]
    return [{"step": k, "sigma": sigma, "percent": p, "strengths": schedule.at(p)}
            for k, (sigma, p) in enumerate(zip(sigmas, percents))]


def keyframes(steps: list[dict]) -> list[dict]:
    """Hook keyframes [{start_percent, strengths}] that put steps[k]'s strengths on step k."""
    percents = [s["percent"] for s in steps]
    if any(p is None for p in percents):
        raise ValueError("the trace has no schedule percents, so its steps cannot be placed as hook keyframes")
    if any(b <= a for a, b in zip(percents, percents[1:])):
        raise ValueError(f"step percents must rise strictly to become keyframes, got {percents}")
    starts = [0.0] + [(a + b) / 2 for a, b in zip(percents, percents[1:])]
    return [{"start_percent": p, "strengths": s["strengths"]} for p, s in zip(starts, steps)]


def schedule(adapter: FeRAAdapter, steps: list[dict], lora_names: list[str], strength: float = 1.0,
             rows: str = "all") -> dict:
    """The plain JSON schedule: which LoRA file is which expert, and every step's strengths."""
    if len(lora_names) != adapter.config.num_experts:
        raise ValueError(f"need one LoRA name per expert ({adapter.config.num_experts}), got {lora_names}")
    out = {"format": FORMAT, "version": VERSION, "loras": list(lora_names), "strength": float(strength),
           "rows": rows, "steps": steps, "adapter_config": adapter.config.to_dict()}
    try:
        out["keyframes"] = keyframes(steps)
    except ValueError as err:
        out["keyframes"], out["keyframes_unavailable"] = None, str(err)
    return out


def to_json(data: dict) -> str:
    return json.dumps(data, indent=1)
