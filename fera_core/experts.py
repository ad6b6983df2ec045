"""Routed experts: M LoRA experts of one frozen layer, mixed per batch row.

y = W x + sum_m alpha[b, m] * scale * up_m(down_m(x)). The M experts are stored
concatenated along the rank (down: (M*r, in), up: (out, M*r)), so the mix is two matmuls
with the hidden units scaled per row: no per-expert loop and no (B, M, tokens, out)
tensor, unlike the reference. Conv2d layers (UNet proj_in/proj_out) get a conv down
projection with the layer's own kernel and a 1x1 conv up projection, as LoRA does.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def expert_gains(routing: torch.Tensor, rank: int, scale: float, strength: float = 1.0) -> torch.Tensor:
    """Per-row multipliers of the concatenated hidden units: (B, M) -> (B, M * rank)."""
    return (routing * (scale * strength)).repeat_interleave(rank, dim=1)


def rows_for(gains: torch.Tensor, rows: int) -> torch.Tensor:
    """Gains for a layer that sees `rows` rows of a batch routed with len(gains) latents.

    A caller that stacks copies of the latent batch (classifier-free guidance as
    torch.cat([z] * k)) sends k * B rows; row i then belongs to latent i % B.
    """
    b = gains.shape[0]
    if rows == b:
        return gains
    if rows % b:
        raise ValueError(f"a layer received {rows} rows but the routing was computed for {b} latents; "
                         "the row count must be a multiple of the latent batch")
    return gains.repeat(rows // b, 1)


def add_experts(out: torch.Tensor, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor,
                gains: torch.Tensor, layer: nn.Module | None = None,
                out_slice: tuple[int, int] | None = None, dropout: float = 0.0) -> torch.Tensor:
    """Add the routed experts' update to a layer's output (in place where it can) and return it.

    down, up: concatenated expert weights, already on x's device and dtype.
    gains: (B, M * r) from expert_gains; tiled by rows_for when the layer sees more rows.
    layer: the frozen layer, for a Conv2d's stride, padding and dilation.
    out_slice: (offset, size) of the output features the experts write to, for layers that
        fuse several projections (Flux's qkv).
    """
    g = rows_for(gains, x.shape[0])
    if g.dtype != x.dtype:
        g = g.to(x.dtype)
    if down.ndim == 2 and not dropout and not torch.is_grad_enabled() and x.is_contiguous() and out.is_contiguous():
        # Sampling: three kernels, in place, no temporary of the output's size. On small
        # layers launch overhead, not arithmetic, is what the experts cost.
        h = torch.mm(x.view(-1, x.shape[-1]), down.t())
        h.view(g.shape[0], -1, h.shape[-1]).mul_(g[:, None])
        target = out.view(-1, out.shape[-1])
        if out_slice is not None:
            target = target.narrow(1, *out_slice)
        target.addmm_(h, up.t())
        return out
    if dropout:
        x = F.dropout(x, dropout, training=True)
    if down.ndim == 4:
        if layer is None:
            raise ValueError("conv experts need their frozen Conv2d layer (for its stride, padding and dilation); "
                             "pass layer=")
        h = F.conv2d(x, down, None, layer.stride, layer.padding, layer.dilation)
        update = F.conv2d(h * g[:, :, None, None], up)
    else:
        h = F.linear(x, down)
        update = F.linear(h * g.view(g.shape[0], *([1] * (h.ndim - 2)), g.shape[1]), up)
    if out_slice is None:
        return out + update
    start, size = out_slice
    dim = 1 if down.ndim == 4 else -1
    return torch.cat([out.narrow(dim, 0, start), out.narrow(dim, start, size) + update,
                      out.narrow(dim, start + size, out.shape[dim] - start - size)], dim=dim)


class RoutedExperts(nn.Module):
    """The M experts of one adapted Linear or Conv2d, concatenated along the rank.

    Initialised as the reference does each expert: down Kaiming-uniform (a = sqrt 5),
    up zeros, so a fresh adapter leaves the model unchanged.
    """

    def __init__(self, in_features: int, out_features: int, num_experts: int = 3, rank: int = 4,
                 alpha: float = 1.0, kernel_size: tuple[int, int] | None = None):
        super().__init__()
        self.num_experts, self.rank, self.scale = num_experts, rank, alpha / rank
        k = tuple(kernel_size or ())
        down = torch.empty(num_experts, rank, in_features, *k)
        for d in down:
            nn.init.kaiming_uniform_(d, a=math.sqrt(5))
        self.down = nn.Parameter(down.flatten(0, 1))
        self.up = nn.Parameter(torch.zeros(out_features, num_experts * rank, *((1, 1) if k else ())))

    @property
    def in_features(self) -> int:
        return self.down.shape[1]

    @property
    def out_features(self) -> int:
        return self.up.shape[0]

    def add_to(self, out: torch.Tensor, x: torch.Tensor, routing: torch.Tensor, strength: float = 1.0,
               layer: nn.Module | None = None, out_slice: tuple[int, int] | None = None,
               dropout: float = 0.0) -> torch.Tensor:
        gains = expert_gains(routing, self.rank, self.scale, strength)
        return add_experts(out, x, self.down.to(x), self.up.to(x), gains, layer, out_slice, dropout)

    def split(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-expert (lora_down, lora_up) weights, as the reference stores them."""
        r = self.rank
        return [(self.down[m * r:(m + 1) * r], self.up[:, m * r:(m + 1) * r]) for m in range(self.num_experts)]

    @torch.no_grad()
    def load_split(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.down.copy_(torch.cat([d for d, _ in pairs]))
        self.up.copy_(torch.cat([u for _, u in pairs], dim=1))
