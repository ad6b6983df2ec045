"""FeRA on the families beyond SD1.5-Flux, on tiny models of ComfyUI's own classes (COMFYUI_PATH).

Wan 2.1 T2V and I2V, Wan 2.2 5B, Qwen-Image, Flux.2, Chroma, Z-Image, Lumina 2, HunyuanVideo 1.5, LTX-Video
and HiDream (native_models.py;
most exist only in ComfyUI 0.33.0, a host without the class skips). For each: Train FeRA's
presets find layers by structure and name them (diffusers names where ComfyUI maps them all,
else ComfyUI's own); the adapter acts; strength 0 is the base model bit for bit; forced experts
differ; training lowers the loss; save -> load -> apply reproduces the trained MODEL; and a
fixed-mix bake, read by ComfyUI's own LoRA loader, equals Apply FeRA at that mix.
"""
import dataclasses
import logging

import pytest
import torch

from comfy_host import TINY_CONTEXT, pack_module, setup_comfy
from native_models import NATIVE, adapter_for, conds, fixed_loss, latent_shape, native_model, preset_of, run, train

setup_comfy()
import comfy.model_management  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402

from fera_core import RoutingControls, load_adapter, save_adapter  # noqa: E402
from fera_core.adapter_file import FeRAAdapter  # noqa: E402
from fera_core.model import new_experts  # noqa: E402
from fera_core.adapter_file import COMFY, DIFFUSERS  # noqa: E402
from fera_core.bake.lora import bake_lora, router_mix, save_lora  # noqa: E402

routing = pack_module("nodes.routing")
train_nodes = pack_module("nodes.train_nodes")

FAMILIES = sorted(NATIVE)
# Where ComfyUI's diffusers map names every layer of the 'attention' preset (and tiles its fused q/k/v)
DIFFUSERS_NAMED = {"zimage", "chroma", "flux2"}


@pytest.mark.parametrize("family", FAMILIES)
def test_presets_find_block_layers_by_structure(family):
    """'attention' is a subset of 'attention + feed-forward', itself a subset of all block Linears (by
    ComfyUI layer); the file records the resolved list; the namespace is diffusers only where ComfyUI
    maps every chosen layer."""
    model = native_model(family).model
    counts = []
    for preset in train_nodes.PRESETS:
        namespace, layers = train_nodes.preset_layers(model, preset)
        counts.append(len({id(layer) for layer, _ in layers.values()}))
        if preset == "attention":
            assert namespace == (DIFFUSERS if family in DIFFUSERS_NAMED else COMFY), (family, namespace)
            assert all("attn" in p or "attention" in p for p in layers), list(layers)
    assert 0 < counts[0] < counts[1] <= counts[2], counts
    adapter = adapter_for(native_model(family), "attention")
    assert adapter.config.target_modules == list(adapter.layers)
    assert adapter.config.base_model == pack_module("nodes.module_paths").model_family(model).id


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_acts_strength_zero_is_the_base_and_experts_differ(family):
    patcher = native_model(family)
    adapter = adapter_for(patcher, preset_of(family))
    plain = run(patcher, family)
    assert torch.equal(run(routing.apply_fera(patcher, adapter, 0.0), family), plain)
    routed = run(routing.apply_fera(patcher, adapter, 1.0), family)
    forced = [run(routing.apply_fera(patcher, adapter, 1.0, RoutingControls.forced(m, 3)), family) for m in (0, 1)]
    effect, apart = (routed - plain).abs().max(), (forced[0] - forced[1]).abs().max()
    # float32 rounding is ~1e-6 here; measured on 0.33.0: effects of 0.024 (flux2) .. 20 (zimage)
    assert effect > 5e-3 and apart > 5e-3, (family, effect, apart)


@pytest.mark.parametrize("family", FAMILIES)
def test_fixed_mix_bake_through_comfyui_loader_equals_apply_fera(family, tmp_path, caplog):
    """Tolerance as in test_comfy_bake (merged weights vs. forward-time sum: float32 order); every key
    of the file is loaded (ComfyUI logs the ones it is not)."""
    patcher = native_model(family)
    adapter = adapter_for(patcher, preset_of(family))
    controls = RoutingControls(mix=[0.2, 0.5, 0.3])
    fera = run(routing.apply_fera(patcher, adapter, 0.7, controls), family)
    path = save_lora(*bake_lora(adapter, router_mix(adapter, controls=controls), 0.7), tmp_path / "b.safetensors")
    lora = comfy.utils.load_torch_file(str(path), safe_load=True)
    with caplog.at_level(logging.WARNING):
        caplog.clear()
        baked_model, _ = comfy.sd.load_lora_for_models(patcher, None, lora, 1.0, 0)
    assert not [r for r in caplog.records if "not loaded" in r.getMessage().lower()]
    baked = run(baked_model, family)
    assert (fera - run(patcher, family)).abs().max() > 5e-3
    torch.testing.assert_close(baked, fera, rtol=1e-4, atol=2e-4)


def _data(family, n=2):
    shape = latent_shape(family, n)
    grid = torch.arange(shape[-1], dtype=torch.float32)
    lat = torch.stack([torch.sin(grid[:, None] / (3 + i) + grid[None, :] / 4).expand(shape[1:]) for i in range(n)])
    return lat * 2, conds(7, family)


@pytest.mark.parametrize("family", FAMILIES)
def test_training_lowers_the_loss_and_the_saved_file_reproduces_the_model(family, tmp_path):
    """Loss on 8 fixed draws (a 1e-12 learning rate: weights do not move) falls by 3% or more after 20
    steps (measured on 0.33.0: 11% flux2, 30% wan21_t2v); the trained adapter, saved and loaded, gives the sample the
    trained MODEL gives."""
    with torch.inference_mode():
        patcher = native_model(family)
    lat, pos = _data(family)
    start = train_nodes.new_adapter(patcher.model, preset_of(family), 4, 4.0, 3, 3, 0.7, "partition", 0.1, 0)
    trained, _ = train(patcher, start, lat, pos)
    before, after = fixed_loss(patcher, start, lat, pos), fixed_loss(patcher, trained, lat, pos)
    assert after < 0.97 * before, (family, before, after)
    path = save_adapter(trained, tmp_path / "a.safetensors")
    loaded = load_adapter(path)
    assert loaded.key_namespace == trained.key_namespace and set(loaded.layers) == set(trained.layers)
    want = run(routing.apply_fera(patcher, trained, 1.0), family)
    torch.testing.assert_close(run(routing.apply_fera(patcher, loaded, 1.0), family), want, rtol=0, atol=0)


def test_a_layer_without_the_batch_on_axis_0_is_refused_by_name():
    """A hook that sees 6 rows in a call routed for 2 latents (tokens flattened into rows, as HiDream's
    MoE experts or Wan 2.2's per-token time embedding give) refuses; tiling the 2 mixes over the 6 rows,
    what a multiple of the batch would otherwise get, would route them silently wrong."""
    patcher = native_model("wan21_t2v")
    adapter = adapter_for(patcher, "attention")
    path = "blocks.0.self_attn.q"
    fera = routing.routings_of(routing.apply_fera(patcher, adapter, 1.0))[0]
    layer = patcher.model.diffusion_model.get_submodule(path)
    hook = fera.hook(f"diffusion_model.{path}", [(path, None)])
    fera.call = routing._Call({torch.float32: torch.ones(2, 12)}, {})
    x = torch.randn(2, 5, layer.in_features)
    assert hook(layer, (x,), layer(x)) is not None  # (B, L, C): routed
    flat = x.reshape(10, -1)[:6]
    with pytest.raises(routing.BatchAxisError, match=f"cannot route the layer diffusion_model.{path}: its input "
                                                     "has 6 rows on axis 0 where the model call has 2 latents"):
        hook(layer, (flat,), layer(flat))


def test_hidream_moe_experts_are_refused_by_the_batch_axis_guard():
    """HiDream's routed MoE experts take the tokens its gate sends them, flattened over the batch: the
    'attention + feed-forward' preset gives them experts, and sampling refuses, naming one (the per-family
    checks above use the 'attention' preset, whose layers all see the batch on axis 0)."""
    patcher = native_model("hidream")
    adapter = adapter_for(patcher, "attention + feed-forward")
    assert any(".experts." in path for path in adapter.layers)
    with pytest.raises(routing.BatchAxisError, match=r"cannot route the layer diffusion_model\.\S+\.experts\.\d+\.\w+: "
                                                     r"its input has \d+ rows on axis 0 where the model call has \d+ latents"):
        run(routing.apply_fera(patcher, adapter, 1.0), "hidream")
    comfy.model_management.unload_all_models()


def test_ltxv_per_token_timesteps_are_refused_by_the_batch_axis_guard():
    """LTX-Video embeds one timestep per token when a denoise mask gives tokens their own (image-to-video:
    the first frame kept): adaln_single's Linear then sees rows x tokens rows, and an adapter on it is
    refused by name; with one timestep per row it is routed. No preset picks it (not in the blocks)."""
    patcher = native_model("ltxv")
    path = "adaln_single.linear"
    assert not any(p.startswith("adaln_single") for preset in train_nodes.PRESETS
                   for p in train_nodes.preset_layers(patcher.model, preset)[1])
    base = adapter_for(patcher, "attention")
    config = dataclasses.replace(base.config, target_modules=[path])
    layer = patcher.model.diffusion_model.get_submodule(path)
    adapter = FeRAAdapter(config, {path: new_experts(layer, config)}, key_namespace=COMFY)
    with torch.no_grad():
        adapter.layers[path].up.normal_(0, 3.0, generator=torch.Generator().manual_seed(2))
    assert (run(routing.apply_fera(patcher, adapter, 1.0), "ltxv") - run(patcher, "ltxv")).abs().max() > 5e-3
    shape = latent_shape("ltxv")
    mask = torch.ones(shape[0], 1, *shape[2:])
    mask[:, :, 0] = 0
    tokens = shape[0] * shape[2] * shape[3] * shape[4]
    with pytest.raises(routing.BatchAxisError, match=f"cannot route the layer diffusion_model.{path}: its input has "
                                                     f"{tokens} rows on axis 0 where the model call has {shape[0]}"):
        comfy.sample.sample(routing.apply_fera(patcher, adapter, 1.0), torch.randn(shape), 2, 1.0, "euler", "simple",
                            conds(1, "ltxv"), conds(2, "ltxv"), torch.zeros(shape), noise_mask=mask, seed=4,
                            disable_pbar=True)
    comfy.model_management.unload_all_models()
