"""Tiny models of the families ComfyUI loads beyond SD1.5-Flux, from ComfyUI's own classes.

Each family: its comfy.supported_models class and a small configuration (the full-size one with
widths and depths shrunk), the latent shape its sampler sees ((B, C, H, W) for image models,
(B, C, T, H, W) for video and Wan-format image models) and its conditioning width. Most of these
classes exist only in newer ComfyUI (0.33.0 here): a host without the class skips the test that
asks for it, naming the class.
"""
import re

import pytest
import torch

from comfy_host import TINY_CONTEXT, pack_module, patcher_of, setup_comfy

_WAN = dict(image_model="wan2.1", dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=TINY_CONTEXT, freq_dim=32,
            out_dim=16, patch_size=(1, 2, 2), window_size=(-1, -1), qk_norm=True, cross_attn_norm=True, eps=1e-6)
_LUMINA = dict(image_model="lumina2", patch_size=2, in_channels=16, dim=64, cap_feat_dim=TINY_CONTEXT, n_layers=2,
               n_refiner_layers=1, qk_norm=True, n_heads=2, axes_dims=[8, 12, 12], axes_lens=[64, 64, 64],
               multiple_of=16)
_FLUX = dict(vec_in_dim=None, context_in_dim=TINY_CONTEXT, hidden_size=64, mlp_ratio=2.0, num_heads=2, depth=1,
             depth_single_blocks=1, patch_size=2)

# family: (supported_models class, unet_config, latent shape of one row, name users know)
NATIVE = {
    "wan21_t2v": ("WAN21_T2V", dict(_WAN, model_type="t2v", in_dim=16), (16, 2, 8, 8)),
    "wan21_i2v": ("WAN21_I2V", dict(_WAN, model_type="i2v", in_dim=36), (16, 2, 8, 8)),
    "wan22_5b": ("WAN22_T2V", dict(_WAN, model_type="t2v", in_dim=48, out_dim=48), (48, 2, 8, 8)),
    "qwen_image": ("QwenImage", dict(image_model="qwen_image", in_channels=64, out_channels=16, num_layers=2,
                                     attention_head_dim=32, num_attention_heads=2, joint_attention_dim=TINY_CONTEXT,
                                     axes_dims_rope=(8, 12, 12)), (16, 1, 8, 8)),
    # Z-Image's time embedding is 256 wide whatever the width: dim 256 is its smallest
    "zimage": ("ZImage", dict(_LUMINA, dim=256, axes_dims=[32, 48, 48], n_kv_heads=2, rope_theta=256.0,
                              ffn_dim_multiplier=8 / 3, z_image_modulation=True, time_scale=1000.0), (16, 8, 8)),
    "lumina2": ("Lumina2", dict(_LUMINA, n_kv_heads=1, rope_theta=10000.0, ffn_dim_multiplier=4.0), (16, 8, 8)),
    "flux2": ("Flux2", dict(_FLUX, image_model="flux2", in_channels=128, out_channels=128, patch_size=1,
                            axes_dim=[8, 8, 8, 8], theta=2000, guidance_embed=False, global_modulation=True, mlp_silu_act=True,
                            qkv_bias=False, ops_bias=False, default_ref_method="index", ref_index_scale=10.0,
                            txt_ids_dims=[3]), (128, 4, 4)),
    "chroma": ("Chroma", dict(_FLUX, image_model="chroma", in_channels=64, out_channels=64, axes_dim=[8, 12, 12],
                              theta=10000, qkv_bias=True, txt_ids_dims=[], in_dim=64, out_dim=64, hidden_dim=64,
                              n_layers=2), (16, 8, 8)),
    # HunyuanVideo 1.5 T2V: 32 latent channels + 32 image-condition channels + a mask, patch 1
    "hunyuan_video15": ("HunyuanVideo15", dict(image_model="hunyuan_video", in_channels=65, out_channels=32,
                                               patch_size=[1, 1, 1], vec_in_dim=None, axes_dim=[8, 12, 12],
                                               meanflow=False, context_in_dim=TINY_CONTEXT, hidden_size=64,
                                               mlp_ratio=4.0, num_heads=2, depth=1, depth_single_blocks=1, theta=256,
                                               qkv_bias=True, byt5=False, guidance_embed=False,
                                               use_cond_type_embedding=True, vision_in_dim=None, meanflow_sum=False),
                        (32, 2, 8, 8)),
    "ltxv": ("LTXV", dict(image_model="ltxv", in_channels=128, cross_attention_dim=64, attention_head_dim=32,
                          num_attention_heads=2, caption_channels=TINY_CONTEXT, num_layers=2), (128, 2, 4, 4)),
    # one llama layer per block (double + single); 4 routed MoE experts, 2 active, as the full model
    "hidream": ("HiDream", dict(image_model="hidream", attention_head_dim=32, axes_dims_rope=[16, 8, 8],
                                caption_channels=[TINY_CONTEXT, TINY_CONTEXT], max_resolution=[32, 32], in_channels=16,
                                llama_layers=[0, 1], num_attention_heads=2, num_routed_experts=4,
                                num_activated_experts=2, num_layers=1, num_single_layers=1, out_channels=16,
                                patch_size=2, text_emb_dim=TINY_CONTEXT), (16, 8, 8)),
}
# Conditioning a family's text encoders give beside cross_attn and pooled_output (seeded generator -> value)
EXTRA_CONDS = {
    "ltxv": {"attention_mask": lambda gen: torch.ones(1, 7, dtype=torch.long)},  # its T5's token mask
    "lumina2": {"attention_mask": lambda gen: torch.ones(1, 7, dtype=torch.long)},  # Gemma's (0.3.64 requires it)
    "hidream": {"conditioning_llama3": lambda gen: torch.randn(1, 2, 7, TINY_CONTEXT, generator=gen)},  # 2 llama layers
}
# Families whose feed-forward layers take tokens flattened over the batch (HiDream's routed MoE experts):
# the batch-axis guard refuses them, so their checks use the 'attention' preset
PRESET = {"hidream": "attention"}


def native_model(family, seed=0, dtype=None):
    """A CPU ModelPatcher of a tiny model of family in NATIVE (skips on a host without its class)."""
    setup_comfy()
    import comfy.supported_models
    name, config, _ = NATIVE[family]
    cls = getattr(comfy.supported_models, name, None)
    if cls is None:
        pytest.skip(f"this ComfyUI has no {name} model class")
    config = dict(config)
    while True:  # an older host's class lacks options newer ones added (0.3.64: Chroma's vec_in_dim, Lumina's rope_theta)
        try:
            return patcher_of(cls(dict(config)), seed, dtype)
        except TypeError as err:
            unknown = re.search(r"unexpected keyword argument '(\w+)'", str(err))
            if unknown is None or unknown.group(1) not in config:
                raise
            del config[unknown.group(1)]


def latent_shape(family, rows=2):
    return (rows, *NATIVE[family][2])


def preset_of(family):
    return PRESET.get(family, "attention + feed-forward")


def adapter_for(patcher, preset="attention + feed-forward", seed=1, up_std=3.0):
    """Train FeRA's fresh adapter on the preset's layers with random up weights and router, so it acts."""
    new_adapter = pack_module("nodes.train_nodes").new_adapter
    adapter = new_adapter(patcher.model, preset, 4, 2.0, 3, 3, 0.7, "partition", 0.1, seed)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for experts in adapter.layers.values():
            experts.up.copy_(torch.randn(experts.up.shape, generator=gen) * up_std)
        for p in adapter.router.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return adapter


def conds(seed, family=None):
    gen = torch.Generator().manual_seed(seed)
    context, pooled = torch.randn(1, 7, TINY_CONTEXT, generator=gen), torch.randn(1, TINY_CONTEXT, generator=gen)
    extra = {key: make(gen) for key, make in EXTRA_CONDS.get(family, {}).items()}
    return [[context, {"pooled_output": pooled, **extra}]]


def run(patcher, family):
    """Two rows with different spectra (smooth and checkerboard), 2 euler steps at cfg 3."""
    setup_comfy()
    import comfy.model_management
    import comfy.sample
    shape = latent_shape(family)
    gen = torch.Generator().manual_seed(4)
    grid = torch.arange(shape[-1], dtype=torch.float32)
    smooth = torch.sin(grid[:, None] / 4 + grid[None, :] / 5).expand(shape[1:])
    checker = ((grid[:, None] + grid[None, :]) % 2 * 2 - 1).expand(shape[1:])
    out = comfy.sample.sample(patcher, torch.randn(shape, generator=gen), 2, 3.0, "euler", "simple", conds(1, family),
                              conds(2, family), torch.stack([smooth, checker]) * 2, denoise=0.8, seed=4, disable_pbar=True)
    comfy.model_management.unload_all_models()
    return out


def train(patcher, adapter, lat, pos, **settings):
    """nodes.train_loop.train at the family checks' settings (20 steps of 3e-2, batch 2, checkpointed)."""
    setup_comfy()
    import comfy.model_management
    training = pack_module("nodes.train_loop")
    settings = training.TrainSettings(**dict(dict(steps=20, learning_rate=3e-2, batch_size=2, seed=0,
                                                  gradient_checkpointing=True), **settings))
    with torch.inference_mode():
        out = training.train(patcher, adapter, lat, pos, settings)
    comfy.model_management.unload_all_models()
    return out


def fixed_loss(patcher, adapter, lat, pos):
    """The mean loss of 8 fixed draws at a 1e-12 learning rate (the weights do not move)."""
    _, losses = train(patcher, adapter, lat, pos, steps=8, learning_rate=1e-12, seed=123)
    return sum(losses) / len(losses)
