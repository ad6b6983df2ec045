"""Small contracts of the router, experts and indicator that mutation testing found unchecked
(tests/mutation.py): the reference's defaults, error messages, the in-place sampling path,
dropout's rate, the init bound, output dtypes, and energies being fractions."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fera_core import RoutedExperts, RoutingControls, SoftFrequencyRouter, add_experts, band_components, band_energies
from fera_core.experts import expert_gains, rows_for
from fera_core.indicator import _blur_matrix


def test_defaults_are_the_reference_ones():
    router = SoftFrequencyRouter()
    assert (router.net[0].in_features, router.net[0].out_features, router.num_experts, router.tau) == (3, 64, 3, 0.7)
    experts = RoutedExperts(16, 12)
    assert (experts.num_experts, experts.rank, experts.scale) == (3, 4, 0.25)
    z = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
    assert band_energies(z).shape == (2, 3) and len(band_components(z)) == 3


def test_controls_check_every_list_even_after_a_tensor():
    """on() makes mix a tensor; a gains list next to it is still checked."""
    with pytest.raises(ValueError, match="gains must be finite"):
        RoutingControls(mix=torch.ones(3), gains=[1.0, float("nan"), 1.0]).check(3)


def test_controls_on_a_device_keep_their_values():
    """on() is what the ComfyUI glue routes with: float32 tensors of the same values, tau unchanged."""
    on = RoutingControls(tau=0.5, mix=[1, 2, 3], gains=[1.0, 0.0, 2.5]).on(torch.device("cpu"))
    assert on.tau == 0.5
    for got, want in ((on.mix, [1.0, 2.0, 3.0]), (on.gains, [1.0, 0.0, 2.5])):
        assert got.dtype == torch.float32 and got.tolist() == want
    assert RoutingControls().on(torch.device("cpu")) == RoutingControls()
    routed = SoftFrequencyRouter()(torch.rand(2, 3), on)
    torch.testing.assert_close(routed, torch.tensor([[1 / 6, 0.0, 1.25]] * 2))


def test_router_output_has_the_routers_dtype_with_mix_and_gains():
    router = SoftFrequencyRouter().double()
    e = torch.full((2, 3), 1 / 3, dtype=torch.float64)
    for controls in (RoutingControls(mix=[1.0, 2.0, 1.0]), RoutingControls(gains=[1.0, 0.5, 2.0])):
        assert router(e, controls).dtype == torch.float64


def test_error_messages_say_what_is_wrong():
    with pytest.raises(ValueError, match="the row count must be a multiple of the latent batch$"):
        rows_for(torch.ones(2, 12), 3)
    experts = RoutedExperts(6, 10, kernel_size=(3, 3))
    x = torch.randn(1, 6, 8, 8)
    gains = expert_gains(torch.ones(1, 3), 4, 1.0)
    with pytest.raises(ValueError, match=r"conv experts need their frozen Conv2d layer .*; pass layer="):
        add_experts(torch.zeros(1, 10, 8, 8), x, experts.down, experts.up, gains)


def test_sampling_path_adds_in_place():
    """Under no_grad the update goes into the layer's output tensor itself (no output-sized temporary);
    with gradients the output is left alone for autograd."""
    layer, experts = nn.Linear(16, 12), RoutedExperts(16, 12)
    nn.init.normal_(experts.up)
    x, gains = torch.randn(2, 5, 16), expert_gains(torch.softmax(torch.randn(2, 3), -1), 4, 0.25)
    with torch.no_grad():
        out = layer(x)
        before = out.clone()
        assert add_experts(out, x, experts.down, experts.up, gains) is out
        assert (out - before).abs().max() > 1e-2
    out = layer(x)
    assert add_experts(out, x, experts.down, experts.up, gains) is not out


def test_dropout_uses_its_rate():
    layer, experts = nn.Linear(16, 12), RoutedExperts(16, 12)
    nn.init.normal_(experts.up)
    x, gains = torch.randn(2, 5, 16), expert_gains(torch.ones(2, 3) / 3, 4, 0.25)
    torch.manual_seed(3)
    got = add_experts(layer(x), x, experts.down, experts.up, gains, dropout=0.1)
    torch.manual_seed(3)
    dropped = F.dropout(x, 0.1, training=True)
    want = layer(x) + F.linear(F.linear(dropped, experts.down) * gains[:, None], experts.up)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_down_init_fills_the_kaiming_bound():
    """kaiming_uniform(a = sqrt 5) draws from +-1/sqrt(fan_in); 3072 draws reach past 0.95 of it
    (a = sqrt 6 would cap them at 0.93)."""
    torch.manual_seed(0)
    experts = RoutedExperts(256, 8)
    bound = 1 / math.sqrt(256)
    assert 0.95 * bound < experts.down.abs().max() <= bound


def test_blur_with_sigma_zero_is_the_identity():
    assert torch.equal(_blur_matrix(5, 0.0), torch.eye(5, dtype=torch.float64))


@pytest.mark.parametrize("definition", ["reference", "partition"])
def test_energies_of_a_faint_latent_are_fractions(definition):
    """A faint latent (sum of squares 4e-7, near the normaliser's epsilon of 1e-8) still gives
    non-negative energies that sum to at most 1."""
    z = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(1)) * 1e-5
    e = band_energies(z, 3, definition)
    assert (e >= 0).all() and 0.9 < e.sum() <= 1.0
