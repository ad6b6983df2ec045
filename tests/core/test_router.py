"""Soft frequency router and the sampling-time RoutingControls (temperature, mix, forced expert, gains)."""
import math

import pytest
import torch

from fera_core import FeRAConfig, FeRAModel, RoutingControls, SoftFrequencyRouter


@pytest.fixture
def router():
    torch.manual_seed(0)
    r = SoftFrequencyRouter(num_bands=3, num_experts=3, tau=0.7)
    for p in r.parameters():
        torch.nn.init.normal_(p, std=0.5)
    return r


@pytest.fixture
def energies():
    e = torch.rand(6, 3, generator=torch.Generator().manual_seed(1))
    return e / e.sum(1, keepdim=True)


def entropy(w):
    return -(w * w.clamp_min(1e-30).log()).sum(1)


def test_reference_structure_and_state_dict_names():
    r = SoftFrequencyRouter(3, 4, hidden=64)
    assert sorted(r.state_dict()) == ["net.0.bias", "net.0.weight", "net.2.bias", "net.2.weight"]
    assert r.net[0].weight.shape == (64, 3) and r.net[2].weight.shape == (4, 64)
    assert isinstance(r.net[1], torch.nn.ReLU) and r.num_experts == 4 and r.tau == 0.7


def test_default_is_softmax_of_mlp_over_tau(router, energies):
    w = router(energies)
    assert w.shape == (6, 3)
    assert torch.allclose(w, torch.softmax(router.net(energies) / 0.7, dim=-1))
    assert torch.allclose(w.sum(1), torch.ones(6))


def test_energies_are_cast_to_the_router(router, energies):
    """Half-precision energies are routed by a float32 router in float32."""
    w = router(energies.half())
    assert w.dtype == torch.float32
    assert torch.allclose(w, router(energies.half().float()))


def test_tau_override_changes_sharpness(router, energies):
    default = router(energies)
    sharp = router(energies, RoutingControls(tau=0.2))
    soft = router(energies, RoutingControls(tau=5.0))
    assert torch.allclose(sharp, torch.softmax(router.net(energies) / 0.2, dim=-1))
    assert torch.allclose(soft, torch.softmax(router.net(energies) / 5.0, dim=-1))
    assert (entropy(sharp) < entropy(default)).all() and (entropy(default) < entropy(soft)).all()
    assert (sharp.max(1).values > default.max(1).values).all()
    # The same expert wins whatever the temperature; only the margin changes.
    assert torch.equal(sharp.argmax(1), default.argmax(1))
    flat = router(energies, RoutingControls(tau=1e6))
    assert torch.allclose(flat, torch.full_like(flat, 1 / 3), atol=1e-4)


def test_mix_replaces_the_router(router, energies):
    w = router(energies, RoutingControls(mix=(1, 2, 1)))
    assert torch.allclose(w, torch.tensor([[0.25, 0.5, 0.25]] * 6))


def test_forced_expert_is_one_hot(router, energies):
    for m in range(3):
        w = router(energies, RoutingControls.forced(m, 3))
        expected = torch.zeros(6, 3)
        expected[:, m] = 1
        assert torch.equal(w, expected)


def test_gains_scale_without_renormalising(router, energies):
    base = router(energies)
    w = router(energies, RoutingControls(gains=(1.0, 0.0, 2.0)))
    assert torch.allclose(w, base * torch.tensor([1.0, 0.0, 2.0]))
    assert (w[:, 1] == 0).all()
    assert not torch.allclose(w.sum(1), torch.ones(6))  # not renormalised
    forced = router(energies, RoutingControls(mix=RoutingControls.forced(2, 3).mix, gains=(1, 1, 3)))
    assert torch.equal(forced, torch.tensor([[0.0, 0.0, 3.0]] * 6))
    # Temperature and gains compose.
    both = router(energies, RoutingControls(tau=0.3, gains=(2, 2, 2)))
    assert torch.allclose(both, 2 * torch.softmax(router.net(energies) / 0.3, dim=-1))


INVALID = [
    (RoutingControls(tau=0.0), r"router temperature must be > 0, got 0.0"),
    (RoutingControls(tau=-1.0), r"router temperature must be > 0, got -1.0"),
    (RoutingControls(tau=math.nan), r"router temperature must be > 0, got nan"),
    (RoutingControls(mix=(1, 1)), r"mix needs one value per expert \(3\), got 2"),
    (RoutingControls(mix=(1, -1, 1)), r"mix must be non-negative with a positive sum"),
    (RoutingControls(mix=(0, 0, 0)), r"mix must be non-negative with a positive sum"),
    (RoutingControls(mix=(1, math.nan, 1)), r"mix must be finite numbers"),
    (RoutingControls(gains=(1, 1, 1, 1)), r"gains needs one value per expert \(3\), got 4"),
    (RoutingControls(gains=(1, math.inf, 1)), r"gains must be finite numbers"),
]


@pytest.mark.parametrize("controls,match", INVALID)
def test_invalid_controls_raise(router, energies, controls, match):
    with pytest.raises(ValueError, match=match):
        controls.check(3)
    # The router refuses them too, instead of returning a wrongly shaped or non-finite mix.
    with pytest.raises(ValueError, match=match):
        router(energies, controls)


@pytest.mark.parametrize("expert", [-1, 3, 7])
def test_forced_expert_out_of_range(expert):
    with pytest.raises(ValueError, match=rf"forced expert {expert} is out of range 0..2"):
        RoutingControls.forced(expert, 3)


def test_valid_controls_pass_check():
    c = RoutingControls(tau=0.5, mix=(0, 1, 0), gains=(1, 2, 0))
    assert c.check(3) is c


def test_model_prepare_forward_uses_controls_for_every_layer():
    model = torch.nn.ModuleDict({"attn": torch.nn.ModuleDict({"to_q": torch.nn.Linear(8, 8),
                                                              "to_k": torch.nn.Linear(8, 8)})})
    fm = FeRAModel(model, FeRAConfig())
    z = torch.randn(2, 4, 16, 16)
    w = fm.prepare_forward(z, RoutingControls.forced(1, 3))
    assert torch.equal(w, torch.tensor([[0.0, 1.0, 0.0]] * 2))
    assert len(fm.fera_layers) == 2
    assert all(layer.routing_weights is w for layer in fm.fera_layers)
    with pytest.raises(ValueError, match="mix needs one value per expert"):
        fm.prepare_forward(z, RoutingControls(mix=(1, 1)))
    assert all(layer.routing_weights is w for layer in fm.fera_layers)  # a refused control changes nothing
