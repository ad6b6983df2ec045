"""Routed experts: the fused (concatenated-rank) update against a per-expert loop shaped like the
reference's (stack of M expert outputs, then the routing-weighted sum)."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fera_core import RoutedExperts, add_experts, expert_gains
from fera_core.experts import rows_for

GRAD_MODES = pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])


def make_experts(in_f, out_f, m=3, r=4, alpha=2.0, kernel=None, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    experts = RoutedExperts(in_f, out_f, m, r, alpha, kernel)
    nn.init.normal_(experts.up, std=0.3)  # fresh experts have up = 0 and add nothing
    return experts.to(dtype)


def reference_loop(x, experts: RoutedExperts, routing, layer=None, strength=1.0):
    """What the reference computes: each expert separately, stacked to (B, M, ...), weighted sum."""
    outs = []
    for down, up in experts.split():
        down, up = down.to(x), up.to(x)
        if down.ndim == 4:
            h = F.conv2d(x, down, None, layer.stride, layer.padding, layer.dilation)
            outs.append(F.conv2d(h, up) * experts.scale)
        else:
            outs.append(F.linear(F.linear(x, down), up) * experts.scale)
    stacked = torch.stack(outs, dim=1)
    weights = routing.to(x).view(*routing.shape, *([1] * (stacked.ndim - 2)))
    return (stacked * weights).sum(dim=1) * strength


def routing_for(b, m=3, seed=1):
    return torch.softmax(torch.randn(b, m, generator=torch.Generator().manual_seed(seed)), dim=-1)


def fused(experts, layer, x, routing, **kwargs):
    """layer(x) + experts, through RoutedExperts.add_to as a forward hook would call it."""
    return experts.add_to(layer(x), x, routing, layer=layer, **kwargs)


# ---------------------------------------------------------------- equality with the loop

@GRAD_MODES
@pytest.mark.parametrize("x_shape", [(4, 16), (4, 7, 16)], ids=["2d", "3d"])
def test_linear_equals_reference_loop(x_shape, grad):
    layer = nn.Linear(16, 12).double()
    experts = make_experts(16, 12).double()
    x = torch.randn(x_shape, dtype=torch.float64)
    routing = routing_for(4).double()
    with torch.set_grad_enabled(grad):
        expected = layer(x) + reference_loop(x, experts, routing)
        got = fused(experts, layer, x, routing)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12)
    assert (got - layer(x)).abs().max() > 1e-2  # the experts contribute


@GRAD_MODES
@pytest.mark.parametrize("conv", [
    dict(kernel_size=3, stride=1, padding=1),
    dict(kernel_size=3, stride=2, padding=1),
    dict(kernel_size=3, stride=1, padding=0, dilation=2),
    dict(kernel_size=(1, 3), stride=(2, 1), padding=(0, 2)),
    dict(kernel_size=1),
], ids=["k3", "k3s2", "k3d2", "k1x3", "k1"])
def test_conv2d_equals_reference_loop(conv, grad):
    layer = nn.Conv2d(6, 10, **conv).double()
    kernel = tuple(layer.kernel_size)
    experts = make_experts(6, 10, kernel=kernel).double()
    assert experts.down.shape == (12, 6, *kernel) and experts.up.shape == (10, 12, 1, 1)
    x = torch.randn(4, 6, 9, 11, dtype=torch.float64)
    routing = routing_for(4).double()
    with torch.set_grad_enabled(grad):
        expected = layer(x) + reference_loop(x, experts, routing, layer)
        got = fused(experts, layer, x, routing)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12)


def test_conv_experts_without_their_layer_raise():
    experts = make_experts(6, 10, kernel=(3, 3))
    x = torch.randn(2, 6, 8, 8)
    with pytest.raises(ValueError, match="conv experts need their frozen Conv2d layer"):
        experts.add_to(torch.zeros(2, 10, 8, 8), x, routing_for(2))


def test_float32_close_to_float64():
    layer, experts = nn.Linear(16, 12), make_experts(16, 12)
    x, routing = torch.randn(2, 5, 16), routing_for(2)
    with torch.no_grad():
        got = fused(experts, layer, x, routing)
        expected = fused(experts.double(), layer.double(), x.double(), routing.double())
    assert torch.allclose(got.double(), expected, atol=1e-5)


# ---------------------------------------------------------------- rows, slices, strength

@GRAD_MODES
@pytest.mark.parametrize("copies", [2, 3])
def test_cfg_rows_are_routed_by_their_latent(copies, grad):
    """A batch of copies*B rows (torch.cat([z] * copies)) with routing for B latents: row i gets latent i % B's."""
    b = 3
    layer, experts = nn.Linear(16, 12).double(), make_experts(16, 12).double()
    x = torch.randn(copies * b, 5, 16, dtype=torch.float64)
    routing = routing_for(b).double()
    with torch.set_grad_enabled(grad):
        got = fused(experts, layer, x, routing)
        expected = layer(x) + reference_loop(x, experts, routing.repeat(copies, 1))
    assert torch.allclose(got, expected, rtol=1e-10, atol=1e-12)
    # The routing each row receives is exact (a copy): row i gets latent i % B's gains.
    gains = expert_gains(routing, experts.rank, experts.scale)
    assert torch.equal(rows_for(gains, copies * b), gains[torch.arange(copies * b) % b])
    # Stacked copies of the same input get the same outputs. Not bitwise: a matrix product may
    # round differently per row block (the BLAS picks kernels by shape, position and CPU; even
    # layer(x) alone differs by ~3e-16 here). 1e-12 is thousands of float64 ulps at these
    # magnitudes (~2) and 1e-11 of the ~0.26 a wrong latent's routing changes them by.
    x_same = x[:b].repeat(copies, 1, 1)
    with torch.set_grad_enabled(grad):
        same = fused(experts, layer, x_same, routing)
    for c in range(1, copies):
        assert torch.allclose(same[c * b:(c + 1) * b], same[:b], rtol=0, atol=1e-12)
    wrong = layer(x) + reference_loop(x, experts, routing.repeat_interleave(copies, 0))
    assert not torch.allclose(got, wrong)


@pytest.mark.parametrize("rows,latents", [(5, 2), (1, 2), (7, 3)])
def test_rows_not_a_multiple_of_the_latent_batch_raise(rows, latents):
    layer, experts = nn.Linear(16, 12), make_experts(16, 12)
    x = torch.randn(rows, 16)
    with pytest.raises(ValueError, match=rf"received {rows} rows but the routing was computed for {latents} latents"):
        fused(experts, layer, x, routing_for(latents))


@GRAD_MODES
def test_out_slice_writes_only_its_slice_linear(grad):
    """A fused qkv layer (out 3 * 6): experts of width 6 on the middle (k) slice."""
    layer, experts = nn.Linear(16, 18).double(), make_experts(16, 6).double()
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    routing = routing_for(2).double()
    with torch.set_grad_enabled(grad):
        base = layer(x)
        got = experts.add_to(base.clone(), x, routing, out_slice=(6, 6))
        update = reference_loop(x, experts, routing)
    assert torch.equal(got[..., :6], base[..., :6]) and torch.equal(got[..., 12:], base[..., 12:])
    assert torch.allclose(got[..., 6:12], base[..., 6:12] + update, rtol=1e-10, atol=1e-12)
    assert (got[..., 6:12] - base[..., 6:12]).abs().max() > 1e-2


@GRAD_MODES
def test_out_slice_writes_only_its_slice_conv(grad):
    layer = nn.Conv2d(6, 12, 3, padding=1).double()
    experts = make_experts(6, 4, kernel=(3, 3)).double()
    x = torch.randn(2, 6, 8, 8, dtype=torch.float64)
    routing = routing_for(2).double()
    with torch.set_grad_enabled(grad):
        base = layer(x)
        got = experts.add_to(base.clone(), x, routing, layer=layer, out_slice=(8, 4))
        update = reference_loop(x, experts, routing, layer)
    assert torch.equal(got[:, :8], base[:, :8])
    assert torch.allclose(got[:, 8:], base[:, 8:] + update, rtol=1e-10, atol=1e-12)


@GRAD_MODES
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_strength_scales_the_update_and_zero_adds_exactly_nothing(kind, grad):
    if kind == "linear":
        layer, experts, x = nn.Linear(16, 12), make_experts(16, 12), torch.randn(2, 5, 16)
    else:
        layer, experts, x = nn.Conv2d(6, 10, 3, padding=1), make_experts(6, 10, kernel=(3, 3)), torch.randn(2, 6, 8, 8)
    routing = routing_for(2)
    with torch.set_grad_enabled(grad):
        base = layer(x)
        zero = experts.add_to(layer(x), x, routing, strength=0.0, layer=layer)
        full = experts.add_to(layer(x), x, routing, strength=1.0, layer=layer)
        half = experts.add_to(layer(x), x, routing, strength=0.5, layer=layer)
    assert torch.equal(zero, base)
    assert torch.allclose(half - base, 0.5 * (full - base), atol=1e-6)
    assert (full - base).abs().max() > 1e-2


def test_fresh_experts_add_nothing():
    torch.manual_seed(0)
    layer, experts = nn.Linear(16, 12), RoutedExperts(16, 12)
    x = torch.randn(2, 5, 16)
    assert (experts.up == 0).all()
    with torch.no_grad():
        assert torch.equal(experts.add_to(layer(x), x, routing_for(2)), layer(x))


# ---------------------------------------------------------------- dtypes and gradients

def _layer(kind):
    return nn.Linear(16, 12) if kind == "linear" else nn.Conv2d(6, 10, 3, padding=1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_half_precision_inputs(dtype, kind):
    """float32 experts, half-precision activations: computed in the activations' dtype, and equal to
    float32 arithmetic on the same rounded values to two roundings of the output (the layer's and the
    update's: 2 eps |out|; measured 0.2-0.3 of that). Rows routed 0.8 / 0.05 on opposite experts:
    routing each row like the other moves the output 17x (bf16) to 150x (fp16) that tolerance."""
    layer, x = _layer(kind), torch.randn(2, 5, 16) if kind == "linear" else torch.randn(2, 6, 8, 8)
    experts = make_experts(16, 12) if kind == "linear" else make_experts(6, 10, kernel=(3, 3))
    routing = torch.tensor([[0.8, 0.15, 0.05], [0.05, 0.15, 0.8]])
    half_layer = layer.to(dtype)
    x = x.to(dtype)
    with torch.no_grad():
        got = experts.add_to(half_layer(x), x, routing, layer=half_layer)
        layer32, rounded = _layer(kind), make_experts(16, 12) if kind == "linear" else make_experts(6, 10, kernel=(3, 3))
        layer32.load_state_dict({k: v.float() for k, v in half_layer.state_dict().items()})
        rounded.load_state_dict({k: v.to(dtype).float() for k, v in experts.state_dict().items()})
        expected, swapped = (layer32(x.float()) + reference_loop(x.float(), rounded, r, layer32)
                             for r in (routing, routing.flip(0)))
    assert got.dtype == dtype
    assert experts.down.dtype == torch.float32  # the experts themselves are not converted
    tol = 2 * torch.finfo(dtype).eps * expected.abs().max()
    assert (got.float() - expected).abs().max() < tol
    assert (swapped - expected).abs().max() > 10 * tol


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_gradients_reach_down_up_and_routing(kind):
    if kind == "linear":
        layer, experts, x = nn.Linear(16, 12), make_experts(16, 12), torch.randn(2, 5, 16)
    else:
        layer, experts, x = nn.Conv2d(6, 10, 3, padding=1), make_experts(6, 10, kernel=(3, 3)), torch.randn(2, 6, 8, 8)
    layer.requires_grad_(False)
    routing = routing_for(2).requires_grad_(True)
    out = experts.add_to(layer(x), x, routing, layer=layer)
    out.square().sum().backward()
    for name, grad in (("down", experts.down.grad), ("up", experts.up.grad), ("routing", routing.grad)):
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().max() > 0, name


def test_gradient_at_zero_init_reaches_up():
    """The fresh state (up = 0): up gets a gradient (so training can start), down none yet."""
    torch.manual_seed(0)
    layer, experts = nn.Linear(16, 12).requires_grad_(False), RoutedExperts(16, 12)
    x = torch.randn(2, 5, 16)
    experts.add_to(layer(x), x, routing_for(2)).square().sum().backward()
    assert experts.up.grad.abs().max() > 0 and torch.equal(experts.down.grad, torch.zeros_like(experts.down))


# ---------------------------------------------------------------- layout helpers

def test_expert_gains_layout():
    routing = torch.tensor([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0]])
    g = expert_gains(routing, rank=2, scale=0.25, strength=2.0)
    assert torch.allclose(g, torch.tensor([[0.1, 0.1, 0.15, 0.15, 0.25, 0.25], [0.5, 0.5, 0, 0, 0, 0]]))


def test_split_load_split_round_trip_and_independent_init():
    torch.manual_seed(0)
    experts = RoutedExperts(16, 12, num_experts=3, rank=4, alpha=8.0)
    assert experts.scale == 2.0 and experts.in_features == 16 and experts.out_features == 12
    pairs = experts.split()
    assert len(pairs) == 3 and all(d.shape == (4, 16) and u.shape == (12, 4) for d, u in pairs)
    assert not torch.allclose(pairs[0][0], pairs[1][0])  # each expert is initialised on its own
    bound = 1 / 16**0.5  # kaiming_uniform(a=sqrt 5) on fan_in 16
    assert experts.down.abs().max() <= bound
    new = [(torch.randn(4, 16), torch.randn(12, 4)) for _ in range(3)]
    experts.load_split(new)
    for (d, u), (d2, u2) in zip(experts.split(), new):
        assert torch.equal(d, d2) and torch.equal(u, u2)


def test_add_experts_function_matches_module():
    layer, experts = nn.Linear(16, 12), make_experts(16, 12)
    x, routing = torch.randn(2, 5, 16), routing_for(2)
    with torch.no_grad():
        gains = expert_gains(routing, experts.rank, experts.scale)
        a = add_experts(layer(x), x, experts.down, experts.up, gains)
        b = experts.add_to(layer(x), x, routing)
    assert torch.equal(a, b)
