"""Soft frequency router: band energies (B, n) -> expert weights (B, M).

The MLP and its state-dict names (net.0, net.2) are the reference's, so reference files
load unchanged. RoutingControls are the sampling-time knobs a user turns without
retraining: a temperature override, a fixed (or forced one-hot) mix, per-expert gains.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn


def parse_numbers(text: str, name: str = "value") -> list[float] | None:
    """'0.2, 0.5; 0.3' -> [0.2, 0.5, 0.3]; '' -> None. (Mixes and gains as users type them.)"""
    text = text.strip()
    if not text:
        return None
    try:
        return [float(v) for v in text.replace(";", ",").split(",")]
    except ValueError:
        raise ValueError(f"{name}: {text!r} is not a comma-separated list of numbers") from None


@dataclass(frozen=True)
class RoutingControls:
    """Overrides applied to the router's output.

    tau: softmax temperature instead of the adapter's own (lower = more decisive).
    mix: fixed expert weights used instead of the router (e.g. (0, 1, 0) forces expert 1).
    gains: per-expert multipliers applied last, not renormalised, so a gain of 0 removes an
        expert's contribution and 2 doubles it.
    """

    tau: float | None = None
    mix: Sequence[float] | None = None
    gains: Sequence[float] | None = None

    def check(self, num_experts: int) -> "RoutingControls":
        if self.tau is not None and not self.tau > 0:
            raise ValueError(f"router temperature must be > 0, got {self.tau}")
        for name in ("mix", "gains"):
            values = getattr(self, name)
            if values is None:
                continue
            if len(values) != num_experts:
                raise ValueError(f"{name} needs one value per expert ({num_experts}), got {len(values)}: {list(values)}")
            if isinstance(values, torch.Tensor):
                continue  # made by on() from checked values; reading them back would sync the device
            if not all(math.isfinite(float(v)) for v in values):
                raise ValueError(f"{name} must be finite numbers, got {list(values)}")
            if name == "mix" and (min(values) < 0 or sum(values) <= 0):
                raise ValueError(f"mix must be non-negative with a positive sum, got {list(values)}")
        return self

    def on(self, device) -> "RoutingControls":
        """These controls with mix and gains as float32 tensors on `device`: made once, so that
        routing every step copies nothing from the host."""
        def tensor(values):
            return None if values is None else torch.tensor([float(v) for v in values], device=device)
        return RoutingControls(self.tau, tensor(self.mix), tensor(self.gains))

    @staticmethod
    def from_text(num_experts: int, temperature: float = 0.0, force_expert: int = -1, mix: str = "",
                  gains: str = "") -> "RoutingControls":
        """Controls as a node's widgets give them: temperature 0 and force_expert -1 mean unset, mix and
        gains are typed number lists ('' = unset)."""
        if force_expert >= 0 and mix.strip():
            raise ValueError("set either force_expert or mix, not both")
        chosen = RoutingControls.forced(force_expert, num_experts).mix if force_expert >= 0 else \
            parse_numbers(mix, "mix")
        return RoutingControls(tau=temperature or None, mix=chosen, gains=parse_numbers(gains, "gains"))

    @staticmethod
    def forced(expert: int, num_experts: int) -> "RoutingControls":
        if not 0 <= expert < num_experts:
            raise ValueError(f"forced expert {expert} is out of range 0..{num_experts - 1}")
        return RoutingControls(mix=[float(m == expert) for m in range(num_experts)])


class SoftFrequencyRouter(nn.Module):
    """Linear(n, hidden) -> ReLU -> Linear(hidden, M) -> softmax(logits / tau)."""

    def __init__(self, num_bands: int = 3, num_experts: int = 3, tau: float = 0.7, hidden: int = 64):
        super().__init__()
        self.tau = tau
        self.net = nn.Sequential(nn.Linear(num_bands, hidden), nn.ReLU(), nn.Linear(hidden, num_experts))

    @property
    def num_experts(self) -> int:
        return self.net[2].out_features

    def forward(self, e_t: torch.Tensor, controls: RoutingControls | None = None) -> torch.Tensor:
        controls = (controls or RoutingControls()).check(self.num_experts)
        w0 = self.net[0].weight
        e_t = e_t.to(device=w0.device, dtype=w0.dtype)
        if controls.mix is not None:
            mix = torch.as_tensor(controls.mix, device=e_t.device, dtype=e_t.dtype)
            alpha = (mix / mix.sum()).expand(e_t.shape[0], -1)
        else:
            tau = self.tau if controls.tau is None else controls.tau
            alpha = torch.softmax(self.net(e_t) / tau, dim=-1)
        if controls.gains is not None:
            alpha = alpha * torch.as_tensor(controls.gains, device=e_t.device, dtype=e_t.dtype)
        return alpha
