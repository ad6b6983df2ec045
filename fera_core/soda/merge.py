"""Applying a trained SODA layer to a weight a host hands over: the weight change, its strength, and the cache
that keeps the factorisation to once per distinct weight.

At strength t the weight W becomes W + t (W'(W) - W): the blend of the base and the trained weight
that ComfyUI's LoRA, OFT and BOFT patches use, so t = 0 leaves W as it was, t = 1 gives the trained
W', and a baked LoRA of the difference behaves the same at every strength. (It is not a partial
rotation: at t = 0.5 the basis is not exactly orthogonal.) W'(W) = (W + dS B(W)) R (side in) or
R (W + dS B(W)) (side out), where B(W) is W's own factorisation: applied to the frozen weight it is the
trained model; applied to a weight an earlier patch (a LoRA) already changed, SODA acts on that
weight, as OFT does.

Factorising costs far more than merging (an SVD per layer), and a host may ask for the same weight
again: at every model load, or at every step when it streams weights (ComfyUI's low-VRAM modes).
LayerMerge keeps the spectrum increment's matrix dS B(W) per distinct W, recognised by a
fingerprint (shape and three float64 sums), on the CPU in `store_dtype`.
"""
from __future__ import annotations

from collections import OrderedDict

import torch

from .factorisation import as_matrix, spectral_basis, spectral_increment
from .layer import SODALayer, kron_apply


def fingerprint(weight: torch.Tensor) -> tuple:
    """Shape and three float64 sums: equal for the same weight, different for any weight a patch changed."""
    v = weight.detach().reshape(-1).double()
    return (tuple(weight.shape), float(v.sum()), float(v.square().sum()), float(v[::7].sum()))


def _compute_dtype(weight: torch.Tensor) -> torch.dtype:
    return torch.float64 if weight.dtype == torch.float64 else torch.float32


class LayerMerge:
    """One trained layer, ready to change weights handed to it (no grad)."""

    def __init__(self, layer: SODALayer, store_dtype: torch.dtype = torch.float32, keep: int = 2):
        self.layer, self.store_dtype, self.keep = layer, store_dtype, keep
        self._increments: OrderedDict = OrderedDict()  # fingerprint -> dS B(W), at most `keep` weights
        self.factorisations = 0  # how many times a weight was factorised (tests, reports)

    def increment(self, weight: torch.Tensor) -> torch.Tensor:
        """dS B(W) for this weight, on weight's device: from the cache, or factorised once."""
        key = fingerprint(weight)
        stored = self._increments.get(key)
        if stored is None:
            layer = self.layer
            basis = spectral_basis(weight, layer.variant, layer.side)
            with torch.no_grad():
                d = spectral_increment(basis, layer.spectrum.detach().to(basis[0]), layer.variant, layer.side,
                                       tuple(weight.shape))
            stored = d.to("cpu", self.store_dtype)
            self._increments[key] = stored
            self.factorisations += 1
            while len(self._increments) > self.keep:
                self._increments.popitem(last=False)
        self._increments.move_to_end(key)
        return stored.to(weight.device, _compute_dtype(weight))

    @torch.no_grad()
    def difference(self, weight: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        """strength * (W'(W) - W), in float32 (float64 for a float64 weight), shaped like weight."""
        w = as_matrix(weight).to(_compute_dtype(weight))
        factors = [r.detach().to(w) for r in self.layer.rotation.matrices()]
        merged = kron_apply(w + self.increment(weight).reshape(w.shape), factors, self.layer.side)
        return ((merged - w) * strength).reshape(weight.shape)
