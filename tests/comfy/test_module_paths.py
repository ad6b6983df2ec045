"""nodes.module_paths.diffusers_to_comfy against real ComfyUI models (full-size, on the meta device).

The diffusers side comes from diffusers' own model classes with the released configs, so a
wrong offset, a missing block or a swapped q/k/v size shows up as a failed shape check.
Skipped without COMFYUI_PATH; the diffusers comparison is skipped without diffusers.
The checkpoint test writes ~2 GB: deselect it with -m "not slow".
"""

import re
from collections import defaultdict

import pytest
import torch

import comfy_host

comfy_host.setup_comfy()

UNETS = ("sd15", "sd2", "sdxl")
FAMILIES = UNETS + ("sd3", "sd35m", "flux")
ATTN = ("to_q", "to_k", "to_v", "to_out.0")
JOINT = ATTN + ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")

# ComfyUI-side attention projections each family must have every row of covered by the map
# (for fused q/k/v Linears only the q/k/v rows; Flux single blocks also hold the MLP in linear1).
COMFY_ATTN = {
    **{f: r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$" for f in UNETS},
    "sd3": r"\.(x_block|context_block)\.attn2?\.(qkv|proj)$",
    "sd35m": r"\.(x_block|context_block)\.attn2?\.(qkv|proj)$",
    "flux": r"\.(img_attn|txt_attn)\.(qkv|proj)$|\.single_blocks\.\d+\.linear1$",
}

_UNET_CFG = {
    "sd15": dict(cross_attention_dim=768),  # otherwise the UNet2DConditionModel defaults
    "sd2": dict(attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
                use_linear_projection=True, sample_size=96),
    "sdxl": dict(sample_size=128, block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                 attention_head_dim=[5, 10, 20], cross_attention_dim=2048,
                 transformer_layers_per_block=[1, 2, 10], use_linear_projection=True,
                 addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816),
}
_SD3_CFG = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                caption_projection_dim=1536, pooled_projection_dim=2048)
_DIFFUSERS = {
    **{f: ("UNet2DConditionModel", _UNET_CFG[f], ATTN) for f in UNETS},
    "sd3": ("SD3Transformer2DModel", dict(_SD3_CFG, pos_embed_max_size=192), JOINT),
    "sd35m": ("SD3Transformer2DModel", dict(_SD3_CFG, pos_embed_max_size=384, qk_norm="rms_norm",
                                            dual_attention_layers=tuple(range(13))), JOINT),
    "flux": ("FluxTransformer2DModel", dict(patch_size=1, in_channels=64, num_layers=19,
                                            num_single_layers=38, attention_head_dim=128,
                                            num_attention_heads=24, joint_attention_dim=4096,
                                            pooled_projection_dim=768, guidance_embeds=True,
                                            axes_dims_rope=(16, 56, 56)), JOINT),
}


@pytest.fixture(scope="module")
def keys():
    return comfy_host.pack_module("nodes.module_paths")


def _diffusers_projections(family):
    diffusers = pytest.importorskip("diffusers", reason="diffusers is needed for the reference names")
    cls_name, cfg, leaves = _DIFFUSERS[family]
    with torch.device("meta"):
        model = getattr(diffusers, cls_name)(**cfg)
    return {n: m for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and n.endswith(tuple("." + leaf for leaf in leaves))}


@pytest.mark.parametrize("family", FAMILIES)
def test_build_model_is_what_comfy_detects(family):
    """The helper's configs are what ComfyUI itself derives from weights of that layout."""
    import comfy.model_detection
    model = comfy_host.build_model(family)
    assert type(model.model_config).__name__ == comfy_host.FAMILIES[family][0]
    assert all(p.device.type == "meta" for p in model.diffusion_model.parameters())
    assert comfy.model_detection.detect_unet_config(model.state_dict(), "diffusion_model.") == \
        comfy_host.unet_config(family)


@pytest.mark.parametrize("family", FAMILIES)
def test_attention_projections_map_onto_comfy_linears(family, keys):
    reference = _diffusers_projections(family)
    model = comfy_host.build_model(family)
    mapping = keys.diffusers_to_comfy(model)
    assert reference, family

    used = defaultdict(list)  # comfy Linear -> [(offset, count, diffusers name)]
    for name, ref in reference.items():
        assert name in mapping, name
        target, rows = mapping[name]
        mod = model.get_submodule(target)
        assert isinstance(mod, torch.nn.Linear), (name, target, type(mod))
        assert mod.in_features == ref.in_features, (name, target)
        offset, count = rows if rows is not None else (0, mod.out_features)
        assert count == ref.out_features, (name, target, rows)
        assert 0 <= offset and offset + count <= mod.out_features, (name, target, rows)
        assert (mod.bias is None) == (ref.bias is None), (name, target)
        used[target].append((offset, count, name))

    for target, slices in used.items():  # distinct diffusers modules never share rows
        slices.sort()
        for (o1, c1, n1), (o2, _, n2) in zip(slices, slices[1:]):
            assert o1 + c1 <= o2, (target, n1, n2)
        if len(slices) > 1:  # fused q/k/v: contiguous from row 0, in q, k, v order
            assert slices[0][0] == 0 and all(a[0] + a[1] == b[0] for a, b in zip(slices, slices[1:]))
            assert [re.search(r"_([qkv])(_proj)?$", n).group(1) for *_, n in slices] == ["q", "k", "v"]

    pattern = re.compile(COMFY_ATTN[family])
    comfy_attn = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and pattern.search(n)}
    assert set(used) == comfy_attn


def test_flux_and_sd3_fused_slices_follow_hidden_size(keys):
    flux = keys.diffusers_to_comfy(comfy_host.build_model("flux"))
    assert flux["transformer_blocks.0.attn.to_k"] == ("diffusion_model.double_blocks.0.img_attn.qkv", (3072, 3072))
    assert flux["transformer_blocks.18.attn.add_v_proj"] == ("diffusion_model.double_blocks.18.txt_attn.qkv", (6144, 3072))
    assert flux["single_transformer_blocks.37.attn.to_q"] == ("diffusion_model.single_blocks.37.linear1", (0, 3072))
    assert flux["single_transformer_blocks.0.proj_mlp"] == ("diffusion_model.single_blocks.0.linear1", (9216, 12288))
    assert flux["transformer_blocks.0.attn.to_out.0"] == ("diffusion_model.double_blocks.0.img_attn.proj", None)
    assert "norm_out.linear" not in flux  # needs a scale/shift swap, not a row slice
    sd3 = keys.diffusers_to_comfy(comfy_host.build_model("sd3"))
    assert sd3["transformer_blocks.3.attn.add_k_proj"] == ("diffusion_model.joint_blocks.3.context_block.attn.qkv", (1536, 1536))
    assert "transformer_blocks.23.attn.to_add_out" not in sd3  # last context block is pre-only
    assert "transformer_blocks.0.attn2.to_q" not in sd3  # SD3 medium has no attn2


def test_unet_entries_are_whole_layers(keys):
    sdxl = keys.diffusers_to_comfy(comfy_host.build_model("sdxl"))
    assert sdxl["down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k"] == (
        "diffusion_model.input_blocks.4.1.transformer_blocks.1.attn2.to_k", None)
    assert sdxl["mid_block.attentions.0.transformer_blocks.9.attn1.to_out.0"] == (
        "diffusion_model.middle_block.1.transformer_blocks.9.attn1.to_out.0", None)
    assert sdxl["up_blocks.0.attentions.2.transformer_blocks.9.ff.net.2"] == (
        "diffusion_model.output_blocks.2.1.transformer_blocks.9.ff.net.2", None)
    assert all(rows is None for _, rows in sdxl.values())
    assert not any(k.startswith("down_blocks.0.attentions") for k in sdxl)  # SDXL has none there


@pytest.fixture
def random_sd15(tmp_path):
    path = comfy_host.write_random_checkpoint(tmp_path / "random_sd15.safetensors", "sd15", seed=1)
    yield path
    path.unlink(missing_ok=True)  # 2 GB: do not leave it to pytest's tmp retention


@pytest.mark.slow
def test_random_sd15_checkpoint_loads_as_sd15(random_sd15, caplog, keys):
    import comfy.model_base
    import comfy.sd
    from safetensors import safe_open

    path = random_sd15
    assert not list(path.parent.glob("*.tmp"))
    # The file holds the three parts whole: the parameter counts of the released SD1.5 UNet,
    # CLIP ViT-L/14 text encoder and VAE (a host whose saving API changed once made this a
    # 415 MB file without the UNet).
    counts = defaultdict(int)
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            counts[key.split(".")[0]] += torch.Size(f.get_slice(key).get_shape()).numel()
    assert counts == {"model": 859_520_964, "cond_stage_model": 123_060_480, "first_stage_model": 83_653_863}

    caplog.clear()
    with caplog.at_level("WARNING"):
        patcher, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(
            str(path), output_vae=True, output_clip=True, embedding_directory=None)
    # what ComfyUI logs when weights of the detected architecture are absent from the file
    missing = re.compile(r"^(unet missing|clip missing|Missing VAE keys)")
    assert not [r.getMessage()[:300] for r in caplog.records if missing.match(r.getMessage())]

    model = patcher.model
    assert isinstance(model, comfy.model_base.BaseModel)
    assert type(model.model_config).__name__ == "SD15"
    assert clip is not None and vae is not None and vae.first_stage_model is not None

    key = "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    with safe_open(str(path), "pt") as f:
        stored = f.get_tensor("model.diffusion_model." + key)
        norm = f.get_tensor("first_stage_model.encoder.norm_out.weight")
    assert stored.dtype == torch.float16 and 0.01 < stored.float().std() < 0.03
    assert torch.equal(norm, torch.ones_like(norm))
    loaded = model.diffusion_model.get_parameter(key)
    assert torch.equal(loaded.to(stored.dtype).cpu(), stored)
    assert keys.diffusers_to_comfy(model) == keys.diffusers_to_comfy(comfy_host.build_model("sd15"))
