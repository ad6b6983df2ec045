"""The spectrum-times-basis factorisation of a frozen weight, and the weight change a spectrum increment makes.

A Linear's weight is its matrix; a Conv2d's weight (out, in, kh, kw) is read as the matrix
out x (in kh kw), as SVD-based adapters commonly do. With k = min(rows, columns):
- SVD: W0 = U diag(s) V^T. An increment ds of the singular values changes W0 by U diag(ds) V^T.
- QR, side "in" (LQ): W0 = L Q, L lower-trapezoidal (out x k), Q (k x in) with orthonormal rows.
  An increment dl of L's diagonal changes W0 by diag(dl) Q on its first k rows.
- QR, side "out" (QR): W0 = Q T, Q (out x k) with orthonormal columns, T upper-trapezoidal.
  An increment dt of T's diagonal changes W0 by Q diag(dt) on its first k columns.
Both factorisations are made unique so an increment means the same weights on every machine: the
triangular factor's diagonal is made non-negative (LAPACK's own sign is arbitrary), and for SVD the
increment's term u_i v_i^T does not depend on the singular vectors' signs. Factorisations are
computed in float32 (float64 input stays float64).
"""
from __future__ import annotations

import torch

from .config import IN, SVD


def as_matrix(weight: torch.Tensor) -> torch.Tensor:
    """(out, in) or (out, in, kh, kw) -> the (out, in * kh * kw) matrix view."""
    return weight.reshape(weight.shape[0], -1)


def columns(shape) -> int:
    """The matrix's column count: in * kh * kw."""
    return int(torch.Size(shape[1:]).numel())


def spectrum_size(shape) -> int:
    """k: how many spectrum values a weight of this shape has."""
    return min(shape[0], columns(shape))


def rotated_size(shape, side: str) -> int:
    """The dimension the rotation acts on: the matrix's columns (side in) or rows (side out)."""
    return columns(shape) if side == IN else shape[0]


@torch.no_grad()
def spectral_basis(weight: torch.Tensor, variant: str, side: str) -> tuple[torch.Tensor, ...]:
    """What spectral_increment needs of W0: (U, V^T) for SVD, (Q,) for QR; never the spectrum itself."""
    w = as_matrix(weight)
    w = w.double() if w.dtype == torch.float64 else w.float()
    if variant == SVD:
        u, _, vt = torch.linalg.svd(w, full_matrices=False)
        return u, vt
    if side == IN:  # LQ of W0 is the QR of W0^T: W0^T = Q_r R_r, so L = R_r^T and Q = Q_r^T
        q, r = torch.linalg.qr(w.t())
        sign = _signs(r)
        return ((q * sign).t().contiguous(),)
    q, r = torch.linalg.qr(w)
    return ((q * _signs(r)).contiguous(),)


def _signs(r: torch.Tensor) -> torch.Tensor:
    """+-1 per column of Q making the triangular factor's diagonal non-negative (0 counts as +)."""
    d = torch.diagonal(r)
    return torch.where(d < 0, -torch.ones_like(d), torch.ones_like(d))


def spectral_increment(basis: tuple[torch.Tensor, ...], delta: torch.Tensor, variant: str, side: str,
                       shape) -> torch.Tensor:
    """The (rows, columns) matrix the spectrum increment `delta` (k,) adds to W0 (differentiable in delta)."""
    if variant == SVD:
        u, vt = basis
        return (u * delta) @ vt
    (q,) = basis
    rows, cols, k = shape[0], columns(shape), delta.shape[0]
    if side == IN:  # diag(dl) Q on the first k rows
        d = delta[:, None] * q
        return d if k == rows else torch.cat([d, d.new_zeros(rows - k, cols)])
    d = q * delta  # Q diag(dt) on the first k columns
    return d if k == cols else torch.cat([d, d.new_zeros(rows, cols - k)], dim=1)


def increment_gradient(basis: tuple[torch.Tensor, ...], grad: torch.Tensor, variant: str, side: str) -> torch.Tensor:
    """d/d(delta) of sum(grad * spectral_increment(basis, delta, ...)) for a (rows, columns) `grad`: the
    increment's adjoint, which needs no forward product (training's backward, fera_core.soda.rebuilt)."""
    if variant == SVD:
        u, vt = basis
        return ((grad @ vt.t()) * u).sum(0)
    (q,) = basis
    if side == IN:
        return (grad[:q.shape[0]] * q).sum(1)
    return (grad[:, :q.shape[1]] * q).sum(0)
