"""Sampling on comfy_host's tiny models, shared by host tests and benchmarks.

The tiny SD1.5 model with an adapter strong enough to see, two latent rows of very different
spectra, and its conds and sampler call; for every tiny family, an adapter on its attention
(joint attention included) and a short two-row run.
"""
import torch

from comfy_host import TINY_CONTEXT, random_adapter, setup_comfy, tiny_model

setup_comfy()
import comfy.model_management  # noqa: E402
import comfy.sample  # noqa: E402

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
JOINT_ATTENTION = ATTENTION + ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


def tiny_patcher(dtype=torch.float32, seed=0):
    return tiny_model("sd15", seed, dtype)


def make_adapter(model, seed=2, targets=ATTENTION):
    """Experts strong enough to move the tiny model's samples by about 0.35 (max abs, on outputs
    up to 60), 1000x the tolerance of the equality checks; seed 2's router is not saturated, so
    rows with different spectra get visibly different mixes."""
    return random_adapter(model, seed, targets, up_std=5.0, base_model="sd15")


def latents():
    """Two rows with very different spectra: smooth, and a pixel checkerboard."""
    yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    smooth = torch.sin(xx / 4 + yy / 5).expand(4, 8, 8) * 3
    checker = ((xx + yy) % 2 * 2 - 1).expand(4, 8, 8) * 3
    return torch.stack([smooth, checker])


def conds(seed=3):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, 77, 32, generator=gen), {}]], [[torch.randn(1, 77, 32, generator=gen), {}]]


def sample(patcher, positive=None, negative=None, steps=3, cfg=5.0, denoise=0.7, sampler="euler", scheduler="normal"):
    pos, neg = conds()
    gen = torch.Generator().manual_seed(7)
    noise = torch.randn(2, 4, 8, 8, generator=gen)
    out = comfy.sample.sample(patcher, noise, steps, cfg, sampler, scheduler, positive or pos, negative or neg,
                              latents(), denoise=denoise, seed=7, disable_pbar=True)
    comfy.model_management.unload_all_models()
    return out


def sample_one(patcher, positive, negative, steps, scheduler="normal"):
    """One latent row from seed 5, sampled with euler (what the bake tests replay with hook keyframes)."""
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    out = comfy.sample.sample(patcher, noise, steps, 5.0, "euler", scheduler, positive, negative,
                              torch.zeros(1, 4, 8, 8), seed=5, disable_pbar=True)
    comfy.model_management.unload_all_models()
    return out


def adapter_for(model, seed=1):
    """An adapter for a tiny model of any family (comfy_host.TINY_FAMILIES)."""
    return random_adapter(model, seed, JOINT_ATTENTION, up_std=3.0, router_std=0.5, alpha=2.0)


def run(patcher, cfg=3.0):
    """Two steps on two rows (smooth, checkerboard) with conds of the tiny families' widths."""
    channels = patcher.model.latent_format.latent_channels
    gen = torch.Generator().manual_seed(4)
    cond = lambda: [[torch.randn(1, 7, TINY_CONTEXT, generator=gen),
                     {"pooled_output": torch.randn(1, TINY_CONTEXT, generator=gen)}]]
    pos, neg = cond(), cond()
    yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    lat = torch.stack([torch.sin(xx / 4 + yy / 5).expand(channels, 8, 8), ((xx + yy) % 2 * 2 - 1).expand(channels, 8, 8)])
    out = comfy.sample.sample(patcher, torch.randn(2, channels, 8, 8, generator=gen), 2, cfg, "euler", "simple",
                              pos, neg, lat * 2, denoise=0.8, seed=4, disable_pbar=True)
    comfy.model_management.unload_all_models()
    return out
