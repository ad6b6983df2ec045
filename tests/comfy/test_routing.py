"""Apply FeRA in a real ComfyUI (COMFYUI_PATH): tiny SD1.5-architecture models with random weights.

The patched ModelPatcher is checked against fera_core's own computation on the same weights:
plain torch forward hooks (fera_core.model.FeRALayer) on the same layers, routed from the
latent rows the diffusion model receives.
"""
import pytest
import torch

from comfy_host import pack_module, setup_comfy

setup_comfy()
import comfy.model_management  # noqa: E402
import comfy.ops  # noqa: E402

from fera_core import FeRAAdapter, RoutedExperts, band_energies  # noqa: E402
from fera_core.model import FeRALayer  # noqa: E402
from fera_core.trace import RoutingTrace  # noqa: E402
from tiny_sampling import conds, make_adapter, sample, tiny_patcher  # noqa: E402

routing_mod = pack_module("nodes.routing")
keys = pack_module("nodes.module_paths")
apply_fera = routing_mod.apply_fera


class PlainFeRA:
    """fera_core's own FeRA on the ComfyUI modules: torch hooks, routing from the diffusion model's input."""

    def __init__(self, model, adapters):
        self.handles, self.layers = [], []
        names = keys.diffusers_to_comfy(model)
        for adapter, strength in adapters:
            layers = [FeRALayer(p, model.get_submodule(names[p][0]), e) for p, e in adapter.layers.items()]

            def route(_mod, args, adapter=adapter, layers=layers, strength=strength):
                cfg = adapter.config
                w = adapter.router(band_energies(args[0], cfg.num_bands, cfg.indicator)) * strength
                for layer in layers:
                    layer.set_routing_weights(w)

            self.handles.append(model.diffusion_model.register_forward_pre_hook(route))
            self.layers += layers

    def remove(self):
        for h in self.handles:
            h.remove()
        for layer in self.layers:
            layer.remove()


def expected(patcher, adapters, **kw):
    """Sampling with fera_core's plain hooks for [(adapter, strength), ...]."""
    plain = PlainFeRA(patcher.model, adapters)
    try:
        return sample(patcher, **kw)
    finally:
        plain.remove()


def base_state(model):
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: dict(m._forward_hooks) for n, m in model.named_modules() if m._forward_hooks})


def assert_base_intact(model, state):
    weights, hooks = state
    now = model.state_dict()
    assert weights.keys() == now.keys()
    assert all(torch.equal(weights[k], now[k]) for k in weights)
    assert {n: dict(m._forward_hooks) for n, m in model.named_modules() if m._forward_hooks} == hooks


def test_patched_prediction_equals_fera_core_with_cfg_and_distinct_rows(patcher, adapter):
    trace = RoutingTrace()
    fera = apply_fera(patcher, adapter, 1.0, trace=trace)
    got = sample(fera)
    want = expected(patcher, [(adapter, 1.0)])
    plain = sample(patcher)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)  # measured: 1e-5 apart
    assert (got - plain).abs().max() > 0.05, "experts had no visible effect"  # measured: 0.34
    rows = trace.rows()
    assert len(rows) == 3 * 4  # 3 euler steps, cond + uncond of 2 latents per call
    assert {r["cond"] for r in rows} == {"cond", "uncond"}
    first = [r for r in rows if r["call"] == 0 and r["cond"] == "cond"]
    assert first[0]["row"] == 0 and first[1]["row"] == 1
    assert max(abs(a - b) for a, b in zip(first[0]["weights"], first[1]["weights"])) > 0.01  # measured: 0.14



@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.float16, 1e-2)])
def test_experts_on_convolutions(dtype, tol):
    """Experts on 3x3 convolutions (a ResBlock's conv1 and conv2) equal fera_core's hooks on the same
    ComfyUI layers, in float32 and in a float16 model (the experts cast to the layer's dtype).
    Measured (|out| ~60): float32 1.1e-5 apart; float16 0 when both paths round alike, but up to 3e-3 in
    one element of 512 on a loaded machine (float16 keeps 11 significant bits: one rounding step of an
    activation of size 4-8 is 4e-3-8e-3), hence 1e-2, still 13x below the effect of 0.13-0.16."""
    patcher = tiny_patcher(dtype)
    names = keys.diffusers_to_comfy(patcher.model)
    gen = torch.Generator().manual_seed(4)
    layers = {}
    for path in ("down_blocks.0.resnets.0.conv1", "down_blocks.0.resnets.0.conv2"):
        conv = patcher.model.get_submodule(names[path][0])
        e = RoutedExperts(conv.in_channels, conv.out_channels, 3, 4, 1.0, kernel_size=(3, 3))
        with torch.no_grad():
            e.down.copy_(torch.randn(e.down.shape, generator=gen) * 0.3)
            e.up.copy_(torch.randn(e.up.shape, generator=gen) * 3.0)
        layers[path] = e
    conv_adapter = FeRAAdapter(make_adapter(patcher.model).config, layers)
    got = sample(apply_fera(patcher, conv_adapter, 1.0))
    want = expected(patcher, [(conv_adapter, 1.0)])
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=tol)
    assert (got.float() - sample(patcher).float()).abs().max() > 0.1

@pytest.mark.parametrize("sampler, scheduler", [("dpmpp_2m", "karras"), ("dpmpp_sde", "exponential"),
                                                ("uni_pc", "sgm_uniform"), ("ddim", "ddim_uniform"),
                                                ("euler_ancestral", "beta")])
def test_samplers_and_schedulers(patcher, adapter, sampler, scheduler):
    kw = dict(sampler=sampler, scheduler=scheduler, steps=4)
    got = sample(apply_fera(patcher, adapter, 1.0), **kw)
    torch.testing.assert_close(got, expected(patcher, [(adapter, 1.0)], **kw), rtol=1e-5, atol=1e-5)
    # measured effects 0.25 (ddim) to 1.0; the equality above allows at most 2e-3 on these outputs
    assert (got - sample(patcher, **kw)).abs().max() > 0.05


def test_strength_zero_is_bit_identical_and_base_is_restored(patcher, adapter):
    state = base_state(patcher.model)
    plain = sample(patcher)
    assert torch.equal(sample(apply_fera(patcher, adapter, 0.0)), plain)
    sample(apply_fera(patcher, adapter, 1.0))
    assert_base_intact(patcher.model, state)
    assert torch.equal(sample(patcher), plain)


def test_failed_sampling_leaves_base_intact(patcher, adapter):
    class Exploding(RoutingTrace):
        def record(self, *args, **kwargs):
            if self.calls:
                raise RuntimeError("boom in the middle of sampling")
            super().record(*args, **kwargs)

    state = base_state(patcher.model)
    plain = sample(patcher)
    failing = apply_fera(patcher, adapter, 1.0, trace=Exploding(), tracing=True)
    with pytest.raises(RuntimeError, match="boom"):
        sample(failing)
    comfy.model_management.unload_all_models()
    assert_base_intact(patcher.model, state)
    assert torch.equal(sample(patcher), plain)
    assert not routing_mod.routings_of(failing)[0].log.runs  # a failed run is nobody's trace


def test_two_fera_models_do_not_share_routing(patcher, adapter):
    other = make_adapter(patcher.model, seed=5)
    a, b = apply_fera(patcher, adapter, 1.0), apply_fera(patcher, other, 1.0)
    first = sample(a)
    sample(b)
    torch.testing.assert_close(sample(a), first, rtol=0, atol=0)
    torch.testing.assert_close(sample(b), expected(patcher, [(other, 1.0)]), rtol=1e-5, atol=1e-5)


def test_sampling_releases_the_device_copies(patcher, adapter, monkeypatch):
    """The router and expert copies made for a run's device and dtype live in the run's state, which
    nothing keeps once the run ends (a reference kept on the shared FeRARouting would fail this)."""
    import gc
    import weakref
    runs = []

    class Run(routing_mod._Run):
        def __init__(self, *args):
            super().__init__(*args)
            runs.append((weakref.ref(self), self.experts, self.routers))

    monkeypatch.setattr(routing_mod, "_Run", Run)
    model = apply_fera(patcher, adapter, 1.0)
    sample(model)
    gc.collect()
    assert runs and all(experts and routers for _, experts, routers in runs)  # the run made its copies
    assert all(ref() is None for ref, _, _ in runs)
    assert routing_mod.routings_of(model)[0].call is None


def test_chains_with_second_adapter_and_lora(patcher, adapter):
    other = make_adapter(patcher.model, seed=5)
    chained = apply_fera(apply_fera(patcher, adapter, 1.0), other, 0.5)
    both = sample(chained)
    torch.testing.assert_close(both, expected(patcher, [(adapter, 1.0), (other, 0.5)]), rtol=1e-5, atol=1e-5)
    only_a = sample(apply_fera(patcher, adapter, 1.0))
    assert (both - only_a).abs().max() > 0.03  # measured: 0.22
    # order of two FeRA applications does not matter (the updates add up)
    torch.testing.assert_close(sample(apply_fera(apply_fera(patcher, other, 0.5), adapter, 1.0)), both,
                               rtol=1e-5, atol=1e-5)
    # a ComfyUI LoRA before or after FeRA composes the same way
    import comfy.sd
    names = keys.diffusers_to_comfy(patcher.model)
    target = names["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v"][0]
    layer = patcher.model.get_submodule(target)
    gen = torch.Generator().manual_seed(9)
    lora = {f"{target}.lora_up.weight": torch.randn(layer.out_features, 2, generator=gen),
            f"{target}.lora_down.weight": torch.randn(2, layer.in_features, generator=gen)}
    lora_first, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0)
    lora_then_fera = sample(apply_fera(lora_first, adapter, 1.0))
    fera_then_lora, _ = comfy.sd.load_lora_for_models(apply_fera(patcher, adapter, 1.0), None, lora, 1.0, 0)
    torch.testing.assert_close(sample(fera_then_lora), lora_then_fera, rtol=1e-5, atol=1e-5)
    assert (lora_then_fera - only_a).abs().max() > 0.01  # measured: 0.063


def test_area_conditioning_routes_the_rows_each_call_receives(patcher, adapter):
    pos, neg = conds()
    gen = torch.Generator().manual_seed(11)
    area = [[torch.randn(1, 77, 32, generator=gen), {"area": (4, 4, 0, 0), "strength": 1.0}]]
    positive = pos + area
    got = sample(apply_fera(patcher, adapter, 1.0), positive=positive, negative=neg)
    torch.testing.assert_close(got, expected(patcher, [(adapter, 1.0)], positive=positive, negative=neg),
                               rtol=1e-5, atol=1e-5)


def test_sigma_range_and_controls(patcher, adapter):
    plain = sample(patcher)
    assert torch.equal(sample(apply_fera(patcher, adapter, 1.0, start_percent=1.0, end_percent=1.0)), plain)
    zero_gain = routing_mod.RoutingControls(gains=[0.0, 0.0, 0.0])
    torch.testing.assert_close(sample(apply_fera(patcher, adapter, 1.0, zero_gain)), plain, rtol=1e-6, atol=1e-6)
    forced = [sample(apply_fera(patcher, adapter, 1.0, routing_mod.RoutingControls.forced(m, 3))) for m in range(3)]
    assert (forced[0] - forced[1]).abs().max() > 0.05  # measured: 0.82
    with pytest.raises(ValueError, match="start_percent"):
        apply_fera(patcher, adapter, 1.0, start_percent=0.8, end_percent=0.2)


@pytest.mark.parametrize("dtype, bound", [(torch.float16, 0.15), (torch.bfloat16, 0.5)])
def test_half_precision_models(dtype, bound):
    """The experts move a half-precision model's sample as they move the float32 model's.

    Compared: the effects (with minus without FeRA, in each precision), so that the model's own
    rounding, as large as the effect in bfloat16, cancels. Measured relative error of the
    effect: 0.023 (float16), 0.17 (bfloat16); experts missing or doubled give 1."""
    p32, p16 = tiny_patcher(), tiny_patcher(dtype)
    adapter = make_adapter(p32.model)
    effect32 = sample(apply_fera(p32, adapter, 1.0)) - sample(p32)
    got = sample(apply_fera(p16, adapter, 1.0))
    assert torch.isfinite(got).all()
    effect16 = got.float() - sample(p16).float()
    assert effect32.abs().max() > 0.1
    assert (effect16 - effect32).norm() < bound * effect32.norm()


def test_layers_that_cast_weights_per_call(patcher, adapter):
    want = sample(apply_fera(patcher, adapter, 1.0))
    casts = [m for m in patcher.model.modules() if isinstance(m, comfy.ops.CastWeightBiasOp)]
    assert casts
    for m in casts:
        m.comfy_cast_weights = True
    try:
        torch.testing.assert_close(sample(apply_fera(patcher, adapter, 1.0)), want, rtol=1e-6, atol=1e-6)
    finally:
        for m in casts:
            m.comfy_cast_weights = False


def test_half_precision_adapter_runs_in_float32_and_is_left_as_it_was(patcher, adapter):
    """A file may store the adapter in float16: sampling routes with a float32 copy of its router and
    casts its experts per run, and the loaded adapter itself keeps its dtype and values (another
    Apply FeRA may share it). Against the same rounded values in float32: equal to 1e-6, while the
    adapter's effect on the sample is >1e-2."""
    import copy

    half = copy.deepcopy(adapter).to(torch.float16)
    before = {k: v.clone() for k, v in half.state_dict().items()}
    got = sample(apply_fera(patcher, half, 1.0))
    want = sample(apply_fera(patcher, copy.deepcopy(half).float(), 1.0))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert (got - sample(patcher)).abs().max() > 1e-2
    after = half.state_dict()
    assert all(after[k].dtype == torch.float16 and torch.equal(after[k], v) for k, v in before.items())


def test_adapter_that_does_not_fit_is_refused_without_patching(patcher, adapter):
    """Four layers the model lacks and three of other shapes: the message counts both, shows the first
    three missing names and the first two misfits (each naming its layer), and nothing is patched."""
    missing = [f"mid_block.attentions.{i}.transformer_blocks.0.attn1.to_q" for i in range(9, 13)]
    misfits = list(adapter.layers)[:3]  # reported in the adapter's order
    bogus = FeRAAdapter(adapter.config, {**adapter.layers, **{p: RoutedExperts(64, 64) for p in missing},
                                         **{p: RoutedExperts(7, 64) for p in misfits}})
    before = (dict(patcher.object_patches), {k: dict(v) for k, v in patcher.wrappers.items()})
    with pytest.raises(routing_mod.AdapterMismatchError) as err:
        apply_fera(patcher, bogus, 1.0)
    msg = str(err.value)
    n = len(adapter.layers)
    assert f"{n - 3} of {n + 4} layers match, 4 have no counterpart (e.g. {missing[:3]}), 3 have other shapes (e.g. [" in msg
    assert "does not fit this SD1.5 model" in msg and msg.endswith("]). Nothing was patched.")
    assert missing[3] not in msg and [f"experts for {p} have in 7" in msg for p in misfits] == [True, True, False]
    with pytest.raises(routing_mod.AdapterMismatchError) as err:  # misfits only: no empty "missing" part
        apply_fera(patcher, FeRAAdapter(adapter.config, {**adapter.layers, misfits[0]: RoutedExperts(7, 64)}), 1.0)
    assert f"{n - 1} of {n} layers match, 1 have other shapes (e.g. [" in str(err.value)
    assert "counterpart" not in str(err.value)
    with pytest.raises(routing_mod.AdapterMismatchError) as err:  # missing only: no empty "misfit" part
        apply_fera(patcher, FeRAAdapter(adapter.config, {missing[0]: RoutedExperts(64, 64)}), 1.0)
    assert f"0 of 1 layers match, 1 have no counterpart (e.g. {missing[:1]}). Nothing was patched." in str(err.value)
    assert (dict(patcher.object_patches), {k: dict(v) for k, v in patcher.wrappers.items()}) == before
