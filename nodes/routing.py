"""FeRA at sampling time on a ComfyUI ModelPatcher.

One APPLY_MODEL wrapper routes each model call: it reads the band energies of the latent
rows the network receives (before concat-conditioning channels are appended; e_t is
invariant to the sampler's per-row input scaling), runs the router once, and leaves the
per-row expert gains on FeRARouting.call for the duration of the call. Each adapted
layer gets a forward hook, installed with add_object_patch so that ComfyUI applies and
reverts it with the model's other patches and its weight casting and offloading keep
working. An OUTER_SAMPLE wrapper gives each sampling run its own _Run (the schedule window,
the trace when tracing is on, see tracing.py, the sigma -> percent table of a drawn expert schedule,
and the device copies of router, experts and schedule), so samplers and queue runs never share one.
"""
from __future__ import annotations

import copy
import uuid
from collections import OrderedDict
from dataclasses import dataclass, replace

import torch

import comfy.model_patcher
import comfy.patcher_extension as ext

from ..fera_core.adapter_file import FeRAAdapter
from ..fera_core.experts import add_experts, expert_gains
from ..fera_core.families import display_name
from ..fera_core.indicator import band_energies
from ..fera_core.model import check_fits
from ..fera_core.plot import title_of
from ..fera_core.router import RoutingControls
from ..fera_core.schedule import ExpertSchedule, interp
from ..fera_core.trace import RoutingTrace
from .latents import video_stream
from .module_paths import layer_names, model_family
from .tracing import RUNS_KEY, RunLog, TracedRun, percent_table, requested

WRAPPER_KEY = "fera"
EXPERTS_OFF = "fera_experts_off"  # transformer_options flag: this call runs the frozen model (training's FECL base)


class AdapterMismatchError(ValueError):
    """The adapter's layers do not all exist, with matching shapes, in the model."""


class BatchAxisError(ValueError):
    """An adapted layer's input does not have the model call's latent rows on axis 0."""


def match_layers(model, adapter: FeRAAdapter) -> dict[str, list[tuple[str, tuple[int, int] | None]]]:
    """{ComfyUI module path: [(adapter layer path, output slice), ...]}; refuses any partial fit."""
    names = layer_names(model, adapter.key_namespace)
    targets: dict[str, list] = {}
    unmatched, misfit = [], []
    for path, experts in adapter.layers.items():
        if path not in names:
            unmatched.append(path)
            continue
        comfy_path, out_slice = names[path]
        try:
            check_fits(path, experts, model.get_submodule(comfy_path), out_slice)
        except ValueError as err:
            misfit.append(f"{comfy_path}: {err}")
            continue
        targets.setdefault(comfy_path, []).append((path, out_slice))
    if unmatched or misfit:
        total = len(adapter.layers)
        problems = ([f"{len(unmatched)} have no counterpart (e.g. {unmatched[:3]})"] if unmatched else []) + \
                   ([f"{len(misfit)} have other shapes (e.g. {misfit[:2]})"] if misfit else [])
        raise AdapterMismatchError(
            f"FeRA adapter (trained for {display_name(adapter.config.base_model)}) does not fit this "
            f"{model_family(model).name} model: "
            f"{total - len(unmatched) - len(misfit)} of {total} layers match, {', '.join(problems)}. "
            "Nothing was patched.")
    return targets


class _Run:
    """One sampling run's state: the sigma window of start/end percent, the run's trace if traced, the
    sigma -> percent table when a schedule is drawn, and the router, expert weights and schedule copied
    to the device and dtype the model runs in (made at the run's first call; released with the run's
    model options when it ends)."""

    def __init__(self, window: tuple[float, float] | None, traced: TracedRun | None = None, percents=None):
        self.window, self.traced, self.percents = window, traced, percents
        self.routers: dict = {}  # device -> (float32 router, controls as tensors)
        self.experts: dict = {}  # (device, dtype) -> {adapter layer path: (down, up)}
        self.schedules: dict = {}  # device -> (DeviceSchedule, sigma table, percent table)


@dataclass
class _Call:
    """The model call in progress: its per-row expert gains by dtype, and the expert weights its hooks
    use (the run's device copies; in live mode this call's differentiable casts)."""

    gains: dict
    experts: dict


class FeRARouting:
    """One applied adapter: its settings, its finished traced runs, and the model call in progress.

    Clones of the patched MODEL share this object (ModelPatcher.clone copies the wrapper lists, not the
    wrappers), so nothing of a sampling run lives here: the run's state is a _Run in the run's own
    model options. The one field shared between the APPLY_MODEL wrapper and the layer hooks is `call`,
    set for the duration of a model call.

    trace: a RoutingTrace every run also records into (scripts); tracing: None = trace the runs of
    prompts that contain a trace node, True = every run, False = never.
    schedule, blend: a drawn expert schedule mixed into the router's weights (blend 0: the router
    alone, 1: the schedule alone), before gains and the start/end window.
    live (training): the router and experts are the adapter's own parameters, used with grad, and
    `call` outlives the model call, so that gradient checkpointing's recomputation in backward sees
    the same gains and expert casts as the forward did.
    """

    def __init__(self, adapter: FeRAAdapter, strength: float, controls: RoutingControls, start_percent: float,
                 end_percent: float, trace: RoutingTrace | None, tracing: bool | None, name: str | None, live: bool,
                 schedule: ExpertSchedule | None = None, blend: float = 1.0):
        self.adapter, self.strength, self.controls = adapter, strength, controls.check(adapter.config.num_experts)
        if not 0.0 <= start_percent <= end_percent <= 1.0:
            raise ValueError(f"need 0 <= start_percent <= end_percent <= 1, got {start_percent}, {end_percent}")
        if not 0.0 <= blend <= 1.0:
            raise ValueError(f"blend must lie in 0..1 (0: the router alone, 1: the schedule alone), got {blend}")
        self.schedule = None if schedule is None else schedule.check(adapter.config.num_experts)
        self.blend = blend
        self.scheduled = schedule is not None and not schedule.empty and blend > 0  # else routing is unchanged
        self.start_percent, self.end_percent, self.trace = start_percent, end_percent, trace
        self.tracing, self.name, self.live = tracing, name, live
        self.key = f"fera-{uuid.uuid4().hex}"
        self.log = RunLog()
        self.call: _Call | None = None

    def meta(self) -> dict:
        """What a trace says about the adapter and its settings."""
        cfg, c = self.adapter.config, self.controls
        settings = {"strength": self.strength, "tau": c.tau or cfg.router_tau}
        settings.update({k: [float(v) for v in getattr(c, k)] for k in ("mix", "gains") if getattr(c, k) is not None})
        if (self.start_percent, self.end_percent) != (0.0, 1.0):
            settings["percent"] = [self.start_percent, self.end_percent]
        if self.schedule is not None:
            settings["blend"] = self.blend
        meta = {"adapter": self.name or f"FeRA adapter ({display_name(cfg.base_model) or 'unknown base'})",
                "settings": settings,
                "num_experts": cfg.num_experts, "num_bands": cfg.num_bands, "indicator": cfg.indicator}
        if self.schedule is not None:
            meta["schedule"] = self.schedule.to_dict()
        return dict(meta, title=title_of(meta))

    def _new_run(self, sampling, traced: TracedRun | None = None) -> _Run:
        return _Run(self._window(sampling), traced, percent_table(sampling) if self.scheduled else None)

    def _window(self, sampling) -> tuple[float, float] | None:
        if (self.start_percent, self.end_percent) == (0.0, 1.0):
            return None
        return float(sampling.percent_to_sigma(self.start_percent)), float(sampling.percent_to_sigma(self.end_percent))

    def outer_sample(self, executor, *args, **kwargs):
        """OUTER_SAMPLE wrapper: a fresh _Run in a copy of the run's model options (as EasyCache)."""
        guider = executor.class_obj
        sampling = guider.model_patcher.model.model_sampling
        request = requested(self.tracing)
        traced = None if request is None else TracedRun(self.meta(), request, args[3], sampling)
        if traced is not None:  # count steps through the sampler's progress callback
            if len(args) > 5:
                args = args[:5] + (traced.callback(args[5]),) + args[6:]
            else:
                kwargs["callback"] = traced.callback(kwargs.get("callback"))
        original = guider.model_options
        guider.model_options = comfy.model_patcher.create_model_options_clone(original)
        options = guider.model_options.setdefault("transformer_options", {})
        options[RUNS_KEY] = {**options.get(RUNS_KEY, {}), self.key: self._new_run(sampling, traced)}
        output = None
        try:
            output = executor(*args, **kwargs)
            return output
        finally:
            guider.model_options = original
            if traced is not None:
                traced.end(output)
                if output is not None:
                    self.log.add(traced)

    def _router_on(self, run: _Run, device):
        """Router (float32) and controls on a device: once per run, or the adapter's own in live mode."""
        if self.live:
            return self.adapter.router, self.controls.on(device)
        if device not in run.routers:
            router = copy.deepcopy(self.adapter.router).to(device=device, dtype=torch.float32)
            run.routers[device] = (router, self.controls.on(device))
        return run.routers[device]

    def _schedule_on(self, run: _Run, device):
        """The schedule and the run's sigma -> percent table on a device, once per run."""
        if device not in run.schedules:
            sigmas, percents = (torch.tensor(v, dtype=torch.float32, device=device) for v in run.percents)
            run.schedules[device] = (self.schedule.on(device, self.blend), sigmas, percents)
        return run.schedules[device]

    def _route(self, run: _Run, router, controls: RoutingControls, energies, sigma):
        """The call's expert weights per row: the router's (with the controls), blended with the schedule at
        each row's percent when one is drawn, then the gains."""
        if not self.scheduled:
            return router(energies, controls)
        schedule, sigmas, percents = self._schedule_on(run, energies.device)
        weights = router(energies, replace(controls, gains=None))
        weights = schedule.mix(weights, interp(sigma.reshape(-1).to(energies.device), sigmas, percents))
        return weights if controls.gains is None else weights * controls.gains

    def _experts_on(self, device, dtype):
        """The call's expert weights in the layers' own device and dtype (not the latent's), cast once:
        per run, or in live mode per call (differentiable casts of the trainable weights).

        Stored column-major, so the .t() taken by add_experts hands BLAS contiguous operands.
        """
        cache, key = self.call.experts, (device, dtype)
        if key not in cache:
            if self.live:
                cache[key] = {path: (e.down.to(device, dtype), e.up.to(device, dtype))
                              for path, e in self.adapter.layers.items()}
            else:
                cache[key] = {path: tuple(w.detach().to(device, dtype).t().contiguous().t() if w.ndim == 2
                                          else w.detach().to(device, dtype) for w in (e.down, e.up))
                              for path, e in self.adapter.layers.items()}
        return cache[key]

    def __call__(self, executor, x, t, *args, **kwargs):
        """APPLY_MODEL wrapper: route this call's rows, run the model, forget the routing."""
        options = args[3] if len(args) > 3 else kwargs.get("transformer_options", {})
        if options.get(EXPERTS_OFF):
            self.call = None
            return executor(x, t, *args, **kwargs)
        cfg = self.adapter.config
        run = options.get(RUNS_KEY, {}).get(self.key) or self._new_run(executor.class_obj.model_sampling)
        router, controls = self._router_on(run, x.device)
        energies = band_energies(video_stream(x, kwargs.get("latent_shapes")), cfg.num_bands, cfg.indicator)
        weights = self._route(run, router, controls, energies, t)
        if run.window is not None:
            hi, lo = run.window
            sigma = t.reshape(-1).to(weights.device, torch.float32)
            weights = weights * ((sigma <= hi) & (sigma >= lo)).to(weights.dtype)[:, None]
        if run.traced is not None:
            run.traced.record(energies, weights, t, options)
        if self.trace is not None:
            self.trace.record(energies, weights, t, options.get("cond_or_uncond"))
        gains = expert_gains(weights, cfg.rank, cfg.scale, self.strength)
        self.call = _Call({gains.dtype: gains}, {} if self.live else run.experts)
        try:
            return executor(x, t, *args, **kwargs)
        finally:
            if not self.live:
                self.call = None

    def hook(self, comfy_path: str, entries: list[tuple[str, tuple[int, int] | None]]):
        """Forward hook for one ComfyUI layer carrying the experts of `entries`.

        Rows are routed by their latent, so the layer's input must have the call's latent rows on
        axis 0; a layer that sees any other leading size (tokens flattened into rows, per-token
        timesteps, a (T, H, W, B, D) layout) is refused, never routed by tiling."""
        def fera_forward_hook(layer, args, out):
            call = self.call
            if call is None:
                return None
            x = args[0]
            rows = next(iter(call.gains.values())).shape[0]
            if x.shape[0] != rows:
                raise BatchAxisError(
                    f"FeRA cannot route the layer {comfy_path}: its input has {x.shape[0]} rows on axis 0 where "
                    f"the model call has {rows} latents (the batch is not on its first axis, e.g. flattened "
                    "tokens or per-token timesteps). Use an adapter without this layer (another layer preset).")
            gains = call.gains.get(x.dtype)
            if gains is None:  # cast once per call for all layers, not in every layer
                gains = call.gains[x.dtype] = next(iter(call.gains.values())).to(x.dtype)
            experts = self._experts_on(x.device, x.dtype)
            for path, out_slice in entries:
                down, up = experts[path]
                out = add_experts(out, x, down, up, gains, layer, out_slice)
            return out
        return fera_forward_hook


def apply_fera(patcher, adapter: FeRAAdapter, strength: float, controls: RoutingControls | None = None,
               start_percent: float = 0.0, end_percent: float = 1.0, trace: RoutingTrace | None = None,
               tracing: bool | None = None, name: str | None = None, live: bool = False,
               schedule: ExpertSchedule | None = None, blend: float = 1.0):
    """A clone of `patcher` whose every model call routes the adapter's experts; `patcher` is untouched.

    live: training's mode (see FeRARouting); name: what traces call the adapter (default: its own name);
    schedule, blend: a drawn expert schedule and how much of it replaces the router's weights.
    """
    routing = FeRARouting(adapter, strength, controls or RoutingControls(), start_percent, end_percent, trace,
                          tracing, name or adapter.name, live, schedule, blend)
    targets = match_layers(patcher.model, adapter)
    clone = patcher.clone()
    if strength == 0:
        return clone
    clone.add_wrapper_with_key(ext.WrappersMP.APPLY_MODEL, WRAPPER_KEY, routing)
    clone.add_wrapper_with_key(ext.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, routing.outer_sample)
    for comfy_path, entries in targets.items():
        path = f"{comfy_path}._forward_hooks"
        hooks = OrderedDict(clone.get_model_object(path))
        hooks[routing.key] = routing.hook(comfy_path, entries)
        clone.add_object_patch(path, hooks)
    return clone


def routings_of(patcher) -> list[FeRARouting]:
    """The FeRA adapters applied to a MODEL, in the order they were applied."""
    return [w for w in patcher.get_wrappers(ext.WrappersMP.APPLY_MODEL, WRAPPER_KEY) if isinstance(w, FeRARouting)]
