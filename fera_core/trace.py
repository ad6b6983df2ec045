"""Routing traces: per call of the model, the band energies and expert weights of each row.

Recording keeps references to the detached device tensors the routing made anyway (no kernel,
no host-device sync per call); finish() packs a run into three device tensors, and reading
copies them to the host once. A trace holds at most `max_calls` calls (later calls are
counted, not kept), so its memory is bounded whatever the schedule.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from typing import Callable

import torch

COND, UNCOND = 0, 1
_LABELS = {COND: "cond", UNCOND: "uncond"}
FORMAT, VERSION = "fera.routing_trace", 2
MAX_CALLS = 10_000  # 1000 steps with up to 10 model calls each
_FIELDS = ("call", "step", "row", "cond", "area", "sigma", "percent")


@dataclass
class _Call:
    rows: int
    energies: torch.Tensor | None  # (rows, n); None once packed
    weights: torch.Tensor | None  # (rows, M), after the user's controls and the start/end window
    sigma: torch.Tensor | None  # (rows,) or one value
    cond_or_uncond: tuple[int, ...] | None  # one entry per equal chunk of rows, as ComfyUI batches them
    step: int | None  # sampling step the call belongs to
    areas: tuple[int, ...] | None  # per chunk: which conditioning entry of the run (stable over steps)


class RoutingTrace:
    """Routing records of one sampling run (or of anything that records into it).

    meta: a JSON-able description (adapter, settings, sampler); schedule: the run's sigmas (for
    the step of calls recorded without one); percent_of: sigma -> fraction of the schedule.
    """

    def __init__(self, meta: dict | None = None, schedule=None, percent_of: Callable[[float], float] | None = None,
                 max_calls: int = MAX_CALLS):
        self.meta = dict(meta or {})
        self.schedule, self.percent_of, self.max_calls = schedule, percent_of, max_calls
        self.calls: list[_Call] = []
        self.dropped = 0  # calls beyond max_calls
        self._packed: tuple[torch.Tensor, ...] | None = None
        self._rows: list[dict] | None = None  # host rows, once read or loaded

    # ------------------------------------------------------------------ recording
    def record(self, energies: torch.Tensor, weights: torch.Tensor, sigma: torch.Tensor | float | None = None,
               cond_or_uncond=None, step: int | None = None, areas=None) -> None:
        if self._packed is not None or self._rows is not None:
            raise ValueError("this trace is finished (packed, read or loaded); record into a new RoutingTrace")
        if len(self.calls) >= self.max_calls:
            self.dropped += 1
            return
        if isinstance(sigma, torch.Tensor):
            sigma = sigma.detach()
        elif sigma is not None:
            sigma = torch.tensor(float(sigma))
        self.calls.append(_Call(energies.shape[0], energies.detach(), weights.detach(), sigma,
                                None if cond_or_uncond is None else tuple(cond_or_uncond), step,
                                None if areas is None else tuple(areas)))

    def finish(self) -> None:
        """End of the run: pack the calls into three device tensors (no host copy)."""
        if self._packed is not None or self._rows is not None or not self.calls:
            return
        calls = self.calls
        device = calls[0].energies.device
        sigmas = [torch.full((c.rows,), float("nan"), device=device) if c.sigma is None
                  else c.sigma.reshape(-1).to(device, torch.float32).expand(c.rows) for c in calls]
        self._packed = (torch.cat([c.energies.float() for c in calls]), torch.cat([c.weights.float() for c in calls]),
                        torch.cat(sigmas))
        for c in calls:
            c.energies = c.weights = c.sigma = None

    def clear(self) -> None:
        self.calls.clear()
        self.dropped, self._packed, self._rows = 0, None, None

    # ------------------------------------------------------------------ reading
    def rows(self) -> list[dict]:
        """One dict per (call, row): call, step, row (index in its latent batch), cond ('cond', 'uncond'
        or None), area (conditioning entry), sigma, percent, energies, weights. The first read copies
        the records to the host (the only host copy); later reads reuse it."""
        if self._rows is None:
            if not self.calls:
                return []
            self.finish()
            energies, weights, sigma = (t.cpu().tolist() for t in self._packed)
            starts = _starts(self.calls)
            steps = self._steps([sigma[s] for s in starts])
            percents: dict[float, float | None] = {}

            def percent(s):
                if s not in percents:
                    percents[s] = None if self.percent_of is None else float(self.percent_of(s))
                return percents[s]

            self._rows = [row for index, (call, at, step) in enumerate(zip(self.calls, starts, steps))
                          for row in _call_rows(index, call, step, energies[at:at + call.rows],
                                                weights[at:at + call.rows], sigma[at:at + call.rows], percent)]
            self._packed = None
        return self._rows

    def peek(self, start: int) -> list[dict]:
        """Rows of calls[start:] while recording (no percent): a small host copy per call, for live display."""
        out = []
        for index, call in enumerate(self.calls[start:], start):
            n = call.rows
            sigma = [float("nan")] * n if call.sigma is None else \
                call.sigma.float().reshape(-1).expand(n).tolist() if call.sigma.numel() == 1 else call.sigma.tolist()
            out += _call_rows(index, call, call.step, call.energies.float().tolist(), call.weights.float().tolist(),
                              sigma, lambda s: None)
        return out

    def _steps(self, first_sigmas: list[float]) -> list[int | None]:
        """Each call's step: as recorded, else the schedule interval its sigma falls in."""
        steps = [c.step for c in self.calls]
        if all(s is not None for s in steps) or self.schedule is None:
            return steps
        schedule = [float(s) for s in (self.schedule.tolist() if isinstance(self.schedule, torch.Tensor)
                                       else self.schedule)]
        derived = [None if s != s else max(sum(1 for v in schedule if v >= s * (1 - 1e-5)) - 1, 0)
                   for s in first_sigmas]
        return [s if s is not None else d for s, d in zip(steps, derived)]

    def frozen(self) -> "RoutingTrace":
        """A host-only copy (rows and meta): what nodes pass around and files store."""
        return RoutingTrace.from_rows(self.rows(), self.meta, dropped=self.dropped)

    @classmethod
    def from_rows(cls, rows: list[dict], meta: dict | None = None, dropped: int = 0) -> "RoutingTrace":
        trace = cls(meta)
        trace._rows, trace.dropped = [dict(r) for r in rows], dropped
        return trace

    # ------------------------------------------------------------------ summaries
    def _select(self, cond: str | None):
        if cond not in (None, "cond", "uncond"):
            raise ValueError(f"cond must be None, 'cond' or 'uncond', not {cond!r}")
        return [r for r in self.rows() if cond is None or r["cond"] == cond]

    def step_weights(self, cond: str | None = None) -> list[tuple[int, float | None, list[float]]]:
        """[(step, sigma, mean router weights of the step's rows)] in step order; sigma of the step's first call."""
        by_step: dict = {}
        for r in self._select(cond):
            by_step.setdefault(r["step"], (r["sigma"], []))[1].append(r["weights"])
        return [(step, sigma, _mean(ws)) for step, (sigma, ws) in
                sorted(by_step.items(), key=lambda kv: -1 if kv[0] is None else kv[0])]

    def mean_weights(self, start_percent: float = 0.0, end_percent: float = 1.0, cond: str | None = None) -> list[float]:
        """Mean router weights of the rows whose schedule percent lies in [start, end] (all rows for 0..1)."""
        if not 0.0 <= start_percent <= end_percent <= 1.0:
            raise ValueError(f"need 0 <= start_percent <= end_percent <= 1, got {start_percent}, {end_percent}")
        rows = self._select(cond)
        if (start_percent, end_percent) != (0.0, 1.0):
            if any(r["percent"] is None for r in rows):
                raise ValueError("this trace has no schedule percents; only the full window (0, 1) can be averaged")
            rows = [r for r in rows if start_percent <= r["percent"] <= end_percent]
        if not rows:
            raise ValueError(f"no traced rows in the window {start_percent}..{end_percent} (cond={cond})")
        return _mean([r["weights"] for r in rows])

    # ------------------------------------------------------------------ files
    def to_json(self) -> str:
        rows = self.rows()
        return json.dumps({"format": FORMAT, "version": VERSION, "meta": self.meta, "dropped_calls": self.dropped,
                           "num_bands": len(rows[0]["energies"]) if rows else None,
                           "num_experts": len(rows[0]["weights"]) if rows else None, "rows": rows})

    @classmethod
    def from_json(cls, text: str) -> "RoutingTrace":
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ValueError(f"not a FeRA routing trace (expected format {FORMAT!r})")
        if data.get("version") != VERSION:
            raise ValueError(f"routing trace version {data.get('version')!r} is not supported (this reads {VERSION})")
        rows = data["rows"]
        for r in rows:
            missing = set(_FIELDS + ("energies", "weights")) - set(r)
            if missing:
                raise ValueError(f"routing trace row {r.get('call')} lacks {sorted(missing)}")
        return cls.from_rows(rows, data.get("meta"), data.get("dropped_calls", 0))

    def to_csv(self) -> str:
        """One line per row: call, step, row, cond, area, sigma, percent, energy_0.., weight_0.. (empty = unknown)."""
        rows = self.rows()
        n, m = (len(rows[0]["energies"]), len(rows[0]["weights"])) if rows else (0, 0)
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(_FIELDS + tuple(f"energy_{k}" for k in range(n)) + tuple(f"weight_{k}" for k in range(m)))
        for r in rows:
            writer.writerow(["" if r[f] is None else repr(r[f]) if isinstance(r[f], float) else r[f] for f in _FIELDS]
                            + [repr(v) for v in r["energies"]] + [repr(v) for v in r["weights"]])
        return buf.getvalue()

    @classmethod
    def from_csv(cls, text: str) -> "RoutingTrace":
        reader = csv.reader(io.StringIO(text))
        header = next(reader, None)
        if header is None or tuple(header[:len(_FIELDS)]) != _FIELDS:
            raise ValueError(f"not a FeRA routing trace CSV (header must start with {','.join(_FIELDS)})")
        e_cols = [i for i, h in enumerate(header) if h.startswith("energy_")]
        w_cols = [i for i, h in enumerate(header) if h.startswith("weight_")]
        kinds = (int, int, int, str, int, float, float)
        rows = []
        for line in reader:
            r = {f: (kind(v) if v != "" else None) for f, kind, v in zip(_FIELDS, kinds, line)}
            r["energies"] = [float(line[i]) for i in e_cols]
            r["weights"] = [float(line[i]) for i in w_cols]
            rows.append(r)
        return cls.from_rows(rows)


def _call_rows(index: int, call: _Call, step, energies, weights, sigma, percent) -> list[dict]:
    chunks = call.cond_or_uncond or (None,)
    per_chunk = max(call.rows // len(chunks), 1)
    out = []
    for i in range(call.rows):
        chunk = min(i // per_chunk, len(chunks) - 1)
        s = None if sigma[i] != sigma[i] else sigma[i]  # NaN: recorded without sigma
        out.append({"call": index, "step": step, "row": i % per_chunk, "cond": _LABELS.get(chunks[chunk]),
                    "area": None if call.areas is None else call.areas[chunk], "sigma": s,
                    "percent": None if s is None else percent(s), "energies": energies[i], "weights": weights[i]})
    return out


def _starts(calls: list[_Call]) -> list[int]:
    """Index of each call's first row in the packed tensors."""
    starts, at = [], 0
    for c in calls:
        starts.append(at)
        at += c.rows
    return starts


def _mean(vectors: list[list[float]]) -> list[float]:
    return [sum(col) / len(vectors) for col in zip(*vectors)]
