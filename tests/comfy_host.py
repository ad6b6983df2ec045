"""Test helpers for the parts of the pack that need a real ComfyUI host.

ComfyUI is not on any package registry, so tests find a checkout through COMFYUI_PATH and skip
when it is missing. Nothing here imports ComfyUI at module level: tests that do not need the
host can import this file (or not) without paying for, or depending on, ComfyUI.

Full-size architectures are built on the meta device from ComfyUI's own supported_models
classes, so no weights are allocated; only write_random_checkpoint materialises tensors, one at a
time, straight into the file.
"""

import importlib
import json
import logging
import os
import struct
import sys
import types
from pathlib import Path

import pytest

PACK_ROOT = Path(__file__).resolve().parents[1]
PACK_NAME = "fera_pack"  # synthetic package name for the repo under test (see pack_module)

# unet_config exactly as comfy.model_detection.detect_unet_config derives it from the released
# checkpoints' weights (tests re-derive it from the built model's own state dict to prove this),
# with the supported_models class ComfyUI must pick for it.
_SD_UNET = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "use_temporal_resblock": False, "use_temporal_attention": False,
}
FAMILIES = {
    "sd15": ("SD15", dict(
        _SD_UNET, adm_in_channels=None, num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4],
        transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_output=[1] * 9 + [0] * 3,
        transformer_depth_middle=1, use_linear_in_transformer=False, context_dim=768)),
    "sd2": ("SD20", dict(
        _SD_UNET, adm_in_channels=None, num_res_blocks=[2, 2, 2, 2], channel_mult=[1, 2, 4, 4],
        transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_output=[1] * 9 + [0] * 3,
        transformer_depth_middle=1, use_linear_in_transformer=True, context_dim=1024)),
    "sdxl": ("SDXL", dict(
        _SD_UNET, num_classes="sequential", adm_in_channels=2816, num_res_blocks=[2, 2, 2],
        channel_mult=[1, 2, 4], transformer_depth=[0, 0, 2, 2, 10, 10],
        transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], transformer_depth_middle=10,
        use_linear_in_transformer=True, context_dim=2048)),
    # SD3 medium (2B)
    "sd3": ("SD3", {
        "in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": 24, "input_size": None,
        "adm_in_channels": 2048, "num_patches": 36864, "pos_embed_max_size": 192,
        "context_embedder_config": {"target": "torch.nn.Linear",
                                    "params": {"in_features": 4096, "out_features": 1536}},
        "pos_embed_scaling_factor": None, "x_block_self_attn_layers": []}),
    # SD3.5 medium: same family, adds qk RMSNorm and a second self-attention (attn2) in 13 blocks
    "sd35m": ("SD3", {
        "in_channels": 16, "patch_size": 2, "out_channels": 16, "depth": 24, "input_size": None,
        "adm_in_channels": 2048, "num_patches": 147456, "pos_embed_max_size": 384, "qk_norm": "rms",
        "context_embedder_config": {"target": "torch.nn.Linear",
                                    "params": {"in_features": 4096, "out_features": 1536}},
        "pos_embed_scaling_factor": None, "x_block_self_attn_layers": list(range(13))}),
    # FLUX.1 [dev]
    "flux": ("Flux", {
        "image_model": "flux", "in_channels": 16, "patch_size": 2, "out_channels": 16,
        "vec_in_dim": 768, "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0,
        "num_heads": 24, "depth": 19, "depth_single_blocks": 38, "axes_dim": [16, 56, 56],
        "theta": 10000, "qkv_bias": True, "guidance_embed": True}),
}


def comfyui_root():
    """The ComfyUI checkout named by COMFYUI_PATH, or skip the calling test (or module)."""
    raw = os.environ.get("COMFYUI_PATH")
    if not raw:
        pytest.skip("COMFYUI_PATH is not set (point it at a ComfyUI checkout to run host tests)",
                    allow_module_level=True)
    root = Path(raw).expanduser().resolve()
    if not ((root / "comfy" / "model_base.py").is_file() and (root / "folder_paths.py").is_file()):
        pytest.skip(f"COMFYUI_PATH={raw} is not a ComfyUI checkout (no comfy/model_base.py)",
                    allow_module_level=True)
    return root


def setup_comfy():
    """Make `import comfy` work and return the comfy package. Idempotent.

    ComfyUI's own modules import each other as top-level names (comfy, folder_paths, ...), so
    the checkout goes on sys.path. Its device choice happens when comfy.model_management is
    first imported and assumes CUDA on CUDA builds of torch; with no usable GPU we set --cpu
    first, as `python main.py --cpu` would.
    """
    root = str(comfyui_root())
    if root not in sys.path:
        sys.path.insert(0, root)
    import torch
    import comfy.cli_args
    if "comfy.model_management" not in sys.modules:
        has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
        if not (torch.cuda.is_available() or has_mps):
            comfy.cli_args.args.cpu = True
    import comfy
    return comfy


def pack_module(name):
    """Import a pack module, e.g. pack_module('nodes.keys'), the way ComfyUI would see it.

    ComfyUI imports the pack as a package and the pack uses relative imports. Importing our
    'nodes' as a top-level package would also clash with ComfyUI's own top-level nodes.py, so
    the repo root is registered under a private package name without running its __init__.
    Sets up ComfyUI first (skipping without it), since the glue modules import the host.
    """
    setup_comfy()
    if PACK_NAME not in sys.modules:
        pkg = types.ModuleType(PACK_NAME)
        pkg.__path__ = [str(PACK_ROOT)]
        sys.modules[PACK_NAME] = pkg
    return importlib.import_module(f"{PACK_NAME}.{name}")


def build_model(family, device="meta"):
    """Full-size ComfyUI BaseModel for family in FAMILIES, weights on `device` (meta: none).

    Goes through comfy.model_detection.model_config_from_unet_config, the same matching the
    checkpoint loader uses, so the supported_models class (and its model_base class) is ComfyUI's
    own choice; ComfyUI's layers take a device argument and skip weight init.
    """
    setup_comfy()
    import torch
    import comfy.model_detection
    expected, unet_config = FAMILIES[family]
    model_config = comfy.model_detection.model_config_from_unet_config(dict(unet_config))
    assert type(model_config).__name__ == expected, (family, type(model_config))
    model_config.set_inference_dtype(torch.float16, None)
    return model_config.get_model({}, "model.diffusion_model.", device=device)


def _vae_state_dict():
    """State dict (meta tensors) of the SD/SDXL VAE as ComfyUI builds it.

    comfy.sd.VAE picks its architecture from the weights it is given; a probe with the three
    keys its detection reads selects the default SD1.x/SD2.x/SDXL AutoencoderKL.
    """
    import torch
    import comfy.sd
    meta = dict(device="meta", dtype=torch.float16)
    probe = {"decoder.conv_in.weight": torch.empty(512, 4, 3, 3, **meta),
             "encoder.down.2.downsample.conv.weight": torch.empty(512, 512, 3, 3, **meta),
             "post_quant_conv.weight": torch.empty(4, 4, 1, 1, **meta)}
    logging.disable(logging.WARNING)  # the probe is knowingly incomplete: no "Missing VAE keys"
    try:
        with torch.device("meta"):
            vae = comfy.sd.VAE(sd=probe, device=torch.device("meta"), dtype=torch.float16)
    finally:
        logging.disable(logging.NOTSET)
    return vae.get_sd()


def _text_encoder_state_dict(model):
    """State dict (meta tensors) of the model's text encoder(s), as comfy.sd.CLIP.get_sd keys them."""
    import torch
    target = model.model_config.clip_target()
    with torch.device("meta"):
        te = target.clip(device="meta", dtype=torch.float16, **target.params)
    return te.state_dict()


_ST_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32", "float64": "F64",
              "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
              "bool": "BOOL"}


def _fill(key, like, gen):
    """Small random fp16 for weights; norm weights (1-D weight/scale) 1, biases 0."""
    import torch
    if not like.dtype.is_floating_point:
        if key.endswith("position_ids"):
            return torch.arange(like.shape[-1], dtype=like.dtype).expand(like.shape).contiguous()
        return torch.zeros(like.shape, dtype=like.dtype)
    leaf = key.rsplit(".", 1)[-1]
    if leaf == "bias":
        return torch.zeros(like.shape, dtype=torch.float16)
    if like.ndim == 1 and leaf in ("weight", "scale"):
        return torch.ones(like.shape, dtype=torch.float16)
    return (torch.randn(like.shape, generator=gen) * 0.02).to(torch.float16)


def write_random_checkpoint(path, family="sd15", seed=0):
    """Write a full-size single-file checkpoint (diffusion model + text encoders + VAE) of random
    fp16 weights that comfy.sd.load_checkpoint_guess_config / CheckpointLoaderSimple detect.

    Key names and shapes come from ComfyUI's own classes on the meta device, laid out by
    model.state_dict_for_saving (what comfy.sd.save_checkpoint writes). Supported: sd15, sd2,
    sdxl. Tensors are generated one at a time and streamed into a safetensors file (so SDXL's
    6.9 GB never sits in memory), written under a temporary name and renamed at the end.
    """
    import torch
    if family not in ("sd15", "sd2", "sdxl"):
        raise ValueError(f"write_random_checkpoint supports sd15, sd2, sdxl, not {family!r}")
    model = build_model(family)
    layout = model.state_dict_for_saving(_text_encoder_state_dict(model), _vae_state_dict())

    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, t in layout.items():
        dtype = torch.float16 if t.dtype.is_floating_point else t.dtype
        size = t.numel() * dtype.itemsize
        header[key] = {"dtype": _ST_DTYPES[str(dtype).removeprefix("torch.")],
                       "shape": list(t.shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)

    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    gen = torch.Generator().manual_seed(seed)
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for key, t in layout.items():
                data = _fill(key, t, gen)
                f.write(data.reshape(-1).view(torch.uint8).numpy())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path
