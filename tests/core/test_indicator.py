"""Frequency-Energy Indicator: both definitions checked on inputs whose answer is known by hand,
against independent re-implementations (a 2-D Gaussian F.conv2d for the reference definition,
scipy's orthonormal DCT for the partition), and on awkward inputs (5-D, fp16/bf16, zeros, NaN)."""
import math

import pytest
import torch
import torch.nn.functional as F

from fera_core import PARTITION, REFERENCE, SoftFrequencyRouter, band_components, band_energies
from fera_core.indicator import reference_sigmas

from band_references import gaussian_blur_2d, partition_by_scipy, reference_dog


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def smooth_latent(b=1, c=4, h=32, w=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(b, c, 4, 4, generator=g)
    return F.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=True)


def checkerboard(b=1, c=4, h=32, w=32):
    return ((torch.arange(h)[:, None] + torch.arange(w)[None, :]) % 2 * 2.0 - 1.0).expand(b, c, h, w).contiguous()


def dct_basis(k_y: int, k_x: int, h=32, w=32, c=4):
    ny, nx = torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64)
    pattern = torch.cos(math.pi * (ny[:, None] + 0.5) * k_y / h) * torch.cos(math.pi * (nx[None, :] + 0.5) * k_x / w)
    return pattern.float().expand(1, c, h, w).contiguous()


# ---------------------------------------------------------------- reference definition

def test_reference_sigmas_follow_the_latent_size():
    assert reference_sigmas(64, 64, 3) == [0.5, 1.0, 2.0]  # SD1.5
    assert reference_sigmas(128, 128, 3) == [1.0, 2.0, 4.0]  # SDXL
    assert reference_sigmas(96, 64, 3) == [0.5, 1.0, 2.0]  # min(H, W)


@pytest.mark.parametrize("shape,n", [((2, 4, 32, 32), 3), ((1, 3, 64, 48), 3), ((1, 2, 128, 128), 3),
                                     ((1, 2, 64, 64), 4), ((1, 4, 40, 72), 2)])
def test_reference_components_equal_a_2d_gaussian_conv(shape, n):
    z = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    ours = band_components(z, n, REFERENCE)
    theirs = reference_dog(z, n)
    assert len(ours) == n
    for k in range(n):
        assert ours[k].shape == z.shape and ours[k].dtype == torch.float32
        assert rel(ours[k], theirs[k]) < 1e-5, k
    energy = torch.stack([c.flatten(1).pow(2).sum(1) for c in theirs[:n]], 1)
    expected = energy / (energy.sum(1, keepdim=True) + 1e-8)
    assert torch.allclose(band_energies(z, n, REFERENCE).double(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("size", [32, 128])
def test_reference_kept_components_plus_dropped_finest_band_sum_to_z(size):
    z = torch.randn(2, 4, size, size, generator=torch.Generator().manual_seed(2))
    kept = torch.stack(band_components(z, 3, REFERENCE)).sum(0).double()
    finest = z.double() - gaussian_blur_2d(z, reference_sigmas(size, size, 3)[0])
    assert (kept + finest - z.double()).abs().max() < 1e-5
    # What the drop costs: on white noise at 128x128 (sigma_0 = 1) the finest band carries most of
    # the energy; at 32x32 (sigma_0 = 0.25, a 3-tap kernel) it is almost empty.
    dropped_share = finest.pow(2).sum() / z.double().pow(2).sum()
    assert dropped_share > 0.5 if size == 128 else dropped_share < 1e-4


def test_reference_zero_padding_leaks_energy_of_a_constant_latent():
    z = torch.full((1, 4, 32, 32), 3.0)
    ref = band_energies(z, 3, REFERENCE)[0]
    part = band_energies(z, 3, PARTITION)[0]
    # Zero padding darkens the border of the blurred constant: energy shows up in the band-pass bands.
    assert ref[0] < 0.999 and ref[1:].sum() > 1e-3
    assert torch.allclose(part, torch.tensor([1.0, 0.0, 0.0]), atol=1e-6)
    # The band-pass energy sits at the border: the interior of a component is ~0.
    band1 = band_components(z, 3, REFERENCE)[1][0, 0]
    assert band1[8:-8, 8:-8].abs().max() < 1e-5 < 0.1 < band1[0].abs().max()


# ---------------------------------------------------------------- partition definition

def test_partition_constant_latent_is_all_low_band():
    e = band_energies(torch.full((2, 4, 32, 32), -1.5), 3, PARTITION)
    assert torch.allclose(e, torch.tensor([[1.0, 0.0, 0.0]] * 2), atol=1e-6)


def test_partition_checkerboard_is_almost_all_last_band():
    e = band_energies(checkerboard(), 3, PARTITION)[0]
    assert e[-1] > 0.99 and e[0] < 1e-3


@pytest.mark.parametrize("k,band", [(0, 0), (4, 0), (7, 0), (8, 1), (15, 1), (16, 2), (31, 2)])
def test_partition_dct_basis_lands_in_its_octave(k, band):
    """Band edges at 0.125 and 0.25 cycles/pixel: DCT index k of 32 is k/64 cycles/pixel."""
    e = band_energies(dct_basis(0, k), 3, PARTITION)[0]
    assert e[band] > 1 - 1e-5


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_partition_components_sum_to_z_and_energies_to_norm(n):
    z = torch.randn(3, 4, 24, 40, generator=torch.Generator().manual_seed(3))
    comps = band_components(z, n, PARTITION)
    assert len(comps) == n
    assert torch.allclose(torch.stack(comps).sum(0), z, atol=1e-5)
    comp_energy = torch.stack([c.flatten(1).pow(2).sum(1) for c in comps], 1)
    assert torch.allclose(comp_energy.sum(1), z.flatten(1).pow(2).sum(1), rtol=1e-5)
    e = band_energies(z, n, PARTITION)
    assert torch.allclose(e.sum(1), torch.ones(3), atol=1e-6)
    assert torch.allclose(e, comp_energy / comp_energy.sum(1, keepdim=True), atol=1e-6)


@pytest.mark.parametrize("shape,n", [((2, 4, 32, 32), 3), ((1, 2, 24, 40), 4)])
def test_partition_equals_scipy_dct(shape, n):
    z = torch.randn(shape, generator=torch.Generator().manual_seed(4))
    for ours, theirs in zip(band_components(z, n, PARTITION), partition_by_scipy(z, n)):
        assert rel(ours, theirs) < 1e-5


# ---------------------------------------------------------------- both definitions

def test_definitions_agree_on_the_order_of_frequencies():
    """Both move energy out of the low band and towards the high band as a cosine's frequency rises.
    They differ in how: the partition switches band at octave edges, the DoG shifts gradually."""
    ks = [0, 1, 2, 4, 6, 8, 12, 16, 20, 24, 31]
    z = torch.cat([dct_basis(0, k) for k in ks])
    for definition in (REFERENCE, PARTITION):
        e = band_energies(z, 3, definition)
        low, centroid = e[:, 0], (e * torch.arange(3.0)).sum(1)
        assert (low[1:] <= low[:-1] + 1e-6).all(), definition
        assert (centroid[1:] >= centroid[:-1] - 1e-6).all(), definition
        assert low[0] > 0.98 and low[-1] < 0.01, definition
    ref, part = band_energies(z, 3, REFERENCE), band_energies(z, 3, PARTITION)
    # Where they differ: only the partition sums the components back to z (reference: z - finest band).
    assert not torch.allclose(ref, part, atol=0.05)


@pytest.mark.parametrize("definition", [REFERENCE, PARTITION])
def test_energies_are_scale_invariant_and_normalised(definition):
    z = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(5))
    e = band_energies(z, 3, definition)
    assert e.shape == (2, 3) and e.dtype == torch.float32
    assert torch.allclose(e.sum(1), torch.ones(2), atol=1e-6)
    assert (e >= 0).all()
    assert torch.allclose(band_energies(z * 7.3, 3, definition), e, atol=1e-6)
    assert torch.allclose(band_energies(z / math.sqrt(14.6**2 + 1), 3, definition), e, atol=1e-6)


@pytest.mark.parametrize("definition", [REFERENCE, PARTITION])
def test_smooth_and_noisy_rows_differ_and_route_differently(definition):
    z = torch.cat([smooth_latent(), torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(6)),
                   smooth_latent()])
    e = band_energies(z, 3, definition)
    assert e[0, 0] > 0.9 and e[1, 0] < e[0, 0] - 0.3  # smooth is low-band; noise is not
    assert e[1, -1] > e[0, -1] + 0.1
    torch.manual_seed(7)
    router = SoftFrequencyRouter(3, 3)
    for p in router.parameters():
        torch.nn.init.normal_(p, std=0.5)
    w = router(e)
    assert (w[0] - w[1]).abs().max() > 1e-2  # different spectra, different routing
    # Identical rows, identical routing; to float32 rounding, not bitwise: the indicator's and
    # router's matrix products may round differently per batch row (kernels vary by position
    # and CPU). 1e-6 is ~8 ulps at 1.0 and under 1e-4 of the 1e-2 between different spectra.
    assert torch.allclose(w[0], w[2], rtol=0, atol=1e-6)


@pytest.mark.parametrize("definition", [REFERENCE, PARTITION])
def test_video_latents_fold_frames_into_channels(definition):
    z = torch.randn(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(8))
    folded = z.reshape(2, 12, 32, 32)
    assert torch.equal(band_energies(z, 3, definition), band_energies(folded, 3, definition))
    for comp5, comp4 in zip(band_components(z, 3, definition), band_components(folded, 3, definition)):
        assert comp5.shape == z.shape
        assert torch.equal(comp5.reshape(2, 12, 32, 32), comp4)
    # One routing row per clip, not per frame.
    assert band_energies(z, 3, definition).shape == (2, 3)


@pytest.mark.parametrize("definition", [REFERENCE, PARTITION])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inputs_give_float32_energies(definition, dtype):
    """Half-precision latents are read in float32: the energies are those of the rounded latent (atol 1e-7,
    the smallest band here is 3e-5), and within eps * sqrt(e_k) of the unrounded latent's -- the bound on
    the cross term between band k and the rounding error (Cauchy-Schwarz); measured at most 5% of it."""
    z = torch.cat([smooth_latent(), torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(9))])
    e = band_energies(z.to(dtype), 3, definition)
    assert e.dtype == torch.float32
    torch.testing.assert_close(e, band_energies(z.to(dtype).float(), 3, definition), rtol=0, atol=1e-7)
    full = band_energies(z, 3, definition)
    assert full.min() > 100 * 1e-7  # zeroing or swapping any band is far outside both tolerances
    assert ((e - full).abs() <= torch.finfo(dtype).eps * full.sqrt()).all()
    for comp in band_components(z.to(dtype), 3, definition):
        assert comp.dtype == torch.float32


@pytest.mark.parametrize("definition", [REFERENCE, PARTITION])
def test_large_fp16_latent_does_not_overflow(definition):
    """Sum of squares of a 4x128x128 latent of magnitude ~200 is ~1e10, far beyond fp16's 65504."""
    z = torch.randn(1, 4, 128, 128, generator=torch.Generator().manual_seed(10)) * 200
    e = band_energies(z.half(), 3, definition)
    assert torch.isfinite(e).all() and abs(e.sum().item() - 1) < 1e-5
    assert torch.allclose(e, band_energies(z, 3, definition), atol=1e-3)


@pytest.mark.parametrize("definition", [REFERENCE, PARTITION])
def test_zero_and_non_finite_rows_give_zero_energies_and_finite_routing(definition):
    z = torch.randn(5, 4, 32, 32, generator=torch.Generator().manual_seed(11))
    z[1] = 0
    z[2, 0, 3, 3] = float("nan")
    z[3, 1, 0, 0] = float("inf")
    z[4, 2, 5, 5] = float("-inf")
    e = band_energies(z, 3, definition)
    assert torch.isfinite(e).all()
    assert torch.equal(e[1:], torch.zeros(4, 3))  # documented: all-zero energies
    assert torch.allclose(e[0], band_energies(z[:1], 3, definition)[0])  # other rows unaffected
    router = SoftFrequencyRouter(3, 3)
    w = router(e)
    assert torch.isfinite(w).all()
    assert torch.allclose(w.sum(1), torch.ones(5))
    # Non-finite rows are routed as an all-zero latent (to float32 rounding: different batch
    # rows, see above), unlike a real latent.
    assert torch.allclose(w[1], w[2], rtol=0, atol=1e-6) and (w[0] - w[1]).abs().max() > 1e-3


@pytest.mark.parametrize("bad,match", [
    (dict(z=torch.zeros(4, 32, 32)), r"expected a latent of shape \(B, C, H, W\) or \(B, C, T, H, W\), got \(4, 32, 32\)"),
    (dict(definition="fourier"), r"unknown indicator definition 'fourier'"),
    (dict(num_bands=0), r"num_bands must be a positive integer, got 0"),
    (dict(num_bands=2.0), r"num_bands must be a positive integer, got 2.0"),
])
@pytest.mark.parametrize("fn", [band_energies, band_components])
def test_bad_indicator_inputs_raise_clear_errors(fn, bad, match):
    kwargs = dict(z=torch.zeros(1, 4, 32, 32), num_bands=3, definition=REFERENCE) | bad
    with pytest.raises(ValueError, match=match):
        fn(**kwargs)
