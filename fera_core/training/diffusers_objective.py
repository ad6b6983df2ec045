"""The training Objective of a diffusers pipeline, read from its scheduler.

DDPM-family schedulers (DDPM, DDIM, Euler, DPM-Solver, ... anything with alphas_cumprod)
train at integer timesteps t = floor(u T): x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise,
in the space of `prediction_type` (epsilon, v_prediction, sample), as diffusers' own
training scripts do. Flow-matching schedulers (FlowMatchEulerDiscreteScheduler: SD3,
AuraFlow, ...) train at sigma = shift u / (1 + (shift - 1) u), the scheduler's own static
shift of the noise level, x_t = (1 - sigma) x0 + sigma noise, timestep = sigma T, target
noise - x0. Only reads the scheduler's config and tables, so it imports nothing of diffusers.
"""
from __future__ import annotations

from typing import Callable

import torch

from .step import EPSILON, FLOW, SAMPLE, V_PREDICTION

_PREDICTIONS = {"epsilon": EPSILON, "v_prediction": V_PREDICTION, "sample": SAMPLE}


def is_flow_scheduler(scheduler) -> bool:
    return type(scheduler).__name__.startswith("FlowMatch")


class SchedulerObjective:
    """fera_core.training.Objective for a diffusers scheduler and a model call.

    denoiser(x_t, model_time, cond, experts) -> the model's output (FeRA routing on when experts).
    """

    def __init__(self, scheduler, denoiser: Callable):
        config = scheduler.config
        self.denoiser = denoiser
        self.num_train_timesteps = int(config.num_train_timesteps)
        if is_flow_scheduler(scheduler):
            if config.get("use_dynamic_shifting", False):
                raise ValueError(f"{type(scheduler).__name__} uses resolution-dependent (dynamic) shifting, which "
                                 "this trainer does not implement; set use_dynamic_shifting=false or use a static shift")
            self.prediction, self.shift, self.alphas_cumprod = FLOW, float(config.get("shift", 1.0)), None
        elif hasattr(scheduler, "alphas_cumprod"):
            kind = config.get("prediction_type", "epsilon")
            if kind not in _PREDICTIONS:
                raise ValueError(f"{type(scheduler).__name__} has prediction_type {kind!r}; "
                                 f"supported: {sorted(_PREDICTIONS)}")
            self.prediction, self.shift = _PREDICTIONS[kind], None
            self.alphas_cumprod = torch.as_tensor(scheduler.alphas_cumprod, dtype=torch.float32)
        else:
            raise ValueError(f"{type(scheduler).__name__} is neither a DDPM-family scheduler (alphas_cumprod) nor a "
                             "flow-matching one (FlowMatch*): its training objective is unknown")

    def coefficients(self, u: torch.Tensor):
        """u (B,) in [0, 1) -> (a, b, model timestep) with x_t = a x0 + b noise."""
        if self.prediction == FLOW:
            sigma = self.shift * u / (1 + (self.shift - 1) * u)
            return 1 - sigma, sigma, sigma * self.num_train_timesteps
        t = (u * self.num_train_timesteps).long().clamp(max=self.num_train_timesteps - 1)
        abar = self.alphas_cumprod.to(u.device)[t]
        return abar.sqrt(), (1 - abar).sqrt(), t

    def sigma(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """The noise level as traces and ComfyUI state it: b for flow, b / a (k-diffusion sigma) otherwise."""
        return b if self.prediction == FLOW else b / a

    def predict(self, x_t: torch.Tensor, model_time, cond, experts: bool) -> torch.Tensor:
        return self.denoiser(x_t, model_time, cond, experts)
