"""Training's adapted weight W' without its intermediates: built in forward, rebuilt in backward.

Through plain autograd (SODALayer.merged) every adapted layer keeps, from its forward until its backward,
M = W0 + dS B, each Kronecker factor's partial product and the spectrum increment's (U diag(dS)) factor:
several weight-sized tensors per layer, where a LoRA keeps none (the layer's own op keeps the one W' it
multiplies with, for SODA and LoRA alike). RebuiltWeight computes W' with no graph and saves only W'
itself (the tensor the consuming op saves anyway: no extra memory) and the small parameters. In backward
it recovers M from W' with the rotation's transpose (R is orthogonal: M = W' R^T, or R^T W' for side
out), rebuilds W' = rot(M) with autograd on and takes torch.autograd.grad of it with respect to M and the
factors; dS's gradient is the increment's adjoint applied to M's (factorisation.increment_gradient, which,
unlike autograd, needs no second product U diag(dS) V^T). The gradients are those of the plain
path, computed by the same formulas; M differs from the forward's by the rounding of one more rotation
(a few units in the last place of the weight's dtype), so they agree to rounding, not bit for bit
(tests/core/test_soda.py compares them). Intermediates live only inside one layer's backward.

One call builds a whole host weight: ComfyUI fuses some layers (Flux's and SD3's q/k/v), whose adapted
row slices `Piece`s name; rows no piece covers pass through unchanged. Everything runs in the weight's
dtype on its device (parameters are cast to it, as the plain path does), so it is device and dtype
agnostic.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch.autograd.function import once_differentiable

from .factorisation import as_matrix, increment_gradient
from .layer import SODALayer, kron_apply


class Piece(NamedTuple):
    """Rows [offset, offset + layer.shape[0]) of a host weight are the SODA layer's, with their
    factorisation `basis` (what factorisation.spectral_basis returned for those rows)."""

    offset: int
    layer: SODALayer
    basis: tuple[torch.Tensor, ...]


def _rotate(m: torch.Tensor, factors: list[torch.Tensor], side: str, transpose: bool = False) -> torch.Tensor:
    return kron_apply(m, [f.t() for f in factors] if transpose else factors, side)


def _params(piece: Piece) -> list[torch.Tensor]:
    return [piece.layer.spectrum, *piece.layer.rotation.matrices()]


def _split(pieces: tuple[Piece, ...], params: tuple[torch.Tensor, ...]):
    """(piece, spectrum, factors) for each piece, from the flat parameter list RebuiltWeight takes."""
    at = 0
    for piece in pieces:
        n = len(piece.layer.rotation.factors)
        yield piece, params[at], list(params[at + 1:at + 1 + n])
        at += 1 + n


def _rows(piece: Piece) -> slice:
    return slice(piece.offset, piece.offset + piece.layer.shape[0])


class RebuiltWeight(torch.autograd.Function):
    """W' of a host weight from the pieces' spectrum increments and factors; see the module docstring."""

    @staticmethod
    def forward(ctx, pieces, weight, *params):
        chunks, at = [], 0
        for piece, spectrum, factors in _split(pieces, params):
            rows = _rows(piece)
            if rows.start > at:
                chunks.append(weight[at:rows.start])
            chunks.append(piece.layer.merged(weight[rows], piece.basis, spectrum, factors))
            at = rows.stop
        if at < weight.shape[0]:
            chunks.append(weight[at:])
        out = chunks[0] if len(chunks) == 1 else torch.cat(chunks)
        ctx.pieces = pieces
        ctx.save_for_backward(out, *params)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        out, *params = ctx.saved_tensors
        grad_weight = grad.clone() if ctx.needs_input_grad[1] else None  # rows no piece covers: identity
        grads = []
        for piece, spectrum, factors in _split(ctx.pieces, params):
            rows, layer = _rows(piece), piece.layer
            w_prime, g = as_matrix(out[rows]), as_matrix(grad[rows])
            with torch.enable_grad():
                leaves = [f.detach().to(w_prime.dtype).requires_grad_() for f in factors]
                m = _rotate(w_prime, [f.detach() for f in leaves], layer.side, transpose=True).requires_grad_()
                grad_m, *grad_factors = torch.autograd.grad(_rotate(m, leaves, layer.side), [m, *leaves], g)
            grad_ds = increment_gradient(piece.basis, grad_m, layer.variant, layer.side)
            grads += [grad_ds.to(spectrum.dtype), *(gf.to(f.dtype) for gf, f in zip(grad_factors, factors))]
            if grad_weight is not None:
                grad_weight[rows] = grad_m.reshape(grad_weight[rows].shape)
        return None, grad_weight, *grads


def adapted_weight(weight: torch.Tensor, pieces: list[Piece]) -> torch.Tensor:
    """W' of `weight` (its row slices `pieces` SODA-adapted, the rest unchanged), differentiable in the pieces'
    spectrum increments and rotation factors (and in `weight`, should it require grad), keeping no
    intermediates for backward."""
    pieces = tuple(sorted(pieces, key=lambda p: p.offset))
    return RebuiltWeight.apply(pieces, weight, *(t for p in pieces for t in _params(p)))


def whole(layer: SODALayer, basis: tuple[torch.Tensor, ...]) -> list[Piece]:
    """The one piece of a weight that is all the layer's."""
    return [Piece(0, layer, basis)]

