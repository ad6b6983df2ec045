"""Frequency-Energy Indicator (FEI): how a latent's energy is spread over frequency bands.

Two definitions, recorded in every adapter file, because a router's weights only mean
something with the indicator it was trained on:

- ``reference``: the authors' code exactly. Difference-of-Gaussians with
  sigma_k = min(H, W) / 128 * 2**k, kernel size int(8 sigma + 1) | 1, zero padding;
  components ordered low-pass first, and the finest band (z - G_s0 z) dropped.
- ``partition``: an orthonormal DCT-II (the transform of a reflect-extended signal, so no
  border leakage) whose coefficients are split into n radial-frequency bands. The bands
  partition the latent: components sum to z and energies sum to ||z||^2 (Parseval). Like
  the reference's DoG bands they are octaves, but anchored at the pixel grid: the finest
  band is the top octave below Nyquist (radial frequency >= 0.25 cycles per pixel), each
  lower band one octave below, the low band all the rest. The reference's kappa would push
  its finest band above Nyquist on small latents (32 x 32), leaving it empty.

Both are computed as small matrix products (a 2-D Gaussian or DCT is separable), in
float32 on the input's device, with no host-device synchronisation. Video latents
(B, C, T, H, W) are read per clip: the frames are folded into channels, because the
router gives one expert mix per batch row and a row is a whole clip. Temporal frequency is not
measured: the bands are spatial, as in the method, so one definition serves images, single-frame
latents of Wan-format image models (T = 1, no temporal spectrum) and clips of any length, and a
clip's energies are those of its frames pooled (coarse layout vs. fine texture over the steps).
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch

REFERENCE = "reference"
PARTITION = "partition"
DEFINITIONS = (REFERENCE, PARTITION)

_EPS = 1e-8


def check_definition(definition: str) -> str:
    if definition not in DEFINITIONS:
        raise ValueError(f"unknown indicator definition {definition!r}; expected one of {DEFINITIONS}")
    return definition


def check_bands(num_bands) -> int:
    if not isinstance(num_bands, int) or isinstance(num_bands, bool) or num_bands < 1:
        raise ValueError(f"num_bands must be a positive integer, got {num_bands!r}")
    return num_bands


def reference_sigmas(height: int, width: int, num_bands: int) -> list[float]:
    kappa = min(height, width) / 128.0
    return [kappa * 2**k for k in range(num_bands)]


def _blur_matrix(size: int, sigma: float) -> torch.Tensor:
    """(size, size) matrix M with M @ v == the reference's zero-padded 1-D Gaussian blur of v."""
    if sigma <= 0:
        return torch.eye(size, dtype=torch.float64)
    k = int(2 * 4 * sigma + 1) | 1
    taps = torch.arange(k, dtype=torch.float64) - (k - 1) / 2.0
    g = torch.exp(-(taps**2) / (2.0 * sigma**2))
    g = g / g.sum()
    offset = torch.arange(size)[None, :] - torch.arange(size)[:, None] + k // 2
    inside = (offset >= 0) & (offset < k)
    return torch.where(inside, g[offset.clamp(0, k - 1)], torch.zeros((), dtype=torch.float64))


def _dct_matrix(size: int) -> torch.Tensor:
    """Orthonormal DCT-II matrix (rows are frequencies)."""
    n = torch.arange(size, dtype=torch.float64)
    d = torch.cos(math.pi * (n[None, :] + 0.5) * n[:, None] / size) * math.sqrt(2.0 / size)
    d[0] /= math.sqrt(2.0)
    return d


def _partition_masks(height: int, width: int, num_bands: int) -> torch.Tensor:
    """(n, H, W) 0/1 masks over DCT coefficients, low band first; they sum to one everywhere."""
    fy = torch.arange(height, dtype=torch.float64) / (2.0 * height)
    fx = torch.arange(width, dtype=torch.float64) / (2.0 * width)
    radius = torch.sqrt(fy[:, None] ** 2 + fx[None, :] ** 2)
    edges = [0.5 / 2**k for k in range(num_bands - 1, 0, -1)]
    band = torch.bucketize(radius, torch.tensor(edges, dtype=torch.float64), right=True)
    return torch.stack([(band == k) for k in range(num_bands)]).to(torch.float64)


@lru_cache(maxsize=128)
def _device_copy(builder, args: tuple, device: torch.device) -> torch.Tensor:
    return builder(*args).to(device=device, dtype=torch.float32)


def _on(builder, args: tuple, like: torch.Tensor) -> torch.Tensor:
    """builder(*args) as float32 on like's device, built once per device: no host copy per call."""
    return _device_copy(builder, args, like.device)


def _as_images(z: torch.Tensor) -> torch.Tensor:
    if z.ndim == 5:
        b, c, t, h, w = z.shape
        return z.reshape(b, c * t, h, w)
    if z.ndim != 4:
        raise ValueError(f"expected a latent of shape (B, C, H, W) or (B, C, T, H, W), got {tuple(z.shape)}")
    return z


def band_components(z: torch.Tensor, num_bands: int = 3, definition: str = REFERENCE) -> list[torch.Tensor]:
    """The n band components of z (float32, z's shape), low-pass first."""
    check_definition(definition)
    check_bands(num_bands)
    x = _as_images(z).float()
    h, w = x.shape[-2:]
    if definition == REFERENCE:
        sigmas = reference_sigmas(h, w, num_bands)
        blurred = [_on(_blur_matrix, (h, s), x) @ x @ _on(_blur_matrix, (w, s), x).T for s in sigmas]
        pyramid = [x, *blurred]
        comps = [pyramid[-1]] + [pyramid[i] - pyramid[i + 1] for i in range(num_bands - 1, -1, -1)]
        comps = comps[:num_bands]
    else:
        dh, dw = _on(_dct_matrix, (h,), x), _on(_dct_matrix, (w,), x)
        coeffs = dh @ x @ dw.T
        masks = _on(_partition_masks, (h, w, num_bands), x)
        comps = [dh.T @ (coeffs * m) @ dw for m in masks]
    return [c.reshape(z.shape) for c in comps]


def band_energies(z: torch.Tensor, num_bands: int = 3, definition: str = REFERENCE) -> torch.Tensor:
    """Normalised band energies e_t, shape (B, n), float32, low band first.

    Rows whose latent is all zeros get all-zero energies (as in the reference); rows with
    non-finite values get all-zero energies too, so the router still returns a finite mix.
    """
    check_definition(definition)
    check_bands(num_bands)
    if definition == PARTITION:
        # Parseval: the energy of a band is the energy of its DCT coefficients.
        x = _as_images(z).float()
        h, w = x.shape[-2:]
        coeffs = _on(_dct_matrix, (h,), x) @ x @ _on(_dct_matrix, (w,), x).T
        power = (coeffs**2).sum(dim=1)  # (B, H, W)
        masks = _on(_partition_masks, (h, w, num_bands), x)
        energy = torch.einsum("bhw,nhw->bn", power, masks)
    else:
        comps = band_components(z, num_bands, definition)
        energy = torch.stack([c.flatten(1).pow(2).sum(1) for c in comps], dim=1)
    e = energy / (energy.sum(dim=1, keepdim=True) + _EPS)
    return e.masked_fill(~torch.isfinite(e).all(dim=1, keepdim=True), 0.0)
