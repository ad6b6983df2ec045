"""One adapted layer's trainable part: the spectrum increment and the Kronecker-factored rotation.

W' = (W0 + dS B) R (side in) or R (W0 + dS B) (side out), with dS B the spectrum increment's
matrix (factorisation.spectral_increment) and R = R_1 (x) R_2 (x) ... (torch.kron's ordering). The
spectrum increment is the paper's S + dS written against W0 itself rather than its
reconstruction S B, so that with dS = 0 and R = I the adapted weight is W0 exactly.

Each factor is kept orthogonal by PyTorch's own parametrization
(torch.nn.utils.parametrizations.orthogonal: a matrix exponential of a skew-symmetric matrix,
times a base that starts at the identity), so any optimizer keeps it on the manifold; it was
measured against geoopt's Riemannian Adam on the Stiefel manifold (benchmarks/bench_soda_orthogonal.py).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrizations

from .config import IN
from .factorisation import as_matrix, spectral_increment, spectrum_size


def kron_apply(matrix: torch.Tensor, factors: list[torch.Tensor], side: str) -> torch.Tensor:
    """matrix @ (F_1 (x) F_2 (x) ...) (side in) or (F_1 (x) ...) @ matrix (side out), without forming the
    Kronecker product: one small contraction per factor."""
    sizes = [f.shape[0] for f in factors]
    if side == IN:
        m = matrix.reshape(matrix.shape[0], *sizes)
        for i, f in enumerate(factors):
            m = torch.movedim(torch.tensordot(m, f, dims=([1 + i], [0])), -1, 1 + i)
        return m.reshape(matrix.shape)
    m = matrix.reshape(*sizes, matrix.shape[1])
    for i, f in enumerate(factors):
        m = torch.movedim(torch.tensordot(f, m, dims=([1], [i])), 0, i)
    return m.reshape(matrix.shape)


def orthogonality_error(r: torch.Tensor) -> float:
    """max |R^T R - I|, computed in float64."""
    r = r.detach().double()
    return float((r.t() @ r - torch.eye(r.shape[0], dtype=torch.float64, device=r.device)).abs().max())


class _Factor(nn.Module):
    """One orthogonal factor: `weight` is orthogonal by construction (see the module docstring)."""

    def __init__(self, size: int):
        super().__init__()
        self.weight = nn.Parameter(torch.eye(size))
        parametrizations.orthogonal(self, "weight", orthogonal_map="matrix_exp")


class KroneckerRotation(nn.Module):
    """R = R_1 (x) R_2 (x) ... of orthogonal factors of the given sizes, the identity when created."""

    def __init__(self, sizes: list[int]):
        super().__init__()
        self.factors = nn.ModuleList(_Factor(s) for s in sizes)

    @property
    def sizes(self) -> list[int]:
        return [f.weight.shape[0] for f in self.factors]

    def matrices(self) -> list[torch.Tensor]:
        return [f.weight for f in self.factors]

    @torch.no_grad()
    def load(self, matrices: list[torch.Tensor]) -> None:
        """Set the factors (orthogonal matrices; the parametrization takes them as its new base)."""
        for f, r in zip(self.factors, matrices, strict=True):
            f.weight = r.to(f.parametrizations.weight.original)

    def dense(self) -> torch.Tensor:
        """The whole rotation as one matrix (tests, inspection: it is n x n)."""
        out = torch.ones(1, 1)
        for r in self.matrices():
            out = torch.kron(out.to(r), r)
        return out


class SODALayer(nn.Module):
    """Spectrum increment (k,) and rotation of one frozen weight of `shape` ((out, in) or (out, in, kh, kw))."""

    def __init__(self, shape, variant: str, side: str, factor_sizes: list[int]):
        super().__init__()
        self.shape, self.variant, self.side = tuple(shape), variant, side
        self.spectrum = nn.Parameter(torch.zeros(spectrum_size(self.shape)))
        self.rotation = KroneckerRotation(factor_sizes)

    def merged(self, weight: torch.Tensor, basis: tuple[torch.Tensor, ...], spectrum: torch.Tensor | None = None,
               factors: list[torch.Tensor] | None = None) -> torch.Tensor:
        """W' for the frozen `weight` (its factorisation: `basis`), in weight's dtype, from this layer's spectrum
        increment and factors (or the given ones). Differentiable through plain autograd, which keeps every
        intermediate until backward: training builds W' with rebuilt.adapted_weight, which keeps none."""
        spectrum = self.spectrum if spectrum is None else spectrum
        factors = self.rotation.matrices() if factors is None else factors
        w = as_matrix(weight)
        delta = spectral_increment(basis, spectrum.to(w.dtype), self.variant, self.side, self.shape)
        return kron_apply(w + delta.to(w.dtype), [r.to(w.dtype) for r in factors], self.side).reshape(weight.shape)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
