"""fera_core.compare.metrics against cases checkable by hand: a set scores 0 against itself, a colour offset
moves only the coarsest pyramid level and in the order of its size, blur costs fine-level score and not
coarse-level score, and doubling the amplitude moves every spectrum band by 20 log10 2 dB."""
import math

import pytest
import torch

from fera_core.compare.metrics import (SlicedWasserstein, band_spectrum, laplacian_pyramid, pyramid_sizes,
                                       spectrum_distance, swd_levels)
from fera_core.demo.model import soft_discs, striped_tiles

N = 32
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sets():
    g = torch.Generator().manual_seed(0)
    return striped_tiles(N, g), striped_tiles(N, g), soft_discs(N, g)


@pytest.fixture(scope="module")
def swd(sets):
    return SlicedWasserstein(sets[0], patches_per_image=32, directions=128)  # a quarter of Karras's, each


def binomial_blur(x):
    """The 1-2-1 filter, written out here (not the code under test), replicate borders."""
    p = torch.nn.functional.pad(x, (1, 1, 1, 1), mode="replicate")
    x = (p[..., :, :-2] + 2 * p[..., :, 1:-1] + p[..., :, 2:]) / 4
    return (x[..., :-2, :] + 2 * x[..., 1:-1, :] + x[..., 2:, :]) / 4


def test_levels_of_a_32_pixel_image_are_karras_levels():
    assert pyramid_sizes(32) == [32, 16] and pyramid_sizes(64) == [64, 32, 16]


def test_pyramid_of_a_constant_image_is_the_constant_at_the_coarsest_level():
    pyramid = laplacian_pyramid(torch.full((1, 3, 32, 32), 0.3), 3)
    assert [tuple(p.shape[-2:]) for p in pyramid] == [(32, 32), (16, 16), (8, 8)]
    assert all(p.abs().max() < 1e-6 for p in pyramid[:-1])  # no detail in a constant
    assert torch.allclose(pyramid[-1], torch.full_like(pyramid[-1], 0.3), atol=1e-6)


def test_identical_sets_score_zero(sets, swd):
    assert swd(sets[0]) == [0.0, 0.0]
    assert spectrum_distance(sets[0], sets[0]) == 0.0


def test_independent_draws_score_above_zero_and_other_images_far_more_at_the_fine_level(sets, swd):
    same_kind, other_kind = swd(sets[1]), swd(sets[2])
    assert all(v > 0 for v in same_kind)
    assert other_kind[0] > 4 * same_kind[0]  # discs against striped tiles: no stripes, no hard edges


def test_a_colour_offset_moves_only_the_coarsest_level_in_the_order_of_its_size(sets, swd):
    """A constant added to every pixel has no Laplacian detail, so the band-pass level is unchanged to the
    last bit of arithmetic, while the low-pass level's distance grows with the offset (the reference set's
    normalisation is applied to both: a set's own would hide the shift)."""
    offsets = (0.0, 0.1, 0.3, 0.6)
    scores = [swd(sets[1] + d) for d in offsets]
    assert all(abs(s[0] - scores[0][0]) < 1e-3 * scores[0][0] for s in scores)
    coarse = [s[-1] for s in scores]
    assert coarse == sorted(coarse) and coarse[-1] > 2 * coarse[0]


def test_more_foreign_images_score_worse_at_the_fine_level(sets, swd):
    fine = [swd(torch.cat([sets[2][:k], sets[1][k:]]))[0] for k in (0, N // 4, N // 2, N)]
    assert fine == sorted(fine)


def test_blur_costs_the_fine_level_and_not_the_coarse_one(sets, swd):
    sharp, blurred = swd(sets[1]), swd(binomial_blur(sets[1]))
    assert blurred[0] > 3 * sharp[0]
    assert blurred[-1] < 1.1 * sharp[-1]


def test_swd_levels_refuses_sets_of_different_sizes(sets):
    with pytest.raises(ValueError, match="equal-sized"):
        swd_levels(sets[0][:8], sets[0][:9])


def test_twice_the_amplitude_is_six_decibels_in_every_band(sets):
    shift = band_spectrum(2 * sets[1]) - band_spectrum(sets[1])
    assert torch.allclose(shift, torch.full_like(shift, 20 * math.log10(2)), atol=1e-4)
    assert spectrum_distance(2 * sets[1], sets[1]) == pytest.approx(20 * math.log10(2), abs=1e-4)


def test_blur_lowers_the_fine_bands_most(sets):
    drop = band_spectrum(sets[1]) - band_spectrum(binomial_blur(sets[1]))
    assert drop[0].abs() < 0.5 and drop[-1] > 6 and drop[-1] == drop.max()  # low band kept, top octave lost


def test_a_colour_offset_does_not_change_the_spectrum(sets):
    assert spectrum_distance(sets[1] + 0.4, sets[1]) < 1e-3  # channel means are removed: shapes, not colour
