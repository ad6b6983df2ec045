"""SODA in fera_core: the adapted weight against the paper's formulas written out here (with numpy's own
SVD and QR, not the code under test), identity at initialisation, orthogonality kept through training,
the file format and its refusals, the merge cache and the strength blend, and the shared training step."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from fera_core.adapter_file import AdapterFileError
from fera_core.soda import IN, OUT, QR, SVD, LayerMerge, SODAAdapter, SODAConfig, SODAModel, load_soda, save_soda
from fera_core.soda.config import balanced_split, parse_factor_sizes
from fera_core.soda.factorisation import spectral_basis
from fera_core.soda.rebuilt import Piece, adapted_weight, whole
from fera_core.training import training_step
from soda_formulas import expected, orthogonal

PATH = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny ops (conftest)


def trained_layer(shape, variant, side, seed=0, dtype=torch.float32):
    """A SODA layer with a random spectrum increment and random orthogonal factors (as after training), orthogonal
    to `dtype`'s precision."""
    cfg = SODAConfig(variant=variant, side=side)
    layer = SODAAdapter.for_shapes(cfg, {PATH: shape}).layers[PATH].to(dtype)
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        layer.spectrum.copy_(torch.from_numpy(rng.standard_normal(layer.spectrum.shape[0])))
    layer.rotation.load([torch.from_numpy(orthogonal(s, seed + i + 1)) for i, s in enumerate(layer.rotation.sizes)])
    return layer


@pytest.mark.parametrize("variant", [SVD, QR])
@pytest.mark.parametrize("side", [IN, OUT])
@pytest.mark.parametrize("shape", [(6, 12), (12, 6), (4, 3, 2, 2)])
def test_adapted_weight_is_the_papers_formula(variant, side, shape):
    w = torch.from_numpy(np.random.default_rng(7).standard_normal(shape))
    layer = trained_layer(shape, variant, side).double()
    merged = LayerMerge(layer, torch.float64).difference(w) + w
    want = expected(w.reshape(shape[0], -1).numpy(), layer).reshape(shape)
    # float64 throughout: the two computations differ by rounding only (~1e-14 here)
    np.testing.assert_allclose(merged.numpy(), want, atol=1e-10)


def test_kronecker_factor_sizes_rule_and_override():
    assert [balanced_split(n) for n in (320, 640, 768, 1280, 2048, 3072, 127)] == \
        [[16, 20], [20, 32], [24, 32], [32, 40], [32, 64], [48, 64], [127]]
    cfg = SODAConfig(factor_sizes=parse_factor_sizes("320=4x8x10")).validate()
    assert cfg.kron_sizes(320) == [4, 8, 10] and cfg.kron_sizes(640) == [20, 32]
    layer = SODAAdapter.for_shapes(cfg, {PATH: (640, 320)}).layers[PATH]
    assert layer.rotation.sizes == [4, 8, 10] and layer.spectrum.shape == (320,)
    with pytest.raises(ValueError, match="product"):
        SODAConfig(factor_sizes={"320": [16, 21]}).validate()
    with pytest.raises(ValueError, match="DIM=AxB"):
        parse_factor_sizes("320:16x20")


def small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 16), nn.SiLU(), nn.Conv2d(16, 8, 1), nn.Flatten(), nn.Linear(8, 6))


class Shaped(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin, self.conv, self.out = nn.Linear(12, 16), nn.Conv2d(16, 8, 3, padding=1), nn.Linear(8 * 9, 6)

    def forward(self, x):
        h = self.lin(x).reshape(x.shape[0], 9, 16).transpose(1, 2).reshape(x.shape[0], 16, 3, 3)
        return self.out(self.conv(torch.nn.functional.silu(h)).flatten(1))


@pytest.mark.parametrize("variant", [SVD, QR])
@pytest.mark.parametrize("side", [IN, OUT])
def test_identity_at_initialisation(variant, side):
    """Before the first step the adapted model IS the base model: increments 0 and R = I enter the merge as
    exact zeros and ones, so weights and outputs are bit for bit the base model's."""
    torch.manual_seed(0)
    net = Shaped()
    x = torch.randn(2, 9, 12)
    before = net(x)
    weights = {n: p.detach().clone() for n, p in net.named_parameters()}
    soda = SODAModel(net, SODAConfig(variant=variant, side=side, target_modules=["lin", "conv", "out"]))
    assert len(soda.layers) == 3
    for name in ("lin", "conv", "out"):
        assert torch.equal(getattr(net, name).weight, weights[f"{name}.weight"])
    assert torch.equal(net(x), before)
    soda.remove()
    assert all(torch.equal(p, weights[n]) for n, p in net.named_parameters())


@pytest.mark.parametrize("variant", [SVD, QR])
def test_factors_stay_orthogonal_over_many_steps(variant):
    """300 Adam steps at a large learning rate on a loss that pulls every factor away from the identity."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(40, 24), nn.Tanh(), nn.Linear(24, 40))
    soda = SODAModel(net, SODAConfig(variant=variant, target_modules=["0", "2"]))
    x, y = torch.randn(32, 40), torch.randn(32, 40)
    optimizer = torch.optim.Adam(soda.adapter.parameters(), lr=0.05)
    first = None
    for _ in range(300):
        loss = (net(x) - y).pow(2).mean()
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    rotations = [r for layer in soda.adapter.layers.values() for r in layer.rotation.matrices()]
    assert max((r - torch.eye(r.shape[0])).abs().max().item() for r in rotations) > 0.1  # they did rotate
    for r in rotations:  # max |R^T R - I| in float32
        assert (r.t() @ r - torch.eye(r.shape[0])).abs().max().item() < 1e-5
    assert loss.item() < 0.8 * first


def test_file_round_trip(tmp_path):
    torch.manual_seed(0)
    net = Shaped()
    cfg = SODAConfig(variant=QR, side=OUT, target_modules=["lin", "conv"], base_model="sd15",
                     factor_sizes={"16": [2, 8]})
    soda = SODAModel(net, cfg)
    for layer in soda.adapter.layers.values():
        with torch.no_grad():
            layer.spectrum.normal_()
        layer.rotation.load([torch.from_numpy(orthogonal(s, i)).float() for i, s in enumerate(layer.rotation.sizes)])
    soda.adapter.training_settings = {"steps": 3}
    x = torch.randn(2, 9, 12)
    trained = net(x).detach()
    path = save_soda(soda.adapter, tmp_path / "a.safetensors")
    loaded = load_soda(path)
    assert loaded.config == cfg and loaded.name == "a.safetensors" and loaded.training_settings == {"steps": 3}
    assert {p: l.shape for p, l in loaded.layers.items()} == {"lin": (16, 12), "conv": (8, 16, 3, 3)}
    assert loaded.layers["lin"].rotation.sizes == [2, 8]
    mine, theirs = soda.adapter.file_state_dict(), loaded.file_state_dict()
    assert set(mine) == set(theirs) == {"base_model.lin.soda.spectrum", "base_model.lin.soda.rotation.0",
                                         "base_model.lin.soda.rotation.1", "base_model.conv.soda.spectrum",
                                         "base_model.conv.soda.rotation.0", "base_model.conv.soda.rotation.1"}
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)
    soda.remove()
    SODAModel(net, adapter=loaded)
    assert torch.equal(net(x), trained)
    # only increments and factors: a few hundred numbers, not the 12*16 + 8*16*9 frozen weights
    assert sum(v.numel() for v in load_file(path).values()) == (12 + 2 * 2 + 8 * 8) + (8 + 2 * 2 + 4 * 4)


def tampered(tmp_path, change):
    torch.manual_seed(0)
    adapter = SODAModel(small_net(), SODAConfig(target_modules=["0", "4"])).adapter
    path = save_soda(adapter, tmp_path / "ok.safetensors")
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    sd = load_file(path)
    change(sd, meta)
    save_file(sd, tmp_path / "bad.safetensors", metadata=meta)
    return tmp_path / "bad.safetensors"


@pytest.mark.parametrize("change,problem", [
    (lambda sd, m: sd.__setitem__("base_model.0.soda.rotation.0", sd["base_model.0.soda.rotation.0"] * 1.01),
     "rotation factor 0 is not orthogonal"),
    (lambda sd, m: sd.__setitem__("base_model.0.soda.spectrum", torch.zeros(11)), r"expected \(12,\)"),
    (lambda sd, m: sd.__setitem__("base_model.0.soda.rotation.1", torch.eye(5)), "multiply to 12"),
    (lambda sd, m: sd.pop("base_model.4.soda.rotation.0"), "not numbered"),
    (lambda sd, m: sd.__setitem__("base_model.0.lora_up.weight", torch.zeros(1)), "unexpected key"),
    (lambda sd, m: sd.__setitem__("base_model.0.soda.spectrum", torch.full((12,), float("nan"))), "NaN"),
    (lambda sd, m: m.__setitem__("soda.format_version", "2"), "format version 1"),
    (lambda sd, m: m.__setitem__("soda.config", json.dumps({"variant": "lu"})), "variant"),
    (lambda sd, m: m.__setitem__("soda.shapes", json.dumps({"0": [16, 12]})), "different layers"),
])
def test_malformed_files_are_refused(tmp_path, change, problem):
    with pytest.raises(AdapterFileError, match=problem):
        load_soda(tampered(tmp_path, change))


def test_fera_file_is_named_as_such(tmp_path):
    from fera_core import FeRAAdapter, FeRAConfig, save_adapter
    from fera_core.experts import RoutedExperts
    path = save_adapter(FeRAAdapter(FeRAConfig(), {"x": RoutedExperts(4, 4)}), tmp_path / "f.safetensors")
    with pytest.raises(AdapterFileError, match="FeRA adapter, not a SODA one"):
        load_soda(path)


def gradients(build, layer, weight, upstream):
    """W' and the gradients of sum(W' * upstream) for the spectrum increment, each factor's parametrized original
    and the weight."""
    params = [layer.spectrum, *(f.parametrizations.weight.original for f in layer.rotation.factors), weight]
    for p in params:
        p.grad = None
    w_prime = build()
    (w_prime * upstream).sum().backward()
    return w_prime.detach(), [p.grad.clone() for p in params]


# float64 (float64 factors): both paths compute the same formulas and differ by rounding, measured <= 6e-15 of the
# gradients' scale. float32, the training dtype: <= 2.5e-6 measured, float32 rounding plus the factors' own
# orthogonality (~1e-7), which recovering M = W' R^T relies on. A mistake (a wrong transpose, a dropped term,
# rows shifted) changes them by O(1).
REBUILT_TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("variant", [SVD, QR])
@pytest.mark.parametrize("side", [IN, OUT])
@pytest.mark.parametrize("shape", [(6, 12), (12, 6), (4, 3, 2, 2)])
def test_rebuilt_weight_has_the_plain_paths_gradients(dtype, variant, side, shape):
    """adapted_weight keeps no intermediates and rebuilds W' in backward: the same W' and the same gradients as
    SODALayer.merged through plain autograd (tolerances above)."""
    layer = trained_layer(shape, variant, side, dtype=dtype)
    gen = torch.Generator().manual_seed(3)
    weight = torch.randn(shape, generator=gen, dtype=dtype, requires_grad=True)
    upstream = torch.randn(shape, generator=gen, dtype=dtype)
    basis = spectral_basis(weight.detach(), variant, side)
    plain, plain_grads = gradients(lambda: layer.merged(weight, basis), layer, weight, upstream)
    rebuilt, rebuilt_grads = gradients(lambda: adapted_weight(weight, whole(layer, basis)), layer, weight, upstream)
    scale = max(g.abs().max() for g in plain_grads)
    torch.testing.assert_close(rebuilt, plain, rtol=0, atol=REBUILT_TOLERANCE[dtype])
    for got, want in zip(rebuilt_grads, plain_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=REBUILT_TOLERANCE[dtype] * scale)


def test_rebuilt_weight_adapts_row_slices_of_a_fused_weight():
    """A host weight whose rows 0-5 and 12-19 are two SODA layers (as ComfyUI fuses q/k/v): W' and every gradient
    equal the plain path's, rows 6-11 and the last pass through unchanged (float64, tolerance as above)."""
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(22, 8, generator=gen, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(22, 8, generator=gen, dtype=torch.float64)
    q, v = trained_layer((6, 8), SVD, IN, dtype=torch.float64), trained_layer((8, 8), QR, OUT, 5, torch.float64)
    bq, bv = spectral_basis(weight.detach()[:6], SVD, IN), spectral_basis(weight.detach()[12:20], QR, OUT)

    def plain():
        return torch.cat([q.merged(weight[:6], bq), weight[6:12], v.merged(weight[12:20], bv), weight[20:]])

    def rebuilt():
        return adapted_weight(weight, [Piece(12, v, bv), Piece(0, q, bq)])
    for layer in (q, v):
        want, want_grads = gradients(plain, layer, weight, upstream)
        got, got_grads = gradients(rebuilt, layer, weight, upstream)
        torch.testing.assert_close(got, want, rtol=0, atol=1e-10)
        for g, w in zip(got_grads, want_grads):
            torch.testing.assert_close(g, w, rtol=0, atol=1e-10)
    assert torch.equal(got[6:12], weight[6:12]) and torch.equal(got[20:], weight[20:])  # copied, not computed


@pytest.mark.parametrize("variant", [SVD, QR])
@pytest.mark.parametrize("side", [IN, OUT])
def test_rebuilt_weight_keeps_only_w_prime_for_backward(variant, side):
    """What autograd keeps from the forward of y = x W'^T until its backward, besides tensors that live anyway (the
    weight, its factorisation): through adapted_weight x, W' (which the linear keeps too, one storage) and the small
    parameters; through plain autograd also M = W0 + dS B (one more weight-sized tensor, measured 0.98 of one)."""
    layer = trained_layer((64, 48), variant, side)
    weight, x = torch.randn(64, 48), torch.randn(5, 48)
    basis = spectral_basis(weight, variant, side)
    living = {t.untyped_storage().data_ptr() for t in (weight, *basis)}

    def kept(build):
        storages = {}

        def pack(t):
            storage = t.untyped_storage()
            if storage.data_ptr() not in living:
                storages[storage.data_ptr()] = storage.nbytes()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            torch.nn.functional.linear(x, build())
        return sum(storages.values())
    w_bytes, x_bytes = weight.numel() * 4, x.numel() * 4
    small = sum(p.numel() * 4 for p in layer.parameters()) * 4  # parameters, their casts and parametrization
    rebuilt = kept(lambda: adapted_weight(weight, whole(layer, basis)))
    assert w_bytes + x_bytes <= rebuilt <= w_bytes + x_bytes + small
    assert kept(lambda: layer.merged(weight, basis)) >= rebuilt + w_bytes * 0.9


def test_merge_factorises_each_weight_once_and_blends_by_strength():
    layer = trained_layer((12, 6), SVD, IN)
    merge = LayerMerge(layer)
    w = torch.randn(12, 6)
    full = merge.difference(w)
    for t in (0.0, 0.5, -1.0, 2.0):
        torch.testing.assert_close(merge.difference(w, t), t * full, atol=0, rtol=0)
    assert merge.factorisations == 1  # every call above reused W's factorisation
    w2 = w + 0.01 * torch.randn(12, 6)  # e.g. a LoRA patched before: a different weight, factorised anew
    torch.testing.assert_close(merge.difference(w2) + w2,
                               torch.from_numpy(expected(w2.double().numpy(), layer.double())).float(),
                               atol=2e-5, rtol=0)
    assert merge.factorisations == 2


class CountingObjective:
    """x_t = (1 - u) x0 + u noise (flow); counts the model calls by kind."""

    prediction = "flow"

    def __init__(self, soda):
        self.soda, self.calls = soda, []

    def coefficients(self, u):
        return 1 - u, u, u

    def predict(self, x_t, t, cond, experts):
        self.calls.append(experts)
        return self.soda.predict(x_t.flatten(1), experts=experts).reshape(x_t.shape)


def test_training_step_is_plain_mse_without_a_frozen_forward():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(16, 32), nn.SiLU(), nn.Linear(32, 16))
    soda = SODAModel(net, SODAConfig(target_modules=["0", "2"]))
    objective = CountingObjective(soda)
    x0 = torch.randn(4, 1, 4, 4)
    out = training_step(objective, x0, None, soda.config, torch.Generator().manual_seed(0))
    assert objective.calls == [True]  # no frozen prediction: SODA has no FECL
    g = torch.Generator().manual_seed(0)
    u, noise = torch.rand(4, generator=g), torch.randn(4, 1, 4, 4, generator=g)
    x_t = (1 - u)[:, None, None, None] * x0 + u[:, None, None, None] * noise
    mse = (net(x_t.flatten(1)).reshape(x0.shape) - (noise - x0)).pow(2).mean()
    torch.testing.assert_close(out.loss, mse)
    assert out.fecl.item() == 0.0


def test_info_describes_a_soda_file(tmp_path, capsys):
    from fera_core.__main__ import main
    torch.manual_seed(0)
    adapter = SODAModel(small_net(), SODAConfig(variant=QR, target_modules=["0", "4"], base_model="sd15")).adapter
    save_soda(adapter, tmp_path / "a.safetensors")
    assert main(["info", str(tmp_path / "a.safetensors"), "--layers"]) == 0
    text = capsys.readouterr().out
    assert "soda-qr, rotated side in" in text and "base model      sd15" in text and "factors 3x4" in text
    assert main(["info", str(tmp_path / "a.safetensors"), "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["parameters"] == adapter.num_parameters() and facts["orthogonality_error"] == 0.0
