"""Per-run routing traces of a FeRA model inside ComfyUI, and the live chart's websocket events.

A patched MODEL is shared by every sampler it is wired to and reused by later queue runs, so
nothing of a run may live on it (see comfy_extras/nodes_easycache.py). Each sampling run gets
its own TracedRun, handed to the APPLY_MODEL wrapper through a clone of the run's model options.
When the run ends, the run keeps a fingerprint of its output latent (a few of its values,
gathered on the device) and joins the adapter's short list of finished runs; the trace node
finds the run that produced the LATENT it receives by that fingerprint.

Tracing is on for a run when the prompt being executed contains a FeRA Routing Trace node
(or when forced, for scripts): with it off, a run adds no work per step.
"""
from __future__ import annotations

import sys
import uuid
import weakref
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from ..fera_core.plot import palette
from ..fera_core.trace import RoutingTrace

TRACE_NODE = "FeRARoutingTrace"
EVENT = "fera.trace"
RUNS_KEY = "fera_runs"  # transformer_options: {routing key: TracedRun} of the run in progress
MAX_RUNS = 8  # finished runs kept per applied adapter (two samplers sharing a model, several queue runs)
FINGERPRINT_SIZE = 64


@dataclass
class Request:
    """What the running prompt asks of tracing."""
    live: bool = False
    sid: str | None = None  # websocket client that queued the prompt
    prompt_id: str | None = None
    node: str | None = None  # the sampler node running


def _server():
    """ComfyUI's PromptServer if this process is a ComfyUI server (never imports it)."""
    module = sys.modules.get("server")
    return getattr(getattr(module, "PromptServer", None), "instance", None)


def requested(force: bool | None) -> Request | None:
    """Request for the run starting now: force True/False, or None to follow the running prompt
    (traced when it contains a trace node; live when one of them has live on and a client waits)."""
    if force is False:
        return None
    context = sys.modules.get("comfy_execution.utils")
    ctx = context.get_executing_context() if context is not None else None
    server = _server()
    prompt = None
    if ctx is not None and server is not None:
        running, _ = server.prompt_queue.get_current_queue_volatile()
        prompt = next((item[2] for item in running if len(item) > 2 and item[1] == ctx.prompt_id), None)
    nodes = [n for n in (prompt or {}).values() if isinstance(n, dict) and n.get("class_type") == TRACE_NODE]
    if not nodes and not force:
        return None
    sid = getattr(server, "client_id", None)
    live = sid is not None and any(n.get("inputs", {}).get("live") is True for n in nodes)
    return Request(live, sid, ctx and ctx.prompt_id, ctx and ctx.node_id)


_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def percent_table(model_sampling) -> tuple[np.ndarray, np.ndarray]:
    """(sigmas, percents), sigma ascending: model_sampling.percent_to_sigma tabulated at 1001 percents
    (within 0.001 of the inverse; measured 2e-5 at a karras schedule's sigmas). Made once per
    model_sampling object: ComfyUI's model-sampling nodes patch in a new object rather than change one."""
    if model_sampling not in _TABLES:
        grid = np.concatenate([[1e-6], np.linspace(0.001, 0.999, 999), [1 - 1e-6]])
        sigmas = np.array([float(model_sampling.percent_to_sigma(float(p))) for p in grid])
        _TABLES[model_sampling] = (sigmas[::-1].copy(), grid[::-1].copy())
    return _TABLES[model_sampling]


def percent_function(model_sampling):
    """sigma -> fraction of the schedule, the inverse of model_sampling.percent_to_sigma (percent_table,
    made when first used)."""
    def percent_of(sigma: float) -> float:
        return float(np.interp(sigma, *percent_table(model_sampling)))
    return percent_of


def chart_head(meta: dict) -> dict:
    """What the trace node's chart takes from a run's meta: title, counts, the colours of
    fera_core.plot's palette (the chart has no copy of it) and the drawn expert schedule, if any."""
    experts, bands = meta.get("num_experts") or 0, meta.get("num_bands") or 0
    return {"title": meta.get("title", ""), "experts": experts, "bands": bands, "colors": palette(experts, bands),
            "schedule": meta.get("schedule")}


def fingerprint(latent: torch.Tensor) -> torch.Tensor:
    """FINGERPRINT_SIZE values of a latent at fixed, evenly spread positions (a device gather, no sync).
    Copies between devices and float casts keep them, so the output of a run can be recognised in the
    LATENT a downstream node receives, wherever the sampler moved it."""
    flat = latent.reshape(-1)
    index = torch.linspace(0, flat.numel() - 1, FINGERPRINT_SIZE, device=flat.device).long()
    return flat[index]


class TracedRun:
    """The routing trace of one sampling run and its live events."""

    def __init__(self, meta: dict, request: Request, sigmas: torch.Tensor, model_sampling):
        self.id = uuid.uuid4().hex
        self.request = request
        self.trace = RoutingTrace(meta=dict(meta, sampler_node=request.node, prompt_id=request.prompt_id),
                                  schedule=sigmas, percent_of=percent_function(model_sampling))
        self.step = 0  # steps the sampler has reported done
        self._areas: dict = {}
        self.sent = 0  # calls already sent to the live chart
        self.shape: tuple | None = None
        self.print: torch.Tensor | None = None
        if request.live:  # a drawn schedule comes with each step's percent, where the chart draws it
            head = chart_head(meta)
            percents = None if head["schedule"] is None else [self.trace.percent_of(s) for s in sigmas[:-1].tolist()]
            self._send("start", total=int(sigmas.shape[-1]) - 1, percents=percents, **head)

    def record(self, energies, weights, sigma, options: dict) -> None:
        uuids = options.get("uuids")
        areas = self.areas(uuids) if uuids is not None else None
        self.trace.record(energies, weights, sigma, options.get("cond_or_uncond"), self.step, areas)

    def areas(self, uuids) -> list[int]:
        """Stable index of each conditioning entry of the run, in order of first appearance."""
        return [self._areas.setdefault(u, len(self._areas)) for u in uuids]

    def callback(self, original):
        """Step callback for the sampler: counts steps, sends the step's rows live, calls the original."""
        def fera_step_callback(step, *args):
            self.step = step + 1
            if self.request.live:
                rows = self.trace.peek(self.sent)  # the live chart's host copy: a few numbers per call
                self.sent = len(self.trace.calls)
                self._send("step", step=step, rows=rows)
            if original is not None:
                return original(step, *args)
        return fera_step_callback

    def end(self, output: torch.Tensor | None) -> None:
        self.trace.finish()
        if isinstance(output, torch.Tensor) and not output.is_nested:
            self.shape, self.print = tuple(output.shape), fingerprint(output)
        if self.request.live:
            self._send("end")

    def produced(self, samples: torch.Tensor) -> bool:
        """Whether `samples` (a LATENT's tensor, on any device, in any float dtype) is this run's output."""
        if self.print is None or tuple(samples.shape) != self.shape:
            return False
        return torch.equal(self.print.to(samples.device, samples.dtype), fingerprint(samples))

    def _send(self, kind: str, **data) -> None:
        server = _server()
        if server is not None:
            server.send_sync(EVENT, dict(data, kind=kind, run=self.id, node=self.request.node,
                                         prompt_id=self.request.prompt_id), self.request.sid)


class RunLog:
    """The last MAX_RUNS finished runs of one applied adapter, newest last."""

    def __init__(self):
        self.runs: deque[TracedRun] = deque(maxlen=MAX_RUNS)

    def add(self, run: TracedRun) -> None:
        self.runs.append(run)

    def find(self, samples: torch.Tensor) -> TracedRun | None:
        return next((run for run in reversed(self.runs) if run.produced(samples)), None)
