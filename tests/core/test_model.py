"""FeRAModel on the tiny diffusers UNet: target matching, hooks, disabled(), remove(), load/save."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fera_core import AdapterFileError, FeRAAdapter, FeRAConfig, FeRAModel, load_adapter, save_adapter
from fera_core.model import check_fits, find_targets
from fera_core.experts import RoutedExperts

from band_references import reference_dog

Z = torch.randn(2, 4, 32, 32, generator=torch.Generator().manual_seed(0))
T = torch.tensor([900, 100])
C = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(1))


def run(unet):
    with torch.no_grad():
        return unet(Z, T, C).sample


def randomise(fm, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in fm.fera_layers:
            layer.experts.up.copy_(torch.randn(layer.experts.up.shape, generator=g) * 0.05)


def snapshot(fm):
    return {k: v.detach().clone() for k, v in fm.adapter.state_dict().items()}, fm.config.to_dict(), \
        [layer.experts.scale for layer in fm.fera_layers], fm.router.tau


def assert_unchanged(fm, snap):
    tensors, config, scales, tau = snap
    now = fm.adapter.state_dict()
    assert set(now) == set(tensors) and all(torch.equal(now[k], tensors[k]) for k in tensors)
    assert fm.config.to_dict() == config and [l.experts.scale for l in fm.fera_layers] == scales
    assert fm.router.tau == tau


def hooks_on(unet):
    return sum(len(m._forward_hooks) for m in unet.modules())


# ---------------------------------------------------------------- targets

def test_reference_matching_gives_24_layers_without_to_out(tiny_unet):
    fm = FeRAModel(tiny_unet, FeRAConfig())
    paths = [layer.path for layer in fm.fera_layers]
    assert len(paths) == 24
    assert {p.rsplit(".", 1)[-1] for p in paths} == {"to_q", "to_k", "to_v"}
    assert not any("to_out" in p for p in paths)
    assert all(isinstance(tiny_unet.get_submodule(p), nn.Linear) for p in paths)


def test_full_name_matching_also_adapts_to_out(tiny_unet):
    reference = set(find_targets(tiny_unet, ["to_q", "to_k", "to_v", "to_out.0"]))
    fm = FeRAModel(tiny_unet, FeRAConfig(match_full_name=True))
    full = {layer.path for layer in fm.fera_layers}
    assert len(full) == 32 and reference < full
    assert {p for p in full - reference} == {p[:-len("to_q")] + "to_out.0" for p in reference if p.endswith("to_q")}
    assert all(isinstance(tiny_unet.get_submodule(p), nn.Linear) for p in full)


def test_reference_matching_is_by_child_substring():
    model = nn.ModuleDict({"blk": nn.ModuleDict({"my_to_q_proj": nn.Linear(4, 4), "to_v": nn.Conv2d(4, 4, 1),
                                                 "to_out": nn.ModuleList([nn.Linear(4, 4)])})})
    assert list(find_targets(model, ["to_q", "to_v", "to_out.0"])) == ["blk.my_to_q_proj"]  # Linear only, child name
    assert set(find_targets(model, ["to_v", "to_out.0"], match_full_name=True)) == {"blk.to_v", "blk.to_out.0"}


def test_conv_targets_in_the_model(tiny_unet):
    fm = FeRAModel(tiny_unet, FeRAConfig(match_full_name=True, target_modules=["proj_in"]))
    assert len(fm.fera_layers) == 4
    layer = fm.fera_layers[0]
    assert isinstance(layer.layer, nn.Conv2d) and layer.experts.down.shape[2:] == layer.layer.kernel_size
    randomise(fm)
    routing = torch.tensor([[0.2, 0.5, 0.3], [0.6, 0.1, 0.3]])
    fm.set_routing_weights(routing)
    x = torch.randn(2, 32, 8, 8)
    with torch.no_grad():
        got = layer.layer(x)  # the hook adds the experts
        conv = layer.layer
        expected = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding)
        for m, (down, up) in enumerate(layer.experts.split()):
            update = F.conv2d(F.conv2d(x, down, None, conv.stride, conv.padding), up) * layer.experts.scale
            expected = expected + routing[:, m, None, None, None] * update
    assert torch.allclose(got, expected, atol=1e-5)


# ---------------------------------------------------------------- forward behaviour

def test_fresh_adapter_leaves_the_output_unchanged(tiny_unet):
    original = run(tiny_unet)
    fm = FeRAModel(tiny_unet, FeRAConfig(match_full_name=True))
    fm.prepare_forward(Z)
    assert torch.equal(run(tiny_unet), original)


def test_prepare_forward_records_energies_and_routes_every_layer(tiny_unet):
    fm = FeRAModel(tiny_unet, FeRAConfig())
    w = fm.prepare_forward(Z)
    assert w.shape == (2, 3) and torch.allclose(w.sum(1), torch.ones(2))
    from fera_core import band_energies

    assert torch.equal(fm.current_e_t, band_energies(Z, 3, "reference"))
    assert all(layer.routing_weights is w for layer in fm.fera_layers)


def test_cfg_batch_of_stacked_latents(tiny_unet):
    """The UNet sees torch.cat([z, z]) while routing was computed for z: each copy gets its latent's mix."""
    fm = FeRAModel(tiny_unet, FeRAConfig())
    randomise(fm)
    fm.prepare_forward(Z)
    with torch.no_grad():
        doubled = tiny_unet(torch.cat([Z, Z]), torch.cat([T, T]), torch.cat([C, C])).sample
        single = tiny_unet(Z, T, C).sample
    assert torch.allclose(doubled[:2], single, atol=1e-5) and torch.allclose(doubled[2:], single, atol=1e-5)
    with pytest.raises(ValueError, match="received 3 rows but the routing was computed for 2 latents"):
        with torch.no_grad():
            tiny_unet(Z[:1].repeat(3, 1, 1, 1), T[:1].repeat(3), C[:1].repeat(3, 1, 1))


def test_disabled_restores_routing(tiny_unet):
    base = run(tiny_unet)
    fm = FeRAModel(tiny_unet, FeRAConfig())
    randomise(fm)
    w = fm.prepare_forward(Z)
    fera = run(tiny_unet)
    assert (fera - base).abs().max() > 1e-3
    with fm.disabled():
        assert all(layer.routing_weights is None for layer in fm.fera_layers)
        assert torch.equal(run(tiny_unet), base)
    assert all(layer.routing_weights is w for layer in fm.fera_layers)
    assert torch.equal(run(tiny_unet), fera)
    with pytest.raises(RuntimeError, match="boom"):
        with fm.disabled():
            raise RuntimeError("boom")
    assert all(layer.routing_weights is w for layer in fm.fera_layers)


def test_reference_style_base_via_set_routing_weights_none(tiny_unet):
    base = run(tiny_unet)
    fm = FeRAModel(tiny_unet, FeRAConfig())
    randomise(fm)
    fm.prepare_forward(Z)
    for layer in fm.fera_layers:
        layer.set_routing_weights(None)
    assert torch.equal(run(tiny_unet), base)


def test_remove_restores_the_original_model(tiny_unet):
    original = run(tiny_unet)
    hooks_before = hooks_on(tiny_unet)
    fm = FeRAModel(tiny_unet, FeRAConfig(match_full_name=True))
    randomise(fm)
    fm.prepare_forward(Z)
    assert hooks_on(tiny_unet) == hooks_before + 32
    assert (run(tiny_unet) - original).abs().max() > 1e-3
    assert fm.remove() is tiny_unet
    assert hooks_on(tiny_unet) == hooks_before
    assert torch.equal(run(tiny_unet), original)


def test_training_dropout_only_in_train_mode(tiny_unet):
    fm = FeRAModel(tiny_unet, FeRAConfig(dropout=0.5))
    randomise(fm)
    fm.set_routing_weights(torch.full((2, 3), 1 / 3))
    layer = fm.fera_layers[0]
    x = torch.randn(2, 10, layer.layer.in_features)
    fm.eval()
    with torch.no_grad():
        assert torch.equal(layer.layer(x), layer.layer(x))
    fm.train()
    torch.manual_seed(0)
    with torch.no_grad():
        assert not torch.equal(layer.layer(x), layer.layer(x))


def test_training_step_updates_only_the_adapter(tiny_unet):
    torch.manual_seed(0)
    fm = FeRAModel(tiny_unet, FeRAConfig())
    frozen = {p: tiny_unet.get_submodule(p).weight.detach().clone() for p in (l.path for l in fm.fera_layers)}
    assert all(not tiny_unet.get_submodule(p).weight.requires_grad for p in frozen)
    opt = torch.optim.AdamW(fm.adapter.parameters(), lr=1e-2)
    target = torch.randn(2, 4, 32, 32)
    before = {k: v.clone() for k, v in fm.adapter.state_dict().items()}
    fm.prepare_forward(Z)
    loss = F.mse_loss(tiny_unet(Z, T, C).sample, target)
    loss.backward()
    opt.step()
    after = fm.adapter.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith(".up"))
    assert all(torch.equal(tiny_unet.get_submodule(p).weight, w) for p, w in frozen.items())


# ---------------------------------------------------------------- loading and saving

def test_load_adapters_keeps_parameter_identity(tiny_unet, ref_adapter_path):
    fm = FeRAModel(tiny_unet, FeRAConfig())
    params = {id(p) for p in fm.adapter.parameters()}
    ups = [layer.experts.up for layer in fm.fera_layers]
    fm.load_adapters(ref_adapter_path, alpha=2.0, tau=0.5)
    assert {id(p) for p in fm.adapter.parameters()} == params
    assert all(layer.experts.up is up for layer, up in zip(fm.fera_layers, ups))
    assert all((up != 0).any() for up in ups)
    assert fm.config.alpha == 2.0 and fm.config.router_tau == 0.5 and fm.router.tau == 0.5
    assert all(layer.experts.scale == 0.5 for layer in fm.fera_layers)


def test_safetensors_save_load_round_trip_through_the_model(tiny_unet, tmp_path, ref_adapter_path):
    fm = FeRAModel.from_file(tiny_unet, ref_adapter_path, alpha=3.0)
    fm.prepare_forward(Z)
    out = run(tiny_unet)
    path = fm.save_adapters(tmp_path / "a.safetensors")
    fm.remove()
    fm2 = FeRAModel(tiny_unet, FeRAConfig(alpha=3.0))
    fm2.load_adapters(path)
    fm2.prepare_forward(Z)
    assert torch.equal(run(tiny_unet), out)  # same weights, same computation


@pytest.mark.parametrize("config,match", [
    (FeRAConfig(match_full_name=True), r"adapter layers do not match this model's: 0 unexpected .* 8 missing"),
    (FeRAConfig(target_modules=["to_q", "to_k"]), r"adapter layers do not match this model's: 8 unexpected"),
    (FeRAConfig(rank=8), r"down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k shapes differ"),
    (FeRAConfig(num_experts=2), r"shapes differ from this model's experts"),
    (FeRAConfig(router_hidden=32), r"router shapes differ from this model's"),
    (FeRAConfig(num_bands=4), r"router shapes differ from this model's"),
])
def test_load_adapters_mismatch_raises_and_changes_nothing(tiny_unet, ref_adapter_path, config, match):
    fm = FeRAModel(tiny_unet, config)
    randomise(fm)
    snap = snapshot(fm)
    with pytest.raises(ValueError, match=match) as info:
        fm.load_adapters(ref_adapter_path, alpha=4.0, tau=0.2)
    assert str(ref_adapter_path) in str(info.value)
    assert_unchanged(fm, snap)


def test_load_adapters_bad_file_changes_nothing(tiny_unet, ref_adapter_path, tmp_path):
    sd = torch.load(ref_adapter_path, weights_only=True)
    key = next(k for k in sd if k.endswith("lora_up.weight"))
    sd[key] = sd[key].clone()
    sd[key][0, 0] = float("nan")
    bad = tmp_path / "nan.pt"
    torch.save(sd, bad)
    fm = FeRAModel(tiny_unet, FeRAConfig())
    randomise(fm)
    snap = snapshot(fm)
    with pytest.raises(AdapterFileError, match="contains NaN"):
        fm.load_adapters(bad)
    assert_unchanged(fm, snap)


def test_adapter_for_other_model_is_refused_without_hooks(tiny_unet, ref_adapter_path):
    adapter = load_adapter(ref_adapter_path)
    layers = adapter.layers
    hooks_before = hooks_on(tiny_unet)

    missing = FeRAAdapter(adapter.config, {"down_blocks.0.attentions.9.to_q": layers[next(iter(layers))]})
    with pytest.raises(ValueError, match=r"adapter layer down_blocks.0.attentions.9.to_q does not exist in the model"):
        FeRAModel(tiny_unet, adapter=missing)

    not_linear = FeRAAdapter(adapter.config, {"down_blocks.0.attentions.0": layers[next(iter(layers))]})
    with pytest.raises(ValueError, match=r"need a Linear or Conv2d layer, but the model's down_blocks.0.attentions.0 "
                                         r"is a Transformer2DModel"):
        FeRAModel(tiny_unet, adapter=not_linear)

    # Experts sized for 64 channels on a 32-channel layer; the good layers listed first must not stay hooked.
    wrong = dict(layers)
    wrong["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"] = \
        layers["mid_block.attentions.0.transformer_blocks.0.attn1.to_q"]
    with pytest.raises(ValueError, match=r"experts for down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q "
                                         r"have in 64, out 64 but the layer has in 32, out 32"):
        FeRAModel(tiny_unet, adapter=FeRAAdapter(adapter.config, wrong))
    assert hooks_on(tiny_unet) == hooks_before


@pytest.mark.parametrize("config,match", [
    (FeRAConfig(rank=0), "rank must be a positive integer, got 0"),
    (FeRAConfig(router_tau=-0.1), r"router_tau must be > 0, got -0.1"),
    (FeRAConfig(dropout=1.0), r"dropout must be in \[0, 1\), got 1.0"),
    (FeRAConfig(indicator="dct"), "unknown indicator definition 'dct'"),
    (FeRAConfig(target_modules="to_q"), "target_modules must be a list of names"),
    (FeRAConfig(alpha=float("inf")), "alpha must be a finite number"),
])
def test_invalid_config_is_refused(tiny_unet, config, match):
    with pytest.raises(ValueError, match=match):
        FeRAModel(tiny_unet, config)
    assert hooks_on(tiny_unet) == 0


def test_save_adapter_of_model_then_load_adapter(tiny_unet, tmp_path):
    fm = FeRAModel(tiny_unet, FeRAConfig(indicator="partition", base_model="sd15"))
    randomise(fm)
    path = save_adapter(fm.adapter, tmp_path / "p.safetensors")
    loaded = load_adapter(path)
    assert loaded.config.indicator == "partition" and loaded.config.base_model == "sd15"
    a, b = fm.adapter.file_state_dict(), loaded.file_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)

    # A model configured like the file loads it and routes with the file's indicator.
    w_partition = fm.prepare_forward(Z)
    fm.remove()
    fm2 = FeRAModel(tiny_unet, FeRAConfig(indicator="partition"))
    fm2.load_adapters(path)
    assert torch.equal(fm2.prepare_forward(Z), w_partition)
    from fera_core import band_energies

    assert torch.equal(fm2.current_e_t, band_energies(Z, 3, "partition"))


@pytest.mark.parametrize("conv", [torch.nn.Conv2d(8, 8, 3, groups=2), torch.nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect")])
def test_grouped_or_non_zero_padded_convs_are_refused(conv):
    experts = RoutedExperts(8, 8, 3, 4, 1.0, (3, 3))
    with pytest.raises(ValueError, match="grouped or non-zero-padded convolutions are not supported"):
        check_fits("proj_in", experts, conv)


# ---------------------------------------------------------------- load_adapters keeps the model's config

# Deliberately unlike every default and every shared fixture: 8 ranks, 4 experts, 4 bands, hidden 16.
ODD = dict(rank=8, alpha=2.0, num_experts=4, num_bands=4, router_tau=0.5, router_hidden=16)


def odd_model():
    """Two reference-matched Linears (child names contain to_q / to_v)."""
    torch.manual_seed(3)
    return nn.ModuleDict({"attn": nn.ModuleDict({"to_q": nn.Linear(12, 10), "to_v": nn.Linear(12, 6)})})


def odd_reference_file(path, rank=8, experts=4, bands=4, hidden=16):
    """A .pt as the reference's save_adapters writes it (tensors only), random non-zero weights."""
    g = torch.Generator().manual_seed(4)
    sd = {"router.net.0.weight": torch.randn(hidden, bands, generator=g), "router.net.0.bias": torch.randn(hidden, generator=g),
          "router.net.2.weight": torch.randn(experts, hidden, generator=g), "router.net.2.bias": torch.randn(experts, generator=g)}
    for name, out in (("to_q", 10), ("to_v", 6)):
        for m in range(experts):
            sd[f"base_model.attn.{name}.experts.{m}.lora_down.weight"] = torch.randn(rank, 12, generator=g) * 0.3
            sd[f"base_model.attn.{name}.experts.{m}.lora_up.weight"] = torch.randn(out, rank, generator=g) * 0.3
    torch.save(sd, path)
    return {k: v.double() for k, v in sd.items()}


def by_hand(sd, z, x, layer, name, alpha, tau, rank=8, experts=4, bands=4):
    """The reference's formulas, written out in float64 without fera_core: e_t from the DoG
    pyramid, routing softmax(net(e_t) / tau), output W x + b + sum_m w_m (alpha / rank) up_m down_m x."""
    energy = torch.stack([c.flatten(1).pow(2).sum(1) for c in reference_dog(z, bands)[:bands]], 1)
    e = energy / (energy.sum(1, keepdim=True) + 1e-8)
    hidden = torch.relu(e @ sd["router.net.0.weight"].T + sd["router.net.0.bias"])
    w = torch.softmax((hidden @ sd["router.net.2.weight"].T + sd["router.net.2.bias"]) / tau, dim=-1)
    out = x.double() @ layer.weight.double().T + layer.bias.double()
    for m in range(experts):
        down = sd[f"base_model.attn.{name}.experts.{m}.lora_down.weight"]
        up = sd[f"base_model.attn.{name}.experts.{m}.lora_up.weight"]
        out = out + w[:, m, None, None] * (alpha / rank) * (x.double() @ down.T @ up.T)
    return w, out


def routed_run(fm, model, z, x):
    with torch.no_grad():
        w = fm.prepare_forward(z)
        return w, {name: model["attn"][name](x) for name in ("to_q", "to_v")}


def rel_err(got, want):
    return ((got.double() - want).abs().max() / want.abs().max()).item()


ODD_Z = torch.cat([F.interpolate(torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(5)), size=(32, 32),
                                 mode="bicubic", align_corners=True),
                   torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(6))])  # smooth, noise
ODD_X = torch.randn(2, 5, 12, generator=torch.Generator().manual_seed(7))


def test_load_adapters_of_reference_pt_keeps_the_models_alpha_and_tau(tmp_path):
    """The issue's case: FeRAModel(unet, FeRAConfig(non-default)); load_adapters(file.pt) without
    passing alpha and tau again reproduces the reference formulas to 1e-5."""
    sd = odd_reference_file(tmp_path / "odd.pt")
    model = odd_model()
    fm = FeRAModel(model, FeRAConfig(**ODD))
    fm.load_adapters(tmp_path / "odd.pt")
    assert (fm.config.alpha, fm.config.router_tau, fm.router.tau) == (2.0, 0.5, 0.5)
    assert all(layer.experts.scale == 2.0 / 8 for layer in fm.fera_layers)
    w, outs = routed_run(fm, model, ODD_Z, ODD_X)
    for name, out in outs.items():
        want_w, want = by_hand(sd, ODD_Z, ODD_X, model["attn"][name], name, alpha=2.0, tau=0.5)
        assert rel_err(w, want_w) < 1e-5 and rel_err(out, want) < 1e-5, name
        # The reference defaults (alpha 1, tau 0.7) give other numbers, by far more than the tolerance.
        old_w, old = by_hand(sd, ODD_Z, ODD_X, model["attn"][name], name, alpha=1.0, tau=0.7)
        assert rel_err(w, old_w) > 1e-2 and rel_err(out, old) > 1e-2, name


def test_load_adapters_of_reference_pt_with_explicit_values(tmp_path):
    """Values passed explicitly win and become the model's; what is not passed stays the model's."""
    sd = odd_reference_file(tmp_path / "odd.pt")
    model = odd_model()
    fm = FeRAModel(model, FeRAConfig(**ODD))
    fm.load_adapters(tmp_path / "odd.pt", alpha=3.0)
    assert (fm.config.alpha, fm.config.router_tau, fm.router.tau) == (3.0, 0.5, 0.5)
    w, outs = routed_run(fm, model, ODD_Z, ODD_X)
    want_w, want = by_hand(sd, ODD_Z, ODD_X, model["attn"]["to_q"], "to_q", alpha=3.0, tau=0.5)
    assert rel_err(w, want_w) < 1e-5 and rel_err(outs["to_q"], want) < 1e-5


@pytest.mark.parametrize("differ,named", [
    (dict(alpha=1.0, router_tau=0.7), ["alpha 2.0 (model: 1.0)", "router_tau 0.5 (model: 0.7)"]),
    (dict(indicator="partition"), ["indicator 'reference' (model: 'partition')"]),
    (dict(rank=4, num_experts=3, num_bands=3, router_hidden=64),
     ["rank 8 (model: 4)", "num_experts 4 (model: 3)", "num_bands 4 (model: 3)", "router_hidden 16 (model: 64)"]),
])
def test_load_adapters_of_safetensors_with_another_config_names_each_field(tmp_path, differ, named):
    odd_reference_file(tmp_path / "odd.pt")
    path = save_adapter(load_adapter(tmp_path / "odd.pt", alpha=2.0, tau=0.5), tmp_path / "odd.safetensors")
    model = odd_model()
    fm = FeRAModel(model, FeRAConfig(**{**ODD, **differ}))
    randomise(fm)
    snap = snapshot(fm)
    with pytest.raises(ValueError, match="the file's config differs from this model's") as info:
        fm.load_adapters(path)
    message = str(info.value)
    assert message.startswith(str(path)) and all(n in message for n in named), message
    assert message.count("(model: ") == len(named)  # only the fields that differ
    assert_unchanged(fm, snap)

    same = FeRAModel(odd_model(), FeRAConfig(**ODD))
    same.load_adapters(path)  # configured like the file: loads
    assert (same.config.alpha, same.config.router_tau) == (2.0, 0.5)
