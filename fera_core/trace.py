"""Routing traces: per call of the model, the band energies and expert weights of each row.

Recording only keeps references to detached device tensors (no host-device sync per
step); everything is copied to the host once, when the trace is read.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

COND, UNCOND = 0, 1
_LABELS = {COND: "cond", UNCOND: "uncond"}


@dataclass
class _Call:
    energies: torch.Tensor  # (N, n)
    weights: torch.Tensor  # (N, M)
    sigma: torch.Tensor | None  # (N,) or scalar
    cond_or_uncond: tuple[int, ...] | None  # one entry per equal chunk of rows, as ComfyUI batches them


@dataclass
class RoutingTrace:
    """Per-call records; read with rows() or to_json()."""

    calls: list[_Call] = field(default_factory=list)

    def record(self, energies: torch.Tensor, weights: torch.Tensor, sigma: torch.Tensor | float | None = None,
               cond_or_uncond=None) -> None:
        if isinstance(sigma, torch.Tensor):
            sigma = sigma.detach()
        elif sigma is not None:
            sigma = torch.tensor(float(sigma))
        self.calls.append(_Call(energies.detach(), weights.detach(), sigma,
                                tuple(cond_or_uncond) if cond_or_uncond is not None else None))

    def clear(self) -> None:
        self.calls.clear()

    def rows(self) -> list[dict]:
        """One dict per (call, row): call, row (index in its latent batch), cond ('cond', 'uncond' or
        None), sigma, energies, weights. The only place the trace touches the host."""
        if not self.calls:
            return []
        host = [(c.energies.float().cpu(), c.weights.float().cpu(),
                 None if c.sigma is None else c.sigma.float().cpu()) for c in self.calls]
        out = []
        for index, (call, (energies, weights, sigma)) in enumerate(zip(self.calls, host)):
            n = energies.shape[0]
            chunks = call.cond_or_uncond or (None,)
            per_chunk = max(n // len(chunks), 1)
            for i in range(n):
                s = None if sigma is None else float(sigma.reshape(-1)[i if sigma.numel() == n else 0])
                flag = chunks[min(i // per_chunk, len(chunks) - 1)]
                out.append({"call": index, "row": i % per_chunk, "cond": _LABELS.get(flag), "sigma": s,
                            "energies": energies[i].tolist(), "weights": weights[i].tolist()})
        return out

    def to_json(self) -> str:
        return json.dumps({"version": 1, "rows": self.rows()})
