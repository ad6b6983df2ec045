"""Frequency-Energy Consistency Loss (FECL, the paper's Eq. 10 as the reference implements it).

Keeps the experts' update delta = fera - base in the bands where the residual
r = fera - target is: per row, sum_k w_k (|delta_k| / |delta| - |r_k| / |r|)^2 with
w_k = |r_k|^2 / sum_j |r_j|^2 (not detached, as in the reference), averaged over the batch
and scaled by `weight`. It only compares tensors of one space, so it works for any
prediction type (eps, v, x0, flow) as long as base, fera and target share it.
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .indicator import REFERENCE, band_components

_EPS = 1e-8


class FECLSettings(NamedTuple):
    """What the training step needs to add FECL: a method config's `fecl` (None: no FECL, no frozen forward)."""

    weight: float
    num_bands: int
    definition: str


def _norms(comps: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([torch.linalg.vector_norm(c.flatten(1), dim=1) for c in comps], dim=1)


def fecl_loss(base: torch.Tensor, fera: torch.Tensor, target: torch.Tensor, num_bands: int = 3,
              definition: str = REFERENCE, weight: float = 0.1, reduction: str = "mean") -> torch.Tensor:
    """FECL in float32; `definition` must be the adapter's indicator definition.

    reduction "mean" gives the reference's scalar; "none" the (B,) per-row values, for trainers
    that weigh rows differently (Diff-Tuning's retention rows).
    """
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if not base.shape == fera.shape == target.shape:
        raise ValueError(f"FECL needs equal shapes, got base {tuple(base.shape)}, fera {tuple(fera.shape)}, "
                         f"target {tuple(target.shape)}")
    delta = fera.float() - base.float()
    resid = fera.float() - target.float()
    d_norms = _norms(band_components(delta, num_bands, definition))
    r_norms = _norms(band_components(resid, num_bands, definition))
    r_energy = r_norms**2
    w = r_energy / (r_energy.sum(dim=1, keepdim=True) + _EPS)
    d_total = torch.linalg.vector_norm(delta.flatten(1), dim=1, keepdim=True) + _EPS
    r_total = torch.linalg.vector_norm(resid.flatten(1), dim=1, keepdim=True) + _EPS
    per_row = (w * (d_norms / d_total - r_norms / r_total) ** 2).sum(dim=1)
    return (per_row.mean() if reduction == "mean" else per_row) * weight
