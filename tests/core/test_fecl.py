"""Frequency-Energy Consistency Loss against a hand re-implementation of the reference formula."""
import pytest
import torch

from fera_core import FeRAConfig, FeRAModel, band_components, fecl_loss

from band_references import partition_by_scipy, reference_dog


def hand_fecl(base, fera, target, n=3, weight=0.1, decompose=None):
    """Eq. 10 as the reference codes it, in float64, eps 1e-8 everywhere it adds one."""
    decompose = decompose or (lambda t: reference_dog(t, n)[:n])
    delta, resid = (fera.double() - base.double()), (fera.double() - target.double())

    def norms(parts):
        return torch.stack([p.flatten(1).norm(dim=1) for p in parts], dim=1)

    d_k, r_k = norms(decompose(delta)), norms(decompose(resid))
    w = r_k**2 / ((r_k**2).sum(1, keepdim=True) + 1e-8)
    d_tot = delta.flatten(1).norm(dim=1, keepdim=True) + 1e-8
    r_tot = resid.flatten(1).norm(dim=1, keepdim=True) + 1e-8
    return weight * (w * (d_k / d_tot - r_k / r_tot) ** 2).sum(1).mean()


@pytest.fixture
def tensors():
    g = torch.Generator().manual_seed(0)
    base = torch.randn(3, 4, 32, 32, generator=g)
    # FeRA's update: a smooth change plus a little noise, so the bands differ between delta and r.
    smooth = torch.nn.functional.interpolate(torch.randn(3, 4, 4, 4, generator=g), size=(32, 32), mode="bilinear")
    fera = base + 0.3 * smooth + 0.05 * torch.randn(3, 4, 32, 32, generator=g)
    target = torch.randn(3, 4, 32, 32, generator=g)
    return base, fera, target


@pytest.mark.parametrize("weight", [0.1, 1.0])
def test_matches_hand_reimplementation_reference(tensors, weight):
    loss = fecl_loss(*tensors, num_bands=3, definition="reference", weight=weight)
    expected = hand_fecl(*tensors, n=3, weight=weight)
    assert loss.shape == () and loss.dtype == torch.float32
    assert expected > 1e-4  # a non-trivial value
    assert abs(loss.item() - expected.item()) < 1e-5 * expected.item()


def test_matches_hand_reimplementation_partition(tensors):
    loss = fecl_loss(*tensors, num_bands=4, definition="partition")
    expected = hand_fecl(*tensors, n=4, decompose=lambda t: partition_by_scipy(t, 4))
    assert expected > 1e-4
    assert abs(loss.item() - expected.item()) < 1e-5 * expected.item()
    assert abs(loss.item() - fecl_loss(*tensors, num_bands=4, definition="reference").item()) > 1e-3 * expected


def test_weight_is_linear(tensors):
    assert torch.allclose(fecl_loss(*tensors, weight=1.0), 10 * fecl_loss(*tensors, weight=0.1))
    assert fecl_loss(*tensors, weight=0.0) == 0


def test_zero_cases(tensors):
    """Worked out from the formula:
    - fera == base == target: delta = r = 0, so w = 0 / (0 + eps) = 0 and the loss is exactly 0.
    - target == base (any fera): delta == r bit for bit, every ratio matches, loss exactly 0.
    - fera == base != target: delta = 0 so its ratios are 0 / eps = 0, and the loss is
      weight * mean sum_k w_k (|r_k| / |r|)^2 > 0: FECL still pulls the update towards r's bands.
    """
    base, fera, target = tensors
    assert fecl_loss(base, base, base).item() == 0.0
    assert fecl_loss(base, fera, base).item() == 0.0
    loss = fecl_loss(base, base, target)
    resid = base.double() - target.double()
    r_k = torch.stack([p.flatten(1).norm(dim=1) for p in reference_dog(resid, 3)[:3]], 1)
    w = r_k**2 / (r_k**2).sum(1, keepdim=True)
    expected = 0.1 * (w * (r_k / resid.flatten(1).norm(dim=1, keepdim=True)) ** 2).sum(1).mean()
    assert loss > 0 and abs(loss.item() - expected.item()) < 1e-5 * expected.item()


def test_invariant_to_scaling_the_update_direction(tensors):
    """Only the band *distribution* of delta matters, not its size."""
    base, fera, target = tensors
    delta = fera - base
    # keep r fixed: shift target along with fera
    a = fecl_loss(base, base + delta, target)
    b = fecl_loss(base, base + 3 * delta, target + 2 * delta)
    assert torch.allclose(a, b, rtol=1e-4)


def test_half_inputs_give_float32_loss(tensors):
    half = [t.half() for t in tensors]
    loss = fecl_loss(*half)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert torch.allclose(loss, fecl_loss(*[t.float() for t in half]))


def test_video_shaped_inputs(tensors):
    base, fera, target = (t.reshape(3, 2, 2, 32, 32) for t in tensors)
    assert torch.allclose(fecl_loss(base, fera, target), fecl_loss(*tensors))


def test_shape_mismatch_raises(tensors):
    base, fera, target = tensors
    with pytest.raises(ValueError, match=r"FECL needs equal shapes, got base \(3, 4, 32, 32\), fera "
                                         r"\(3, 4, 32, 32\), target \(2, 4, 32, 32\)"):
        fecl_loss(base, fera, target[:2])


def test_definition_is_validated(tensors):
    with pytest.raises(ValueError, match="unknown indicator definition 'dct'"):
        fecl_loss(*tensors, definition="dct")


def test_band_components_are_those_of_the_indicator(tensors):
    """FECL decomposes with the same (truncated) DoG as the FEI."""
    delta = tensors[1] - tensors[0]
    for ours, theirs in zip(band_components(delta, 3), reference_dog(delta, 3)[:3]):
        assert torch.allclose(ours.double(), theirs, atol=1e-5)


def test_backward_is_finite_at_zero_delta_init(tiny_unet):
    """Fresh experts (up = 0) make fera == base exactly: ||delta|| = 0, where a norm's gradient is
    undefined. Training must still start: finite gradients, and up gets a non-zero one (from MSE)."""
    torch.manual_seed(0)
    fm = FeRAModel(tiny_unet, FeRAConfig())
    z = torch.randn(2, 4, 32, 32)
    t, c = torch.tensor([900, 100]), torch.randn(2, 77, 32)
    target = torch.randn(2, 4, 32, 32)
    fm.prepare_forward(z)
    pred = tiny_unet(z, t, c).sample
    with torch.no_grad(), fm.disabled():
        base = tiny_unet(z, t, c).sample
    assert torch.equal(pred, base)  # zero delta

    fecl = fm.compute_fecl_loss(base, pred, target)
    assert torch.isfinite(fecl) and fecl > 0
    (g_pred,) = torch.autograd.grad(fecl, pred, retain_graph=True)
    assert torch.isfinite(g_pred).all()

    loss = torch.nn.functional.mse_loss(pred, target) + fecl
    loss.backward()
    params = dict(fm.adapter.named_parameters())
    assert len(params) == 24 * 2 + 4
    for name, p in params.items():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert all(layer.experts.up.grad.abs().max() > 0 for layer in fm.fera_layers)
