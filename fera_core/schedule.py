"""Expert schedules: a drawn weight curve per expert over the sampling schedule, blended with the router.

A schedule holds, per expert, keyframes (percent, weight): percent 0 is the first step and 1 the last
(as start_percent/end_percent), weight is the expert's weight as drawn, not normalised (a sum of 1 is
the router's total). Between keyframes a curve is linear in percent; before its first and after its
last keyframe it holds that keyframe's weight. An expert without keyframes keeps the router's
weight, so the empty schedule is the router's own routing.

Its plain JSON form, {"format": FORMAT, "version": VERSION, "curves": [[[percent, weight], ...] per
expert]}, is what the FeRA Schedule node outputs and workflows store; the widget's JavaScript
(web/fera_schedule_data.js) writes the same form and draws the same interpolation.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import torch

FORMAT, VERSION = "fera.expert_schedule", 1
Curve = tuple[tuple[float, float], ...]


@dataclass(frozen=True)
class ExpertSchedule:
    curves: tuple[Curve, ...]

    # ------------------------------------------------------------------ JSON form
    @classmethod
    def parse(cls, data) -> "ExpertSchedule":
        """A checked schedule from its JSON form (a dict, or its text); refuses anything malformed."""
        if isinstance(data, str):
            try:
                data = json.loads(data)
            except ValueError as err:
                raise ValueError(f"FeRA schedule: not JSON ({err})") from None
        if not isinstance(data, dict) or not isinstance(data.get("curves"), list):
            raise ValueError('a FeRA schedule is {"curves": [[[percent, weight], ...] for each expert]}, '
                             f"got {str(data)[:200]}")
        if data.get("format", FORMAT) != FORMAT:
            raise ValueError(f"not a FeRA expert schedule (format {data['format']!r}, expected {FORMAT!r})")
        if data.get("version", VERSION) != VERSION:
            raise ValueError(f"FeRA schedule version {data['version']!r} is not supported (this reads {VERSION})")
        if not data["curves"]:
            raise ValueError("a FeRA schedule needs one curve per expert, got none")
        return cls(tuple(_curve(m, c) for m, c in enumerate(data["curves"])))

    def to_dict(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "curves": [[list(k) for k in c] for c in self.curves]}

    @classmethod
    def from_steps(cls, steps: list[dict]) -> "ExpertSchedule":
        """One keyframe per step at the step's percent with its strengths ({percent, strengths} dicts, as
        fera_core.bake.schedule.trace_steps gives a traced run's mean mix per step)."""
        percents = [s["percent"] for s in steps]
        if not steps or any(p is None for p in percents):
            raise ValueError("the trace has no schedule percents to place keyframes at")
        return cls.parse({"curves": [[[p, s["strengths"][m]] for p, s in zip(percents, steps)]
                                     for m in range(len(steps[0]["strengths"]))]})

    # ------------------------------------------------------------------ reading
    @property
    def num_experts(self) -> int:
        return len(self.curves)

    @property
    def drawn(self) -> tuple[bool, ...]:
        """Per expert: whether it has keyframes (else it keeps the router's weight)."""
        return tuple(bool(c) for c in self.curves)

    @property
    def empty(self) -> bool:
        return not any(self.drawn)

    def check(self, num_experts: int) -> "ExpertSchedule":
        if self.num_experts != num_experts:
            raise ValueError(f"the schedule has {self.num_experts} expert curves, the adapter {num_experts} experts")
        return self

    def at(self, percent: float) -> list[float | None]:
        """Each expert's weight at `percent` (None: no keyframes, the router's weight)."""
        return [_value(c, percent) if c else None for c in self.curves]

    def table(self) -> tuple[list[float], list[list[float]]]:
        """(knots, values): every keyframe percent of any curve, ascending, and every expert's weight
        there (0 for experts without keyframes). Linear interpolation of this table, held at its ends,
        is the schedule exactly, since each curve is linear between consecutive knots."""
        knots = sorted({p for c in self.curves for p, _ in c})
        return knots, [[_value(c, p) if c else 0.0 for c in self.curves] for p in knots]

    def on(self, device, blend: float) -> "DeviceSchedule":
        """The schedule as tensors on `device` at this blend (made once per run: no host copy per step)."""
        knots, values = self.table()
        as_tensor = lambda v: torch.tensor(v, dtype=torch.float32, device=device)  # noqa: E731
        return DeviceSchedule(as_tensor(knots), as_tensor(values), as_tensor([blend * d for d in self.drawn]))


@dataclass(frozen=True)
class DeviceSchedule:
    """A schedule's table on a device and the blend weight of each expert (blend if drawn, else 0)."""

    knots: torch.Tensor  # (K,)
    values: torch.Tensor  # (K, M)
    blend: torch.Tensor  # (M,)

    def mix(self, router_weights: torch.Tensor, percent: torch.Tensor) -> torch.Tensor:
        """(1 - b) * router + b * schedule per row (R, M), with each row's schedule percent (R,)."""
        scheduled = interp(percent, self.knots, self.values)
        return torch.lerp(router_weights, scheduled.to(router_weights.dtype), self.blend.to(router_weights.dtype))


def interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """numpy.interp on the device: fp (K, ...) at each x (R,), xp ascending, held beyond the ends."""
    if xp.shape[0] == 1:
        return fp[0].expand(x.shape[0], *fp.shape[1:])
    x = x.to(xp.dtype)
    i = torch.searchsorted(xp, x.contiguous()).clamp(1, xp.shape[0] - 1)
    lo, hi = xp[i - 1], xp[i]
    t = ((x - lo) / (hi - lo)).clamp(0.0, 1.0)
    return torch.lerp(fp[i - 1], fp[i], t.reshape(-1, *([1] * (fp.ndim - 1))))


def _curve(m: int, keys) -> Curve:
    if not isinstance(keys, list):
        raise ValueError(f"expert {m}: a curve is a list of [percent, weight] keyframes, got {keys!r}")
    out = []
    for k, key in enumerate(keys):
        if not (isinstance(key, (list, tuple)) and len(key) == 2
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in key)):
            raise ValueError(f"expert {m}, keyframe {k}: expected [percent, weight], got {key!r}")
        percent, weight = float(key[0]), float(key[1])
        if not (math.isfinite(percent) and math.isfinite(weight)):
            raise ValueError(f"expert {m}, keyframe {k}: percent and weight must be finite, got {key!r}")
        if not 0.0 <= percent <= 1.0:
            raise ValueError(f"expert {m}, keyframe {k}: percent {percent} is outside 0..1")
        if weight < 0:
            raise ValueError(f"expert {m}, keyframe {k}: weight {weight} is negative (expert weights are >= 0)")
        out.append((percent, weight))
    percents = [p for p, _ in out]
    if any(b <= a for a, b in zip(percents, percents[1:])):
        raise ValueError(f"expert {m}: keyframe percents must rise strictly, got {percents}")
    return tuple(out)


def _value(curve: Curve, percent: float) -> float:
    """A non-empty curve at `percent`: linear between keyframes, held beyond the first and last."""
    if percent <= curve[0][0]:
        return curve[0][1]
    for (p0, w0), (p1, w1) in zip(curve, curve[1:]):
        if percent <= p1:
            return w0 + (w1 - w0) * (percent - p0) / (p1 - p0)
    return curve[-1][1]
