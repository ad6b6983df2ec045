"""The training objective of a ComfyUI model, read off its own `model_sampling`.

fera_core.training needs, for noise levels u, the coefficients of x_t = a x0 + b noise in the
space the network sees, and the model's output in its own prediction space. ComfyUI's
model_sampling knows both, in any family: noise_scaling (k-diffusion x from x0 and noise),
calculate_input (what the network receives) and calculate_denoised (network output -> x0).
All three are affine, so the coefficients are measured by evaluating them on unit inputs
rather than by naming classes: shifted Flux schedules, SD3's noise scale and future classes
come out right. The prediction type is the one candidate (epsilon, v, flow, sample) for which
calculate_denoised returns x0. The model is called the way a sampler calls it (the guider's
model_wrap, with its prepared conditioning and model options), so SDXL's size embeddings,
Flux's guidance and every other conditioning input go through ComfyUI's own machinery.
"""
from __future__ import annotations

import copy

import torch

from ..fera_core.training import EPSILON, FLOW, SAMPLE, V_PREDICTION, prediction_from_x0
from .routing import EXPERTS_OFF

_MIN_NOISE = 1e-3  # smallest noise level used: b must stay > 0 to recover the prediction from x0


def _affine(ms, sigma: torch.Tensor):
    """(c_x, c_n, k, p, q) per row: x = c_x x0 + c_n noise; input = k x; x0 = p x + q out."""
    one, zero = torch.ones(sigma.shape[0], 1), torch.zeros(sigma.shape[0], 1)
    c_x = ms.noise_scaling(sigma, zero.clone(), one.clone())
    c_n = ms.noise_scaling(sigma, one.clone(), zero.clone())
    k = ms.calculate_input(sigma, one.clone())
    p = ms.calculate_denoised(sigma, zero.clone(), one.clone())
    q = ms.calculate_denoised(sigma, one.clone(), zero.clone())
    return tuple(v.reshape(-1).to(torch.float64) for v in (c_x, c_n, k, p, q))


def prediction_type(ms) -> str:
    """Which output makes calculate_denoised return x0, checked at two noise levels."""
    sigma = torch.tensor([ms.percent_to_sigma(0.3), ms.percent_to_sigma(0.7)], dtype=torch.float32)
    c_x, c_n, k, p, q = _affine(ms, sigma)
    a, b = k * c_x, k * c_n
    candidates = {EPSILON: (0 * a, 1 + 0 * a), V_PREDICTION: (-b, a), FLOW: (-1 + 0 * a, 1 + 0 * a),
                  SAMPLE: (1 + 0 * a, 0 * a)}  # model output = w0 x0 + wn noise
    for name, (w0, wn) in candidates.items():
        if torch.allclose(p * c_x + q * w0, torch.ones_like(p), atol=1e-4) and \
                torch.allclose(p * c_n + q * wn, torch.zeros_like(p), atol=1e-4):
            return name
    raise ValueError(f"{type(ms).__name__}: the model's output is none of epsilon, v, flow or x0 "
                     "(calculate_denoised matches none); FeRA training does not support this model")


class ComfyObjective:
    """fera_core.training.Objective for a model under a ComfyUI guider (inside a Sampler.sample)."""

    def __init__(self, model_wrap, extra_args: dict, autocast_dtype: torch.dtype | None = None):
        self.model_wrap, self.extra_args = model_wrap, extra_args
        # A CPU copy: percent_to_sigma returns Python floats, which on a GPU copy would sync per row.
        self.sampling = copy.deepcopy(model_wrap.inner_model.model_sampling).to("cpu", torch.float32)
        self.prediction = prediction_type(self.sampling)
        self.autocast_dtype = autocast_dtype
        off = dict(extra_args)
        options = off["model_options"] = copy.copy(off["model_options"])
        options["transformer_options"] = dict(options.get("transformer_options", {}), **{EXPERTS_OFF: True})
        self.frozen_args = off
        self.conds = list(model_wrap.conds["positive"])
        self.row_conds: list[int] = []  # index into self.conds for each row of the next call

    def sigmas(self, u: torch.Tensor) -> torch.Tensor:
        """Noise levels u (1 = pure noise) -> the model's sigmas, through its own schedule."""
        percents = (1.0 - u.clamp(min=_MIN_NOISE)).tolist()
        return torch.tensor([self.sampling.percent_to_sigma(p) for p in percents], dtype=torch.float32)

    def coefficients(self, u: torch.Tensor):
        """(a, b, model_time) with model_time = (sigma, k, a, b): what predict needs for the call."""
        sigma = self.sigmas(u.cpu())
        c_x, c_n, k, _, _ = _affine(self.sampling, sigma)
        a, b = (k * c_x).float(), (k * c_n).float()
        return a, b, (sigma, k.float(), a, b)

    def predict(self, x_t: torch.Tensor, model_time, cond: list[int], experts: bool) -> torch.Tensor:
        """The model's output for x_t (network input space) in its prediction space.

        cond: the conditioning index of each row. A guider applies every positive conditioning
        to every row, so rows are called in groups of equal conditioning (one call when all
        images share one).
        """
        sigma, k, a, b = model_time
        device = x_t.device
        x = x_t.float() / k.to(device).reshape(-1, *([1] * (x_t.ndim - 1)))
        args = self.extra_args if experts else self.frozen_args
        groups: dict[int, list[int]] = {}
        for i, c in enumerate(cond):
            groups.setdefault(c, []).append(i)
        x0_hat = None
        try:
            for c, idx in groups.items():
                self.model_wrap.conds["positive"] = [self.conds[c]]
                whole = len(groups) == 1
                index = None if whole else torch.tensor(idx, device=device)
                with torch.autocast(device.type, self.autocast_dtype or torch.float32,
                                    enabled=self.autocast_dtype is not None):
                    out = self.model_wrap(x if whole else x[index], sigma[idx].to(device), **args).float()
                x0_hat = out if whole else (torch.zeros_like(x) if x0_hat is None else x0_hat).index_copy(0, index, out)
        finally:
            self.model_wrap.conds["positive"] = self.conds
        return prediction_from_x0(self.prediction, x_t, x0_hat, a, b)
