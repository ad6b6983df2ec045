"""FeRA on tiny SD1.5, SD3 and Flux models of ComfyUI's own classes (COMFYUI_PATH).

An independent check of the layer mapping, including the fused q/k/v slices of SD3 and
Flux: with the router forced onto expert m, Apply FeRA must equal ComfyUI's own LoRA loader
given expert m's weights as a plain LoRA keyed by diffusers module names (ComfyUI maps them,
and slices fused layers, itself).
"""
import pytest
import torch

from comfy_host import pack_module, setup_comfy

setup_comfy()
import comfy.lora  # noqa: E402
import comfy.model_management  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.sample  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.supported_models as sm  # noqa: E402

from fera_core import FeRAAdapter, FeRAConfig, RoutedExperts, RoutingControls  # noqa: E402
from fera_core.trace import RoutingTrace  # noqa: E402
from test_comfy_apply import TINY_UNET  # noqa: E402

keys = pack_module("nodes.keys")
apply_fera = pack_module("nodes.routing").apply_fera

ATTENTION = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
FAMILIES = {
    "sd15": (sm.SD15, TINY_UNET, 4, 32),
    "sd3": (sm.SD3, {"in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": 2, "input_size": None,
                     "adm_in_channels": 32, "num_patches": 256, "pos_embed_max_size": 16,
                     "context_embedder_config": {"target": "torch.nn.Linear",
                                                 "params": {"in_features": 32, "out_features": 128}},
                     "pos_embed_scaling_factor": None, "x_block_self_attn_layers": []}, 16, 32),
    "flux": (sm.Flux, {"image_model": "flux", "in_channels": 16, "patch_size": 2, "out_channels": 16,
                       "vec_in_dim": 32, "context_in_dim": 32, "hidden_size": 64, "mlp_ratio": 2.0, "num_heads": 2,
                       "depth": 1, "depth_single_blocks": 1, "axes_dim": [8, 12, 12], "theta": 10000,
                       "qkv_bias": True, "guidance_embed": False}, 16, 32),
}


def tiny(family):
    cls, cfg, channels, ctx = FAMILIES[family]
    mc = cls(dict(cfg))
    mc.set_inference_dtype(torch.float32, None)
    model = mc.get_model({}, "model.diffusion_model.")
    gen = torch.Generator().manual_seed(0)
    model.diffusion_model.load_state_dict(
        {k: torch.randn(v.shape, generator=gen) * 0.05 for k, v in model.diffusion_model.state_dict().items()})
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu), channels, ctx


def adapter_for(model, seed=1):
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    for path, (comfy_path, rows) in keys.diffusers_to_comfy(model).items():
        if path.endswith(ATTENTION):
            layer = model.get_submodule(comfy_path)
            e = RoutedExperts(layer.in_features, rows[1] if rows else layer.out_features, 3, 4, 2.0)
            with torch.no_grad():
                e.up.copy_(torch.randn(e.up.shape, generator=gen) * 0.3)
            layers[path] = e
    return FeRAAdapter(FeRAConfig(alpha=2.0, indicator="partition", match_full_name=True,
                                  target_modules=list(ATTENTION)), layers)


def expert_as_lora(model, adapter, m, strength):
    """Expert m of every layer as a plain LoRA keyed by the diffusers module name, in a format ComfyUI's
    loader maps itself (diffusers' transformer.* for SD3/Flux, kohya's lora_unet_* for UNets): the
    LoRA side never goes through nodes/keys.py, so a wrong or swapped target there shows up."""
    known = comfy.lora.model_lora_keys_unet(model, {})
    lora = {}
    for path, experts in adapter.layers.items():
        key = next((k for k in (f"transformer.{path}", "lora_unet_" + path.replace(".", "_")) if k in known), None)
        assert key is not None, f"ComfyUI's LoRA loader has no key for {path}"
        down, up = experts.split()[m]
        lora[f"{key}.lora_down.weight"] = down.detach().clone()
        lora[f"{key}.lora_up.weight"] = up.detach() * experts.scale * strength
    return lora


def run(patcher, channels, ctx, cfg=3.0):
    gen = torch.Generator().manual_seed(4)
    cond = lambda: [[torch.randn(1, 7, ctx, generator=gen), {"pooled_output": torch.randn(1, 32, generator=gen)}]]
    pos, neg = cond(), cond()
    yy, xx = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    lat = torch.stack([torch.sin(xx / 4 + yy / 5).expand(channels, 8, 8), ((xx + yy) % 2 * 2 - 1).expand(channels, 8, 8)])
    out = comfy.sample.sample(patcher, torch.randn(2, channels, 8, 8, generator=gen), 2, cfg, "euler", "simple",
                              pos, neg, lat * 2, denoise=0.8, seed=4, disable_pbar=True)
    comfy.model_management.unload_all_models()
    return out


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_forced_expert_equals_comfyui_lora_of_that_expert(family):
    patcher, channels, ctx = tiny(family)
    adapter = adapter_for(patcher.model)
    assert len(adapter.layers) >= 8
    plain = run(patcher, channels, ctx)
    for m, strength in ((0, 1.0), (2, 0.5)):
        fera = run(apply_fera(patcher, adapter, strength, RoutingControls.forced(m, 3)), channels, ctx)
        lora, _ = comfy.sd.load_lora_for_models(patcher, None, expert_as_lora(patcher.model, adapter, m, strength), 1.0, 0)
        want = run(lora, channels, ctx)
        assert (want - plain).abs().max() > 1e-3, "the LoRA had no effect: the comparison would prove nothing"
        torch.testing.assert_close(fera, want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_rows_with_different_spectra_are_routed_differently(family):
    patcher, channels, ctx = tiny(family)
    adapter = adapter_for(patcher.model)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in adapter.router.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    trace = RoutingTrace()
    run(apply_fera(patcher, adapter, 1.0, trace=trace), channels, ctx)
    first = [r for r in trace.rows() if r["call"] == 0 and r["cond"] == "cond"]
    assert [r["row"] for r in first] == [0, 1]
    assert max(abs(a - b) for a, b in zip(first[0]["weights"], first[1]["weights"])) > 1e-3
