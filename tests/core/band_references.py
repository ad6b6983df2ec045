"""Independent re-implementations of the indicator's two band decompositions, for the tests to compare
fera_core against: the reference's difference-of-Gaussians as a 2-D F.conv2d, the partition with scipy's
orthonormal DCT (skipped without scipy)."""
import pytest
import torch
import torch.nn.functional as F


def gaussian_blur_2d(z: torch.Tensor, sigma: float) -> torch.Tensor:
    """The reference's blur as its docs describe it: normalised 2-D kernel, depthwise, zero padding."""
    if sigma <= 0:
        return z
    size = int(8 * sigma + 1) | 1
    ax = torch.arange(size, dtype=torch.float64) - size // 2
    kernel = torch.exp(-(ax[:, None] ** 2 + ax[None, :] ** 2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    c = z.shape[1]
    return F.conv2d(z.double(), kernel.expand(c, 1, size, size), padding=size // 2, groups=c)


def reference_dog(z: torch.Tensor, n: int) -> list[torch.Tensor]:
    """All n+1 reference components, low-pass first, the finest band (z - G_s0 z) last."""
    kappa = min(z.shape[-2:]) / 128
    pyramid = [z.double()] + [gaussian_blur_2d(z, kappa * 2**k) for k in range(n)]
    return [pyramid[-1]] + [pyramid[i] - pyramid[i + 1] for i in range(n - 1, -1, -1)]


def partition_by_scipy(z: torch.Tensor, n: int) -> list[torch.Tensor]:
    """DCT-II (orthonormal) coefficients split by radial frequency in cycles/pixel: the finest band is
    r >= 0.25, each lower band one octave below, the low band the rest."""
    fft = pytest.importorskip("scipy.fft")
    import numpy as np

    h, w = z.shape[-2:]
    coeffs = fft.dctn(z.double().numpy(), type=2, norm="ortho", axes=(-2, -1))
    r = np.sqrt((np.arange(h)[:, None] / (2 * h)) ** 2 + (np.arange(w)[None, :] / (2 * w)) ** 2)
    band = sum((r >= 0.5 / 2 ** (n - j)).astype(int) for j in range(1, n))
    return [torch.from_numpy(fft.idctn(coeffs * (band == k), type=2, norm="ortho", axes=(-2, -1))) for k in range(n)]
