"""The demo's own diffusion model: a tiny pixel-space flow-matching UNet in plain PyTorch, conditioned
on a class label, the synthetic image kinds it meets, and the script that trained its shipped weights.

Base classes are smooth: soft-edged discs on colour gradients (label 0) and slow two-colour waves
(label 1), no texture. The adaptation images differ at both ends of the spectrum: hard-edged
rectangles (coarse structure) filled with 2-pixel stripes (fine texture). They are taught as a new
class, label 2 (NEW), which the base model never saw: its embedding is the unlabelled one (NULL),
so before adaptation the model answers it as it answers no label, with discs and waves (the
class prior DreamBooth starts from). Labels 0 and 1 are what adaptation must not forget. Every
attention block has to_q/to_k/to_v/to_out Linear children, so FeRAModel finds them as it finds a
diffusers UNet's.

Train the shipped weights (settings in the README):
    python -m fera_core.demo.model --steps 2000 --batch 24 --ema 0.995 --out fera_core/assets/demo_base.safetensors
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..atomic import atomic_write

SIZE = 32
ASSET = Path(__file__).resolve().parents[1] / "assets" / "demo_base.safetensors"
CHANNELS = (16, 48, 64)
DISC, WAVE, NEW, NULL = 0, 1, 2, 3  # class labels; NULL: no label (trained by dropping labels)
LABELS = {"disc": DISC, "wave": WAVE, "new": NEW}
LABEL_DROPOUT = 0.1


def timestep_embedding(sigma: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal features of the noise level sigma in [0, 1] (scaled like 1000 timesteps)."""
    freqs = torch.exp(-math.log(10000.0) * torch.arange(dim // 2, device=sigma.device) / (dim // 2))
    args = sigma.float()[:, None] * 1000.0 * freqs[None]
    return torch.cat([args.sin(), args.cos()], dim=1)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, tdim: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.time = nn.Linear(tdim, cout)
        self.norm2, self.conv2 = nn.GroupNorm(8, cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x))) + self.time(temb)[:, :, None, None]
        return self.skip(x) + self.conv2(F.silu(self.norm2(h)))


class Attention(nn.Module):
    """Single-head self-attention over pixels, with diffusers' projection names."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.GroupNorm(8, dim)
        self.to_q, self.to_k, self.to_v, self.to_out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x):
        b, c, h, w = x.shape
        t = self.norm(x).flatten(2).transpose(1, 2)
        out = F.scaled_dot_product_attention(self.to_q(t), self.to_k(t), self.to_v(t))
        return x + self.to_out(out).transpose(1, 2).reshape(b, c, h, w)


class TinyFlowUNet(nn.Module):
    """Predicts the flow velocity noise - x0 for x_t = (1 - sigma) x0 + sigma noise (3 x 32 x 32, in [-1, 1]),
    given class labels cond (B,) (None: NULL, no label)."""

    def __init__(self, channels=CHANNELS, tdim: int = 128):
        super().__init__()
        c1, c2, c3 = channels
        self.tdim = tdim
        self.time_mlp = nn.Sequential(nn.Linear(tdim, tdim), nn.SiLU(), nn.Linear(tdim, tdim))
        self.label_emb = nn.Embedding(NULL + 1, tdim)
        self.conv_in = nn.Conv2d(3, c1, 3, padding=1)
        self.down = nn.ModuleList([ResBlock(c1, c1, tdim), ResBlock(c1, c2, tdim), ResBlock(c2, c3, tdim)])
        self.down_attn = nn.ModuleList([nn.Identity(), Attention(c2), Attention(c3)])  # no 1024-token attention
        self.up = nn.ModuleList([ResBlock(c3 + c2, c2, tdim), ResBlock(c2 + c1, c1, tdim)])
        self.up_attn = nn.ModuleList([Attention(c2), nn.Identity()])
        self.norm_out, self.conv_out = nn.GroupNorm(8, c1), nn.Conv2d(c1, 3, 3, padding=1)

    def forward(self, x, sigma, cond=None):
        labels = torch.full((x.shape[0],), NULL, device=x.device) if cond is None else cond.to(x.device)
        temb = self.time_mlp(timestep_embedding(sigma.expand(x.shape[0]), self.tdim)) + self.label_emb(labels)
        h = self.conv_in(x)
        skips = []
        for i, (block, attn) in enumerate(zip(self.down, self.down_attn)):
            if i:
                h = F.avg_pool2d(h, 2)
            h = attn(block(h, temb))
            skips.append(h)
        skips.pop()
        for block, attn in zip(self.up, self.up_attn):
            h = F.interpolate(h, scale_factor=2.0, mode="nearest")
            h = attn(block(torch.cat([h, skips.pop()], dim=1), temb))
        return self.conv_out(F.silu(self.norm_out(h)))


def load_base(path=ASSET) -> TinyFlowUNet:
    """The shipped base model (eval mode, frozen)."""
    model = TinyFlowUNet()
    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return model.eval().requires_grad_(False)


def _grid(n: int, g: torch.Generator):
    yy, xx = torch.meshgrid(torch.arange(SIZE, dtype=torch.float32), torch.arange(SIZE, dtype=torch.float32),
                            indexing="ij")
    return yy.expand(n, SIZE, SIZE), xx.expand(n, SIZE, SIZE)


def _colours(n: int, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, 3, 1, 1, generator=g) * 2 - 1


def _soft_shapes(n: int, g: torch.Generator, inside) -> torch.Tensor:
    """One or two soft-edged shapes on a smooth two-colour gradient; inside(dy, dx, size) is the signed
    distance (pixels, positive inside) from a shape's edge."""
    yy, xx = _grid(n, g)
    angle = torch.rand(n, 1, 1, generator=g) * 2 * math.pi
    ramp = ((xx - 15.5) * angle.cos() + (yy - 15.5) * angle.sin()) / 45 + 0.5
    img = _colours(n, g) * (1 - ramp[:, None]) + _colours(n, g) * ramp[:, None]
    for k in range(2):
        centre = torch.rand(n, 2, 1, 1, generator=g) * 16 + 8
        size = torch.rand(n, 1, 1, generator=g) * 6 + 5
        mask = torch.sigmoid(inside(yy - centre[:, 0], xx - centre[:, 1], size) / 1.5)[:, None]
        if k:
            mask = mask * (torch.rand(n, 1, 1, 1, generator=g) < 0.5)
        img = img * (1 - mask) + _colours(n, g) * mask
    return img.clamp(-1, 1)


def soft_discs(n: int, g: torch.Generator) -> torch.Tensor:
    """Label 0: one or two soft-edged discs (radius 5-11) on a smooth gradient."""
    return _soft_shapes(n, g, lambda dy, dx, radius: radius - (dy**2 + dx**2).sqrt())


def soft_waves(n: int, g: torch.Generator) -> torch.Tensor:
    """Label 1: a smooth wave between two colours (period 10-20 pixels, any direction and phase)."""
    yy, xx = _grid(n, g)
    angle = torch.rand(n, 1, 1, generator=g) * math.pi
    period = torch.rand(n, 1, 1, generator=g) * 10 + 10
    phase = torch.rand(n, 1, 1, generator=g) * 2 * math.pi
    wave = 0.5 + 0.5 * torch.sin(2 * math.pi * (xx * angle.cos() + yy * angle.sin()) / period + phase)
    return (_colours(n, g) * (1 - wave[:, None]) + _colours(n, g) * wave[:, None]).clamp(-1, 1)


def base_images(labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Images of the base classes for labels (B,) of DISC or WAVE."""
    n = labels.shape[0]
    return torch.where((labels == DISC)[:, None, None, None], soft_discs(n, g), soft_waves(n, g))


def striped_tiles(n: int, g: torch.Generator) -> torch.Tensor:
    """Adaptation images: a hard-edged rectangle filled with 2-pixel stripes on a flat background."""
    yy, xx = _grid(n, g)
    lo = torch.rand(n, 2, 1, 1, generator=g) * 10 + 3
    hi = lo + torch.rand(n, 2, 1, 1, generator=g) * 8 + 11
    inside = ((yy >= lo[:, 0]) & (yy < hi[:, 0]) & (xx >= lo[:, 1]) & (xx < hi[:, 1]))[:, None].float()
    vertical = torch.rand(n, 1, 1, generator=g) < 0.5
    stripes = ((torch.where(vertical, xx, yy) // 2) % 2)[:, None]
    a, b = _colours(n, g), _colours(n, g)
    tile = a * stripes + (-a * 0.8) * (1 - stripes)
    return (b * (1 - inside) + tile * inside).clamp(-1, 1)


def flow_loss(model: nn.Module, x0: torch.Tensor, labels: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    sigma = torch.rand(x0.shape[0], generator=g)
    noise = torch.randn(x0.shape, generator=g)
    s = sigma[:, None, None, None]
    return F.mse_loss(model((1 - s) * x0 + s * noise, sigma, labels), noise - x0)


def train_base(steps: int, batch: int, lr: float, seed: int, ema_decay: float, log=print) -> TinyFlowUNet:
    """AdamW with cosine decay on fresh discs and waves every step, a tenth of them unlabelled (NULL);
    returns the EMA weights, with NEW's embedding set to NULL's."""
    torch.manual_seed(seed)
    model = TinyFlowUNet()
    ema = TinyFlowUNet().requires_grad_(False)
    ema.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 200) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    g = torch.Generator().manual_seed(seed)
    start, running = time.time(), None
    for step in range(steps):
        labels = torch.randint(DISC, WAVE + 1, (batch,), generator=g)
        shown = torch.where(torch.rand(batch, generator=g) < LABEL_DROPOUT, NULL, labels)
        loss = flow_loss(model, base_images(labels, g), shown, g)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            for pe, pm in zip(ema.parameters(), model.parameters()):
                pe.lerp_(pm, 1 - ema_decay)
        running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
        if step % 100 == 0 or step == steps - 1:
            log(f"step {step:5d}  loss {running:.4f}  {time.time() - start:6.0f} s")
    with torch.no_grad():
        ema.label_emb.weight[NEW] = ema.label_emb.weight[NULL]
    return ema.eval()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fera_core.demo.model", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=24)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--ema", type=float, default=0.995)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ASSET))
    args = p.parse_args(argv)
    model = train_base(args.steps, args.batch, args.lr, args.seed, args.ema)
    meta = {"trained_by": "python -m fera_core.demo.model", "settings": json.dumps(vars(args))}
    sd = {k: v.half().contiguous() for k, v in model.state_dict().items()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(args.out, lambda tmp: save_file(sd, tmp, metadata=meta))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
