"""Distances between two sets of images (B, 3, H, W), that need no downloaded network.

Multi-scale sliced Wasserstein distance (SWD) on Laplacian-pyramid patches: Karras et al.,
"Progressive Growing of GANs for Improved Quality, Stability, and Variation", ICLR 2018,
appendix D (their code: progressive_growing_of_gans/metrics/sliced_wasserstein.py). Each image
is split into a Laplacian pyramid (the 5-tap binomial filter, mirrored borders); from every
level, 7 x 7 neighbourhoods at random places are the descriptors; the SWD of the two descriptor
sets is the mean, over random unit directions, of the 1-D Wasserstein-1 distance of their
projections, x 1e3 as Karras reports it. One number per level, so the finest level (texture,
edges) and the coarsest (layout, colour) are scored apart. Two choices differ from Karras:
- levels go down to 8 x 8 (Karras stops at 16 x 16): our images are 32 x 32 and the layout is
  what the coarsest level should score;
- both sets are normalised per channel by the *reference* set's mean and deviation (Karras
  normalises each set by its own, which makes a set that differs only by a colour offset or
  contrast score 0): a shift in colour or contrast counts here.
Patch places and directions come from a seeded generator, so every method is scored with the
same ones.

Band-energy spectrum distance: the images' energy per octave band of the DCT (the `partition`
indicator's bands, per-image channel means removed), averaged over the set, in decibels; the
distance is the mean absolute difference over bands, in dB. This is the binned power spectrum
comparison of Durall et al., "Watch your Up-Convolution", CVPR 2020, coarsened to octaves. A set
at twice the amplitude of the other is 20 log10(2) = 6.02 dB away in every band.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..indicator import PARTITION, band_components

PATCH, PATCHES_PER_IMAGE, DIRECTIONS, REPEATS = 7, 128, 128, 4  # Karras's settings
SPECTRUM_BANDS = 5  # octaves of a 32 x 32 image: the top octave below Nyquist and four below it
_BINOMIAL = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0


def _blur(x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    """The 5 x 5 binomial filter (separable), mirrored borders (scipy's 'mirror' is torch's 'reflect')."""
    c = x.shape[1]
    k = (_BINOMIAL * gain).to(x)
    x = F.pad(x, (2, 2, 2, 2), mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, 5).expand(c, 1, 1, 5), groups=c)
    return F.conv2d(x, k.view(1, 1, 5, 1).expand(c, 1, 5, 1), groups=c)


def _down(x: torch.Tensor) -> torch.Tensor:
    return _blur(x)[:, :, ::2, ::2]


def _up(x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    z = x.new_zeros(b, c, 2 * h, 2 * w)
    z[:, :, ::2, ::2] = x
    return _blur(z, 2.0)  # 4x the 2-D filter, split between the two passes


def laplacian_pyramid(images: torch.Tensor, levels: int) -> list[torch.Tensor]:
    """[finest band-pass, ..., coarsest low-pass], each half the size of the one before."""
    pyramid = [images.float()]
    for _ in range(levels - 1):
        pyramid.append(_down(pyramid[-1]))
        pyramid[-2] = pyramid[-2] - _up(pyramid[-1])
    return pyramid


def pyramid_sizes(size: int, smallest: int = 16) -> list[int]:
    """Side lengths of the pyramid levels of a size x size image: 32 -> [32, 16, 8]."""
    sizes = []
    while size >= smallest:
        sizes.append(size)
        size //= 2
    return sizes


def _places(b: int, h: int, w: int, per_image: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """(image, row, column) index grids of `per_image` random 7 x 7 neighbourhoods per image, wholly
    inside it, each (N, 7, 7)."""
    half, n = PATCH // 2, b * per_image
    ys = torch.randint(half, h - half, (n,), generator=g)
    xs = torch.randint(half, w - half, (n,), generator=g)
    offsets = torch.arange(-half, half + 1)
    rows = (ys[:, None] + offsets)[:, :, None].expand(n, PATCH, PATCH)
    cols = (xs[:, None] + offsets)[:, None, :].expand(n, PATCH, PATCH)
    return torch.arange(b).repeat_interleave(per_image)[:, None, None].expand(n, PATCH, PATCH), rows, cols


class SlicedWasserstein:
    """SWD x 1e3 per pyramid level (finest first) of image sets against one reference set.

    The reference's descriptors, normalisation and sorted projections are computed once, so scoring
    many sets (methods, seeds) against it costs one side each; every set is cut at the same places
    and projected on the same directions. Fewer patches or directions than Karras's make it cheaper
    and noisier (tests).
    """

    def __init__(self, reference: torch.Tensor, seed: int = 0, patches_per_image: int = PATCHES_PER_IMAGE,
                 directions: int = REPEATS * DIRECTIONS):
        self.shape = tuple(reference.shape)
        g = torch.Generator().manual_seed(seed)
        self.levels = []
        for level in laplacian_pyramid(reference, len(pyramid_sizes(reference.shape[-1]))):
            places = _places(level.shape[0], level.shape[2], level.shape[3], patches_per_image, g)
            patches = _cut(level, places)
            mean, std = patches.mean(dim=(0, 2, 3), keepdim=True), patches.std(dim=(0, 2, 3), keepdim=True) + 1e-8
            dirs = torch.randn(patches[0].numel(), directions, generator=g)
            dirs = dirs / dirs.norm(dim=0, keepdim=True)
            self.levels.append((places, mean, std, dirs, _sorted_projections((patches - mean) / std, dirs)))

    def __call__(self, images: torch.Tensor) -> list[float]:
        if tuple(images.shape) != self.shape:
            raise ValueError(f"SWD compares equal-sized sets: got {tuple(images.shape)}, the reference is {self.shape}")
        out = []
        for level, (places, mean, std, dirs, theirs) in zip(laplacian_pyramid(images, len(self.levels)), self.levels):
            mine = _sorted_projections((_cut(level, places) - mean) / std, dirs)
            # The 1-D W1 distance of equal-sized samples pairs them in sorted order; mean over directions
            # (all repeats at once: the mean of the repeats' means is the mean over all directions).
            out.append(1e3 * float(np.abs(mine - theirs).mean()))
        return out


def _cut(level: torch.Tensor, places) -> torch.Tensor:
    img, rows, cols = places
    return level.permute(0, 2, 3, 1)[img, rows, cols].permute(0, 3, 1, 2)  # (N, C, 7, 7)


def _sorted_projections(patches: torch.Tensor, dirs: torch.Tensor) -> np.ndarray:
    """(directions, N): each direction's projections of the flattened patches, sorted (numpy's sort is
    about 10x torch's on CPU)."""
    return np.sort((patches.flatten(1) @ dirs).T.numpy(), axis=1)


def swd_levels(images: torch.Tensor, reference: torch.Tensor, seed: int = 0) -> list[float]:
    """SWD x 1e3 per pyramid level, finest first, of `images` against `reference` (equal counts)."""
    return SlicedWasserstein(reference, seed)(images)


def band_spectrum(images: torch.Tensor, bands: int = SPECTRUM_BANDS) -> torch.Tensor:
    """(bands,) mean energy per image in each DCT octave band, channel means removed, in dB (low band first)."""
    x = images.float()
    x = x - x.mean(dim=(2, 3), keepdim=True)
    energy = torch.stack([c.pow(2).sum(dim=(1, 2, 3)) for c in band_components(x, bands, PARTITION)], dim=1)
    return 10 * torch.log10(energy.mean(0) + 1e-12)


def spectrum_distance(images: torch.Tensor, reference: torch.Tensor, bands: int = SPECTRUM_BANDS) -> float:
    """Mean absolute difference, in dB, of the two sets' band spectra."""
    return (band_spectrum(images, bands) - band_spectrum(reference, bands)).abs().mean().item()

