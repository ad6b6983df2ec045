"""Baked LoRAs in a real ComfyUI (COMFYUI_PATH), read by ComfyUI's own LoRA loader.

A fixed-mix bake must equal Apply FeRA forced to that mix (tiny SD1.5, SD3 and Flux models of
ComfyUI's classes, fused q/k/v included), and every key of a bake for any full-size family the pack
applies to must land, with nothing left over, on the layer (and row slice) Apply FeRA patches.
"""
import logging

import pytest
import torch

from comfy_host import FAMILIES as FULL_SIZE, TINY_FAMILIES, build_model, pack_module, setup_comfy, tiny_model

setup_comfy()
import comfy.lora  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402

from fera_core import RoutingControls  # noqa: E402
from fera_core.bake.lora import bake_lora, key_style, lora_keys, router_mix, save_lora  # noqa: E402
from tiny_sampling import adapter_for, make_adapter, run, sample, tiny_patcher  # noqa: E402

keys = pack_module("nodes.module_paths")
apply_fera = pack_module("nodes.routing").apply_fera


def comfy_lora(patcher, path, strength, caplog):
    """The file as ComfyUI's LoraLoader reads it; fails on any key ComfyUI does not load."""
    lora = comfy.utils.load_torch_file(str(path), safe_load=True)
    with caplog.at_level(logging.WARNING):
        caplog.clear()
        model, _ = comfy.sd.load_lora_for_models(patcher, None, lora, strength, 0)
    leftovers = [r.getMessage() for r in caplog.records if "not loaded" in r.getMessage().lower()]
    assert not leftovers, leftovers[:3]
    return model


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_fixed_mix_bake_equals_fera_forced_to_that_mix(family, tmp_path, caplog):
    """Tolerance 1e-4 as in test_families (ComfyUI merges the LoRA into the weights, FeRA adds it
    in the forward: float32 sums in another order); the LoRA's effect is checked to be far larger."""
    patcher = tiny_model(family)
    adapter = adapter_for(patcher.model)
    plain = run(patcher)
    for controls, strength in ((RoutingControls(mix=[0.2, 0.5, 0.3]), 1.0), (RoutingControls.forced(2, 3), 0.5)):
        fera = run(apply_fera(patcher, adapter, strength, controls))
        path = save_lora(*bake_lora(adapter, router_mix(adapter, controls=controls)), tmp_path / "baked.safetensors")
        baked = run(comfy_lora(patcher, path, strength, caplog))
        assert (fera - plain).abs().max() > 1e-2, "FeRA had no effect: the comparison would prove nothing"
        torch.testing.assert_close(baked, fera, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", sorted(FULL_SIZE))
def test_every_baked_key_lands_where_apply_fera_patches(family, caplog):
    """Key naming for the released architectures (meta device: names only): each key of a bake over every
    adapted-able attention and MLP projection maps to the same ComfyUI weight (and fused q/k/v slice)."""
    model = build_model(family)
    names = keys.diffusers_to_comfy(model)
    style = key_style(names)
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    for path, (comfy_path, rows) in names.items():
        stem = lora_keys(path, style)[0].rsplit(".", 2)[0]
        assert stem in key_map, (family, path, stem)
        target = key_map[stem]
        if rows is None:
            assert target == comfy_path + ".weight", (path, target)
        else:
            assert target[0] == comfy_path + ".weight" and tuple(target[1][1:]) == rows and target[1][0] == 0, (path, target)
    # and the loader takes a file of such keys whole (shapes do not matter to the key matching)
    lora = {}
    for path in names:
        down, up = lora_keys(path, style)
        lora[down], lora[up] = torch.zeros(1, 1), torch.zeros(1, 1)
    with caplog.at_level(logging.WARNING):
        caplog.clear()
        loaded = comfy.lora.load_lora(lora, key_map)
    assert not [r for r in caplog.records if "not loaded" in r.getMessage()]
    assert len(loaded) == len(set(names.values()))  # SDXL's map names add_embedding also class_embedding


# ---------------------------------------------------------------- the nodes

bake_nodes = pack_module("nodes.bake_nodes")
pack_bake = pack_module("fera_core.bake")


def test_bake_node_writes_new_files_that_comfyui_loads_as_fera_at_that_mix(models_dir, caplog):
    patcher = tiny_patcher()
    adapter = make_adapter(patcher.model)
    out = bake_nodes.BakeFeRAToLoRA.execute(adapter, "mix", "baked/fera", 4.0, mix="1, 2, 1")
    name = out.args[0]
    assert name == "baked/fera_00001.safetensors" and "mix 0.2500, 0.5000, 0.2500" in out.ui["text"][0]
    again = bake_nodes.BakeFeRAToLoRA.execute(adapter, "expert", "baked/fera", 1.0, expert=2).args[0]
    assert again == "baked/fera_00002.safetensors"  # never overwrites
    path = models_dir / "loras" / name
    _, info = pack_bake.read_baked_lora(path)
    assert info["mix"] == [0.25, 0.5, 0.25] and info["strength"] == 4.0 and info["source"] == {"kind": "mix"}
    fera = sample(apply_fera(patcher, adapter, 4.0, RoutingControls(mix=[1, 2, 1])))
    baked = sample(comfy_lora(patcher, path, 1.0, caplog))
    effect, error = (fera - sample(patcher)).abs().max(), (baked - fera).abs().max()
    # outputs reach ~30: 2e-4 is float32 noise of sums taken in another order, 100x below the effect
    assert error < 2e-4 < effect / 100


def test_router_source_reads_the_latent(models_dir):
    patcher = tiny_patcher()
    adapter = make_adapter(patcher.model)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    name = bake_nodes.BakeFeRAToLoRA.execute(adapter, "router (latent)", "r", 1.0, latent={"samples": z},
                                             temperature=0.5).args[0]
    _, info = pack_bake.read_baked_lora(models_dir / "loras" / name)
    want = router_mix(adapter, latent=z, controls=RoutingControls(tau=0.5))
    assert info["mix"] == pytest.approx(want, abs=1e-7) and info["source"]["latent_shape"] == [2, 4, 8, 8]


@pytest.mark.parametrize("kwargs, message", [
    (dict(mix_source="router (latent)"), "needs the latent input connected"),
    (dict(mix_source="trace window"), "needs the trace input connected"),
    (dict(mix_source="mix", mix="1, 2"), "mix needs one value per expert (3)"),
    (dict(mix_source="expert", expert=3), "forced expert 3 is out of range 0..2"),
    (dict(mix_source="mix", filename_prefix="../escape"), "must be a relative file name inside"),
    (dict(mix_source="mix", filename_prefix="/tmp/abs"), "must be a relative file name inside"),
    (dict(mix_source="mix", filename_prefix=" "), "must be a relative file name inside"),
])
def test_bake_node_refuses_bad_requests_and_writes_nothing(models_dir, kwargs, message):
    patcher = tiny_patcher()
    adapter = make_adapter(patcher.model)
    args = dict(filename_prefix="x", strength=1.0) | kwargs
    with pytest.raises(ValueError) as err:
        bake_nodes.BakeFeRAToLoRA.execute(adapter, **args)
    assert message in str(err.value)
    assert list((models_dir / "loras").rglob("*")) == []
