"""Baking a FeRA adapter at a fixed mix into one standard LoRA: equality with FeRA through diffusers'
own LoRA loader, key naming, metadata, and refusal of tampered baked files when read back."""
import json
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fera_core import AdapterFileError, FeRAModel, RoutingControls, load_adapter
from fera_core.bake.lora import (BAKED_META, KOHYA, TRANSFORMER, bake_lora, key_style, lora_keys, read_baked_lora,
                            router_mix, save_lora)

ALPHA = 8.0  # scale 2: the reference fixture's experts then move the tiny UNet's output by ~1e-2


@pytest.fixture
def adapter(ref_adapter_path):
    return load_adapter(ref_adapter_path, alpha=ALPHA, base_model="sd15")


def unet_out(unet, io):
    with torch.no_grad():
        return unet(io["z_t"], io["timesteps"], io["encoder_hidden_states"]).sample


def diffusers_with_lora(unet, path):
    """The tiny UNet inside a real StableDiffusionPipeline, the baked file loaded by load_lora_weights."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    pipe = StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet, scheduler=DDIMScheduler(clip_sample=False, steps_offset=1),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(path), adapter_name="baked")
    injected = [n for n, m in unet.named_modules() if hasattr(m, "lora_A") and "baked" in m.lora_A]
    return pipe.unet, injected


@pytest.mark.parametrize("source", ["mix", "expert", "router"])
def test_fixed_mix_bake_equals_forced_fera_through_diffusers(tiny_unet, reference_io, adapter, tmp_path, source):
    """Tolerance 1e-5 (relative to the output's largest value): the LoRA is merged by peft as an extra
    branch, FeRA adds the same products in another order; the effect under test is ~1000x larger."""
    pytest.importorskip("peft", reason="diffusers' load_lora_weights needs peft")
    io = reference_io
    controls = {"mix": RoutingControls(mix=[0.2, 0.3, 0.5]), "expert": RoutingControls.forced(1, 3),
                "router": None}[source]
    mix = router_mix(adapter, latent=io["z_t"][:1], controls=controls)
    assert len(mix) == 3 and abs(sum(mix) - 1) < 1e-6
    base = unet_out(tiny_unet, io)
    fm = FeRAModel(tiny_unet, adapter=adapter)
    fm.set_routing_weights(torch.tensor([mix]).expand(4, 3))
    fera = unet_out(tiny_unet, io)
    fm.remove()
    assert torch.equal(unet_out(tiny_unet, io), base)  # hooks gone: the UNet is the frozen base again

    path = save_lora(*bake_lora(adapter, mix, source={"kind": source}), tmp_path / "baked.safetensors")
    unet, injected = diffusers_with_lora(tiny_unet, path)
    assert sorted(injected) == sorted(adapter.layers)  # every key matched a layer, every layer got one
    baked = unet_out(unet, io)
    scale = fera.abs().max()
    effect = (fera - base).abs().max() / scale
    assert effect > 1e-3, "the experts barely move the output: the comparison would prove nothing"
    assert (baked - fera).abs().max() / scale < 1e-5 < effect / 100


def test_bake_is_the_weighted_sum_of_experts(adapter):
    """down @ up of the baked pair equals sum_m mix_m * scale * up_m @ down_m; zero-weight experts are left out."""
    mix = [0.0, 0.25, 0.75]
    tensors, meta = bake_lora(adapter, mix, strength=0.5)
    path, experts = next(iter(adapter.layers.items()))
    down_key, up_key = lora_keys(path, KOHYA)
    assert tensors[down_key].shape == (8, experts.in_features) and tensors[up_key].shape == (experts.out_features, 8)
    want = sum(w * experts.scale * 0.5 * up @ down for w, (down, up) in zip(mix, experts.split()))
    torch.testing.assert_close(tensors[up_key] @ tensors[down_key], want, rtol=1e-5, atol=1e-7)
    info = json.loads(meta[BAKED_META])
    assert info["rank"] == 8 and info["experts"] == [1, 2] and info["mix"] == mix and info["strength"] == 0.5
    assert info["adapter_config"] == adapter.config.to_dict() and info["key_style"] == KOHYA


def test_file_dtype_and_router_dtype(adapter):
    half = adapter.to(torch.float16)
    mix = router_mix(half, latent=torch.randn(1, 4, 32, 32))
    tensors, _ = bake_lora(half, mix)
    assert {t.dtype for t in tensors.values()} == {torch.float16}
    tensors, _ = bake_lora(half, mix, dtype=torch.float32)
    assert {t.dtype for t in tensors.values()} == {torch.float32}


def test_router_mix_is_the_mean_over_latent_rows(adapter):
    z = torch.randn(3, 4, 32, 32)
    from fera_core import band_energies
    rows = adapter.router(band_energies(z, 3, "reference"))
    assert router_mix(adapter, latent=z) == pytest.approx(rows.mean(0).tolist(), abs=1e-7)
    assert router_mix(adapter, energies=[0.5, 0.3, 0.2]) == pytest.approx(
        adapter.router(torch.tensor([[0.5, 0.3, 0.2]]))[0].tolist(), abs=1e-7)
    assert router_mix(adapter, controls=RoutingControls(mix=[1, 1, 2], gains=[1, 2, 1])) == [0.25, 0.5, 0.5]


def test_key_styles():
    assert key_style(["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "mid_block.x"]) == KOHYA
    assert key_style(["transformer_blocks.0.attn.to_q", "single_transformer_blocks.0.attn.to_k"]) == TRANSFORMER
    with pytest.raises(ValueError, match="mixes UNet and transformer layer paths"):
        key_style(["down_blocks.0.x", "transformer_blocks.0.attn.to_q"])
    assert lora_keys("up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_out.0", KOHYA) == (
        "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_down.weight",
        "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_up.weight")
    assert lora_keys("transformer_blocks.3.attn.add_k_proj", TRANSFORMER) == (
        "transformer.transformer_blocks.3.attn.add_k_proj.lora_A.weight",
        "transformer.transformer_blocks.3.attn.add_k_proj.lora_B.weight")


@pytest.mark.parametrize("mix,strength,problem", [
    ([0.5, 0.5], 1.0, r"mix needs one weight per expert \(3\), got 2"),
    ([0, 0, 0], 1.0, r"gives every expert weight 0"),
    ([float("nan"), 0, 1], 1.0, r"must be finite"),
    ([0, 0, 1], float("inf"), r"must be finite"),
])
def test_bad_mix_is_refused(adapter, mix, strength, problem):
    with pytest.raises(ValueError, match=problem):
        bake_lora(adapter, mix, strength)


def test_router_mix_without_a_latent_is_refused(adapter):
    with pytest.raises(ValueError, match="needs a latent"):
        router_mix(adapter)
    with pytest.raises(ValueError, match="band energies must be finite"):
        router_mix(adapter, energies=[float("nan"), 0, 1])


# ---------------------------------------------------------------- reading baked files back

def baked_file(adapter, tmp_path):
    path = save_lora(*bake_lora(adapter, [0.2, 0.3, 0.5]), tmp_path / "good.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    return load_file(str(path)), meta


def test_baked_file_reads_back_and_is_shareable(adapter, tmp_path):
    path = save_lora(*bake_lora(adapter, [0.2, 0.3, 0.5]), tmp_path / "a.safetensors")
    tensors, info = read_baked_lora(path)
    assert len(tensors) == 2 * len(adapter.layers) and info["rank"] == 12
    assert path.stat().st_mode & 0o777 == 0o644 and sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]
    with pytest.raises(ValueError, match="saved as .safetensors"):
        save_lora({}, {}, tmp_path / "a.pt")


UP = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight"
DOWN = UP.replace("lora_up", "lora_down")


def _with_info(meta, **changes):
    return {**meta, BAKED_META: json.dumps(json.loads(meta[BAKED_META]) | changes)}


BAD = {
    "nan": (lambda sd, meta: ({**sd, UP: torch.full_like(sd[UP], float("nan"))}, meta),
            rf"{re.escape(UP)} contains NaN or infinite values"),
    "integer": (lambda sd, meta: ({**sd, DOWN: sd[DOWN].to(torch.int32)}, meta), r"has dtype torch.int32"),
    "0-d": (lambda sd, meta: ({**sd, "lora_unet_x.alpha": torch.tensor(12.0)}, meta), r"is a 0-d tensor"),
    "missing up": (lambda sd, meta: ({k: v for k, v in sd.items() if k != UP}, meta), r"lacks its down or up weight"),
    "wrong rank": (lambda sd, meta: ({**sd, DOWN: sd[DOWN][:4].clone(), UP: sd[UP][:, :4].contiguous()}, meta), r"are not a rank-12 LoRA pair"),
    "3-d": (lambda sd, meta: ({**sd, DOWN: sd[DOWN][..., None]}, meta), r"are not a rank-12 LoRA pair"),
    "foreign key": (lambda sd, meta: ({**sd, "transformer.a.lora_A.weight": torch.zeros(12, 2)}, meta),
                    r"unexpected key 'transformer.a.lora_A.weight' for key style kohya_unet"),
    "no metadata": (lambda sd, meta: (sd, None), r"not a baked FeRA LoRA"),
    "bad json": (lambda sd, meta: (sd, {**meta, BAKED_META: "{"}), r"not a baked FeRA LoRA"),
    "version": (lambda sd, meta: (sd, _with_info(meta, version=2)), r"not a baked FeRA LoRA .*version 2"),
    "style": (lambda sd, meta: (sd, _with_info(meta, key_style="x")), r"not a baked FeRA LoRA .*key style 'x'"),
    "rank": (lambda sd, meta: (sd, _with_info(meta, rank=0)), r"not a baked FeRA LoRA .*rank 0"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_tampered_baked_file_is_refused(adapter, tmp_path, case):
    build, problem = BAD[case]
    sd, meta = build(*baked_file(adapter, tmp_path))
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path), metadata=meta)
    with pytest.raises(AdapterFileError, match=re.escape(str(path)) + ".*" + problem):
        read_baked_lora(path)


@pytest.mark.parametrize("keep", [0, 8, 0.5, -1])
def test_truncated_or_missing_baked_file_is_refused(adapter, tmp_path, keep):
    data = save_lora(*bake_lora(adapter, [0, 1, 0]), tmp_path / "good.safetensors").read_bytes()
    n = int(len(data) * keep) if isinstance(keep, float) else (len(data) + keep if keep < 0 else keep)
    (tmp_path / "cut.safetensors").write_bytes(data[:n])
    with pytest.raises(AdapterFileError, match=r"unreadable safetensors file"):
        read_baked_lora(tmp_path / "cut.safetensors")
    with pytest.raises(AdapterFileError, match="no such file"):
        read_baked_lora(tmp_path / "missing.safetensors")


# ---------------------------------------------------------------- other families in diffusers

def _tiny_sdxl():
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    unet = UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), cross_attention_dim=32, transformer_layers_per_block=(1, 2),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80)
    pipe = StableDiffusionXLPipeline(vae=None, text_encoder=None, text_encoder_2=None, tokenizer=None, tokenizer_2=None,
                                     unet=unet, scheduler=EulerDiscreteScheduler())
    g = torch.Generator().manual_seed(0)
    inputs = dict(sample=torch.randn(1, 4, 16, 16, generator=g), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, 7, 32, generator=g),
                  added_cond_kwargs={"text_embeds": torch.randn(1, 32, generator=g), "time_ids": torch.rand(1, 6)})
    return pipe, unet, inputs


def _tiny_sd15_conv():
    """SD1.5 layout with conv proj_in/proj_out (1x1 Conv2d): conv experts bake to 4-d LoRA weights."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    unet = UNet2DConditionModel(
        sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=4, cross_attention_dim=32)
    pipe = StableDiffusionPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet,
                                   scheduler=DDIMScheduler(clip_sample=False, steps_offset=1), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    g = torch.Generator().manual_seed(0)
    inputs = dict(sample=torch.randn(1, 4, 16, 16, generator=g), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, 7, 32, generator=g))
    return pipe, unet, inputs


def _tiny_sd3():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    model = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                  caption_projection_dim=16, pooled_projection_dim=16, pos_embed_max_size=16,
                                  dual_attention_layers=(0,), qk_norm="rms_norm")
    pipe = StableDiffusion3Pipeline(transformer=model, scheduler=FlowMatchEulerDiscreteScheduler(), vae=None,
                                    text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                    text_encoder_3=None, tokenizer_3=None)
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 4, 16, 16, generator=g), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, 7, 32, generator=g),
                  pooled_projections=torch.randn(1, 16, generator=g))
    return pipe, model, inputs


def _tiny_flux():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                   attention_head_dim=8, num_attention_heads=2, joint_attention_dim=32,
                                   pooled_projection_dim=16, axes_dims_rope=(2, 2, 4))
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=model)
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(1, 16, 16, generator=g), timestep=torch.tensor([0.5]),
                  encoder_hidden_states=torch.randn(1, 7, 32, generator=g),
                  pooled_projections=torch.randn(1, 16, generator=g), img_ids=torch.rand(16, 3),
                  txt_ids=torch.zeros(7, 3))
    return pipe, model, inputs


LEAVES = ["to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "proj_in",
          "proj_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.2", "proj_mlp"]


@pytest.mark.parametrize("family", ["sd15_conv", "sdxl", "sd3", "flux"])
def test_diffusers_loads_every_key_of_other_families(tmp_path, family):
    """Every attention, MLP and projection layer (SD3/Flux: separate q/k/v, which ComfyUI fuses): the
    pipeline's load_lora_weights matches every key, and the result is FeRA at that mix."""
    pytest.importorskip("peft", reason="diffusers' load_lora_weights needs peft")
    from fera_core import FeRAConfig, FeRAModel
    pipe, model, inputs = {"sd15_conv": _tiny_sd15_conv, "sdxl": _tiny_sdxl, "sd3": _tiny_sd3,
                          "flux": _tiny_flux}[family]()
    model.eval()
    fm = FeRAModel(model, FeRAConfig(alpha=2.0, target_modules=LEAVES, match_full_name=True))
    with torch.no_grad():
        for e in fm.adapter.layers.values():
            e.up.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(e.up)))
    mix = [0.6, 0.0, 0.4]
    fm.set_routing_weights(torch.tensor([mix]))
    first = lambda out: out[0] if isinstance(out, tuple) else out.sample  # noqa: E731
    with torch.no_grad():
        fera = first(model(**inputs, return_dict=False))
        fm.set_routing_weights(None)
        base = first(model(**inputs, return_dict=False))
    adapter = fm.adapter
    fm.remove()
    path = save_lora(*bake_lora(adapter, mix), tmp_path / f"{family}.safetensors")
    pipe.load_lora_weights(str(path), adapter_name="baked")
    injected = [n for n, m in model.named_modules() if hasattr(m, "lora_A") and "baked" in m.lora_A]
    assert sorted(injected) == sorted(adapter.layers) and len(injected) >= 16
    if family == "sd15_conv":
        assert any(e.down.ndim == 4 for e in adapter.layers.values())
    with torch.no_grad():
        baked = first(model(**inputs, return_dict=False))
    scale = fera.abs().max()
    assert (fera - base).abs().max() / scale > 1e-2
    assert (baked - fera).abs().max() / scale < 1e-5
