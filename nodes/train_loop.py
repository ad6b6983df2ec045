"""Train a FeRA adapter on a ComfyUI MODEL: the loop, run as a sampler under ComfyUI's guider.

The loop runs inside `Guider_Basic.sample`, like ComfyUI's own trainer, so the model is loaded,
patched and given its conditioning exactly as for sampling. The adapter is attached with
Apply FeRA's own wrapper and hooks (nodes/routing.py) in live mode: what is trained is what
runs at sampling time. Each step is fera_core.training.training_step (MSE + FECL in the
model's prediction space, the frozen model being the same network with the experts off).

Nothing is copied but the adapter: frozen weights are never duplicated, and never get a
gradient. Weights ComfyUI loaded under inference mode cannot be saved for backward, so for the
session they are swapped for aliases of the same storage and swapped back in `finally`.
"""
from __future__ import annotations

import copy
import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
from torch import nn

import comfy.model_management
import comfy.samplers
import comfy.utils
from comfy_extras.nodes_custom_sampler import Guider_Basic

from ..fera_core.adapter_file import FeRAAdapter
from ..fera_core.training import training_step
from .latents import with_frames
from .objective import ComfyObjective
from .routing import apply_fera

RETENTION_WEIGHT = 0.1  # Diff-Tuning's weight of the memory-bank rows (fera-reference.md section 6)


@dataclass
class TrainSettings:
    steps: int = 100
    learning_rate: float = 1e-4
    batch_size: int = 1
    grad_accumulation: int = 1
    seed: int = 0
    dtype: torch.dtype | None = None  # the model's compute dtype (and autocast's); None: float32
    gradient_checkpointing: bool = False
    diff_tuning: bool = False

    def check(self) -> "TrainSettings":
        for name in ("steps", "batch_size", "grad_accumulation"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning rate must be a positive number, got {self.learning_rate}")
        return self


@dataclass
class TrainData:
    """Clean latents (as the LATENT socket holds them) and, per row, an index into `conds`."""

    latents: torch.Tensor
    conds: list
    cond_of_row: list[int]
    retention: torch.Tensor | None = None  # Diff-Tuning memory bank latents
    retention_cond: int | None = None
    losses: list[float] = field(default_factory=list)


def _fresh(obj):
    """Deep copy of a conditioning structure with every tensor cloned (inference tensors can't join autograd)."""
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: _fresh(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_fresh(v) for v in obj)
    return obj


@contextmanager
def frozen(module: nn.Module):
    """The model's weights as constants for autograd, for the session (no copy).

    Inference-mode tensors (weights ComfyUI loaded in a node) cannot be saved for backward: they
    are swapped for plain tensors on the same storage. Parameters that require grad (a model
    built outside inference mode) are switched off, or backward would compute a gradient for
    every frozen weight. Both are undone in `finally`.
    """
    swapped, switched = [], []
    for mod in module.modules():
        for store in (mod._parameters, mod._buffers):
            for name, t in list(store.items()):
                if type(t) in (torch.Tensor, nn.Parameter) and t.is_inference():
                    alias = torch.empty(0, dtype=t.dtype, device=t.device).set_(
                        t.untyped_storage(), t.storage_offset(), t.size(), t.stride())
                    store[name] = nn.Parameter(alias, requires_grad=False) if isinstance(t, nn.Parameter) else alias
                    swapped.append((store, name, t))
                elif isinstance(t, torch.Tensor) and t.requires_grad:
                    switched.append(t.requires_grad_(False))
    try:
        yield
    finally:
        for t in switched:
            t.requires_grad_(True)
        for store, name, t in reversed(swapped):
            store[name] = t


_CONTAINERS = (nn.ModuleList, nn.Sequential, nn.ModuleDict)


def _blocks(module: nn.Module):
    """The outermost modules below `module` that are not mere containers (what checkpointing wraps)."""
    for child in module.children():
        if isinstance(child, _CONTAINERS):
            yield from _blocks(child)
        else:
            yield child


def _fresh_inputs(forward):
    """forward on copies of its tensor inputs: blocks that add their residual in place (Flux's
    `x += ...`) must not change the inputs that checkpointing keeps for recomputation."""
    def run(*args, **kwargs):
        copy_ = lambda v: v.clone() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
        return forward(*map(copy_, args), **{k: copy_(v) for k, v in kwargs.items()})
    return run


@contextmanager
def checkpointed_blocks(diffusion_model: nn.Module, enabled: bool):
    """Recompute each block's activations in backward instead of keeping them (for the session)."""
    blocks = list(_blocks(diffusion_model)) if enabled else []
    for block in blocks:
        def run(*args, _block=block.forward, _forward=_fresh_inputs(block.forward), **kwargs):
            if not torch.is_grad_enabled():  # FECL's frozen forward: nothing to recompute
                return _block(*args, **kwargs)
            return torch.utils.checkpoint.checkpoint(_forward, *args, use_reentrant=False, **kwargs)
        block.forward = run
    try:
        yield
    finally:
        for block in blocks:
            del block.forward


class FeRATrainSampler(comfy.samplers.Sampler):
    """Runs the training loop where a sampler would denoise; returns the latents unchanged."""

    def __init__(self, adapter: FeRAAdapter, data: TrainData, settings: TrainSettings, progress=None):
        self.adapter, self.data, self.settings, self.progress = adapter, data, settings, progress

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False, **kwargs):
        s, data, cfg = self.settings, self.data, self.adapter.config
        inner = model_wrap.inner_model
        objective = ComfyObjective(model_wrap, extra_args, s.dtype)
        if len(objective.conds) != len(data.conds):
            raise RuntimeError(f"ComfyUI prepared {len(objective.conds)} conditionings from {len(data.conds)}")
        device = latent_image.device
        x0_all = latent_image.float()
        retention = None
        if data.retention is not None:
            retention = inner.process_latent_in(data.retention.to(device, torch.float32))
        gen = torch.Generator().manual_seed(s.seed)
        params = [p for p in self.adapter.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=s.learning_rate)
        n, per_step = x0_all.shape[0], min(s.batch_size, x0_all.shape[0])
        n_ret = 0 if retention is None else max(1, per_step // 4)
        with frozen(inner), checkpointed_blocks(inner.diffusion_model, s.gradient_checkpointing):
            for step in range(s.steps):
                comfy.model_management.throw_exception_if_processing_interrupted()
                total = torch.zeros((), device=device)
                for _ in range(s.grad_accumulation):
                    rows = torch.randperm(n, generator=gen)[:per_step].tolist()
                    x0, conds = x0_all[rows], [data.cond_of_row[i] for i in rows]
                    mask = None
                    if n_ret:
                        extra = torch.randperm(retention.shape[0], generator=gen)[:n_ret].tolist()
                        x0 = torch.cat([x0, retention[extra]])
                        conds += [data.retention_cond] * len(extra)
                        mask = torch.arange(x0.shape[0]) >= per_step
                    out = training_step(objective, x0, conds, cfg, gen, s.diff_tuning, mask, RETENTION_WEIGHT)
                    try:
                        (out.loss / s.grad_accumulation).backward()
                    except RuntimeError as err:
                        if "inplace operation" not in str(err) or s.gradient_checkpointing:
                            raise
                        raise RuntimeError(f"{type(inner).__name__} updates activations in place, which backward "
                                           "cannot undo: turn gradient_checkpointing on to train it") from err
                    total = total + out.loss.detach() / s.grad_accumulation
                value = total.item()  # the one host sync of a step: NaN check, loss record, progress
                if not math.isfinite(value):
                    raise FloatingPointError(f"FeRA training: the loss became {value} at step {step + 1}; "
                                             "nothing was kept. Lower the learning rate or train in fp32.")
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                data.losses.append(value)
                if self.progress is not None:
                    self.progress(step + 1, s.steps, value)
        return latent_image


def _in_training():
    """ComfyUI 0.33+ switches some kernels to differentiable versions while this flag is set."""
    mm = comfy.model_management
    if not hasattr(mm, "in_training"):
        return nullcontext()

    @contextmanager
    def flag():
        old, mm.in_training = mm.in_training, True
        try:
            yield
        finally:
            mm.in_training = old
    return flag()


def train(patcher, adapter: FeRAAdapter, latents: torch.Tensor, positive: list, settings: TrainSettings,
          retention: torch.Tensor | None = None, retention_positive: list | None = None, progress=None,
          attach=None):
    """Train a copy of `adapter` (float32, on the model's device) and return (trained copy, losses).

    positive: one conditioning for all images or one per image (ComfyUI CONDITIONING entries).
    `patcher` is left untouched; the adapter is attached to a clone for the session by
    attach(patcher, adapter) -> clone (default: FeRA's routing in live mode; SODA passes its weight
    wrappers, nodes/soda_patch.attach_live).
    """
    settings.check()
    latents = with_frames(patcher, latents)  # Qwen-Image's 4-D image latents get the frame axis its sampler gives them
    retention = None if retention is None else with_frames(patcher, retention)
    n = latents.shape[0]
    if len(positive) == 1:
        cond_of_row = [0] * n
    elif len(positive) == n:
        cond_of_row = list(range(n))
    else:
        raise ValueError(f"{n} images but {len(positive)} conditionings: give one conditioning for all images "
                         "or one per image")
    conds = list(positive)
    retention_cond = None
    if retention is not None:
        if not settings.diff_tuning:
            raise ValueError("retention images are part of Diff-Tuning: turn diff_tuning on or leave them out")
        if retention_positive is None and len(positive) != 1:
            raise ValueError("retention images need their conditioning when the images have one each")
        extra = retention_positive or positive[:1]
        if len(extra) != 1:
            raise ValueError(f"retention images take one conditioning, got {len(extra)}")
        conds.append(extra[0])
        retention_cond = len(conds) - 1
    with torch.inference_mode(False), torch.enable_grad(), _in_training():
        data = TrainData(latents.clone().float(), _fresh(conds), cond_of_row,
                         None if retention is None else retention.clone().float(), retention_cond)
        adapter = copy.deepcopy(adapter).to(patcher.load_device, torch.float32).requires_grad_(True)
        clone = attach(patcher, adapter) if attach else apply_fera(patcher, adapter, 1.0, live=True)
        if settings.dtype is not None:  # as TrainLoraNode: every op in that dtype, not only autocast's list
            clone.set_model_compute_dtype(settings.dtype)
        guider = Guider_Basic(clone)
        guider.set_conds(data.conds)
        sampler = FeRATrainSampler(adapter, data, settings, progress)
        noise = torch.zeros_like(data.latents)
        guider.sample(noise, data.latents, sampler, torch.ones(2), seed=settings.seed, disable_pbar=True)
        adapter.requires_grad_(False)
    return adapter, data.losses
