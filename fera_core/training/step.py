"""The FeRA training step, written once for every trainer (ComfyUI node, diffusers CLI).

A host says how its model is noised and called through an `Objective`: ComfyUI answers from
the model's `model_sampling`, diffusers from the pipeline's scheduler. This module draws the
noise levels (uniform, or Diff-Tuning's emphasis), builds x_t = a * x0 + b * noise and the
regression target in the model's own prediction space, runs the model with its experts and,
without grad and with the experts off, the frozen model, and returns MSE + FECL. FECL compares
the two predictions in that same space, so the loss follows the model: epsilon (SD1.5, SDXL),
v (SD2-v), flow matching (SD3, Flux).

The step is the same for every method: of the adapter's config it reads only `fecl` (FeRA's FECL
settings, or None: SODA, or FeRA at fecl_weight 0, train with MSE alone and run no frozen forward).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..fecl import FECLSettings, fecl_loss

EPSILON, V_PREDICTION, FLOW, SAMPLE = "epsilon", "v_prediction", "flow", "sample"
PREDICTIONS = (EPSILON, V_PREDICTION, FLOW, SAMPLE)
UNIFORM, HIGH_NOISE, LOW_NOISE = "uniform", "high_noise", "low_noise"
WEIGHTINGS = (UNIFORM, HIGH_NOISE, LOW_NOISE)


def _check(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; expected one of {allowed}")
    return value


def sample_noise_levels(n: int, weighting: str = UNIFORM, generator: torch.Generator | None = None,
                        device=None) -> torch.Tensor:
    """(n,) noise levels u in [0, 1), 1 = pure noise (hosts map u to a timestep or sigma).

    Diff-Tuning (fera-reference.md section 6) samples target images with p(u) ~ u
    (HIGH_NOISE, u = sqrt(U)) and retention images with p(u) ~ 1 - u (LOW_NOISE).
    """
    _check("noise-level weighting", weighting, WEIGHTINGS)
    device = generator.device if generator is not None else device
    u = torch.rand(n, generator=generator, device=device)
    if weighting == HIGH_NOISE:
        return u.sqrt()
    if weighting == LOW_NOISE:
        return 1 - u.sqrt()
    return u


def _rows(c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-row coefficients (B,) broadcast against a (B, ...) latent, in float32."""
    return c.to(like.device, torch.float32).reshape(-1, *([1] * (like.ndim - 1)))


def regression_target(prediction: str, x0: torch.Tensor, noise: torch.Tensor, a: torch.Tensor,
                      b: torch.Tensor) -> torch.Tensor:
    """What the model should output for x_t = a * x0 + b * noise (a, b per row), in float32.

    epsilon: noise; v_prediction: a * noise - b * x0 (diffusers' and ComfyUI's v with
    a^2 + b^2 = 1); flow (rectified flow, x_t = (1 - s) x0 + s noise): noise - x0; sample: x0.
    """
    _check("prediction type", prediction, PREDICTIONS)
    x0, noise = x0.float(), noise.float()
    if prediction == EPSILON:
        return noise
    if prediction == V_PREDICTION:
        return _rows(a, x0) * noise - _rows(b, x0) * x0
    if prediction == FLOW:
        return noise - x0
    return x0


def prediction_from_x0(prediction: str, x_t: torch.Tensor, x0_hat: torch.Tensor, a: torch.Tensor,
                       b: torch.Tensor) -> torch.Tensor:
    """The model output that corresponds to a denoised estimate x0_hat of x_t = a x0 + b noise.

    For hosts whose model call returns x0 (ComfyUI's apply_model): the implied noise is
    (x_t - a x0_hat) / b, put into regression_target. Needs b > 0 (any level above clean).
    """
    x_t, x0_hat = x_t.float(), x0_hat.float()
    noise_hat = (x_t - _rows(a, x_t) * x0_hat) / _rows(b, x_t)
    return regression_target(prediction, x0_hat, noise_hat, a, b)


class MethodConfig(Protocol):
    """An adapter config as the step reads it (FeRAConfig, SODAConfig)."""

    fecl: FECLSettings | None


class Objective(Protocol):
    """How a host noises and calls its model. `prediction` is one of PREDICTIONS."""

    prediction: str

    def coefficients(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Noise levels u (B,) -> (a, b, model_time): x_t = a x0 + b noise, and what the model
        takes as its time input (timesteps, sigmas)."""

    def predict(self, x_t: torch.Tensor, model_time: Any, cond: Any, experts: bool) -> torch.Tensor:
        """The model's output in its prediction space for x_t (routed per row when experts is True)."""


@dataclass
class StepLoss:
    """The step's loss (with grad) and its parts (detached, still on the device: read them when needed)."""

    loss: torch.Tensor
    mse: torch.Tensor
    fecl: torch.Tensor


def fera_loss(pred: torch.Tensor, base: torch.Tensor, target: torch.Tensor, config: MethodConfig,
              row_weights: torch.Tensor | None = None) -> StepLoss:
    """MSE + FECL per row, summed with `row_weights` (default 1/B each: the reference's loss).

    config: any method's config; its `fecl` says whether and how FECL is added."""
    pred, target = pred.float(), target.float()
    mse = (pred - target).pow(2).flatten(1).mean(1)
    settings = config.fecl
    fecl = fecl_loss(base, pred, target, settings.num_bands, settings.definition, settings.weight, reduction="none") \
        if settings else torch.zeros_like(mse)  # no FECL: no band decompositions to run backward through
    w = torch.full_like(mse, 1.0 / mse.shape[0]) if row_weights is None else row_weights.to(mse)
    return StepLoss(((mse + fecl) * w).sum(), (mse * w).sum().detach(), (fecl * w).sum().detach())


def noise_draws(shape, generator: torch.Generator | None = None, device=None, diff_tuning: bool = False,
                retention: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The random part of a step for a batch of `shape`: noise levels u (B,), then noise.

    Data-parallel trainers draw these once for the global batch and give each process its rows
    (training_step's `draws`), so the curve does not depend on how the batch is split.
    """
    u = sample_noise_levels(shape[0], HIGH_NOISE if diff_tuning else UNIFORM, generator, device)
    if retention is not None and retention.any():
        low = sample_noise_levels(shape[0], LOW_NOISE, generator, device)
        u = torch.where(retention.to(u.device), low, u)
    return u, torch.randn(shape, generator=generator, device=u.device)


def training_step(objective: Objective, x0: torch.Tensor, cond: Any, config: MethodConfig,
                  generator: torch.Generator | None = None, diff_tuning: bool = False,
                  retention: torch.Tensor | None = None, retention_weight: float = 0.1,
                  draws: tuple[torch.Tensor, torch.Tensor] | None = None) -> StepLoss:
    """One FeRA training step's loss for the clean latents x0 (B, ...) and their conditioning.

    diff_tuning: noise levels weighted towards high noise for target rows. retention: a (B,)
    bool mask of rows that are images generated by the frozen model (Diff-Tuning's memory
    bank); they are noised towards low noise and their loss weighs `retention_weight` in
    total (target rows' mean + retention_weight * retention rows' mean). draws: this batch's
    (u, noise) from noise_draws, instead of drawing them from `generator`.
    """
    b = x0.shape[0]
    retention = torch.zeros(b, dtype=torch.bool) if retention is None else retention.to("cpu", torch.bool)
    if retention.shape != (b,):
        raise ValueError(f"retention mask must have shape ({b},), got {tuple(retention.shape)}")
    if retention.all():
        raise ValueError("every row is a retention row: a step needs at least one target image")
    if not diff_tuning and retention.any():
        raise ValueError("retention rows are part of Diff-Tuning: pass diff_tuning=True")
    u, noise = noise_draws(x0.shape, generator, x0.device, diff_tuning, retention) if draws is None else draws
    noise = noise.to(x0.device)
    a, b_, model_time = objective.coefficients(u)
    x_t = (_rows(a, x0) * x0.float() + _rows(b_, x0) * noise).to(x0.dtype)
    base = None
    if config.fecl:  # the frozen prediction only feeds FECL; it goes first, so a host may keep
        with torch.no_grad():  # the experts' routing of the last call for backward (checkpointing)
            base = objective.predict(x_t, model_time, cond, experts=False)
    pred = objective.predict(x_t, model_time, cond, experts=True)
    if base is None:
        base = pred.detach()
    target = regression_target(objective.prediction, x0, noise, a, b_)
    weights = None
    if retention.any():
        n_ret = int(retention.sum())
        weights = torch.where(retention, retention_weight / n_ret, 1.0 / (b - n_ret))
    return fera_loss(pred, base, target, config, weights)
