"""Test helpers for the parts of the pack that need a real ComfyUI host.

ComfyUI is not on any package registry, so tests find a checkout through COMFYUI_PATH and skip
when it is missing. Nothing here imports ComfyUI at module level: tests that do not need the
host can import this file (or not) without paying for, or depending on, ComfyUI.

Full-size architectures are built on the meta device from ComfyUI's own supported_models
classes, so no weights are allocated; only write_random_checkpoint materialises tensors, one at a
time, straight into the file. tiny_model builds small real models of the same classes, tiny_clip
a small SD1.x text encoder, and random_adapter a FeRA adapter for them; all draw from their own
seeded generators, so a test's numbers never depend on which tests ran before it.
"""

import importlib
import inspect
import json
import logging
import os
import struct
import sys
import types
from pathlib import Path

import pytest

PACK_ROOT = Path(__file__).resolve().parents[2]
PACK_NAME = "fera_pack"  # synthetic package name for the repo under test (see pack_module)

# Full-size configurations. The ldm UNets (SD1.x, SD2.x, SDXL): unet_config exactly as
# comfy.model_detection.detect_unet_config derives it from the released checkpoints' weights
# (tests re-derive it from the built model's own state dict to prove this). The DiTs (SD3, Flux):
# the weight shapes of the released checkpoint that ComfyUI's detection reads, so that the host's
# own detection fills in whatever its model constructors need (Flux's txt_ids_dims appeared
# after 0.3.64). Each family names the supported_models class ComfyUI must pick for it.
_SD_UNET = {
    "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
    "in_channels": 4, "out_channels": 4, "model_channels": 320,
    "use_temporal_resblock": False, "use_temporal_attention": False,
}


class _Probe(dict):
    """{key: shape} of the tensors of a released checkpoint that ComfyUI's detection reads."""


def _sd3_probe(pos_embed_max_size, qk_norm=False, dual_attention=()):
    hidden = 1536  # 64 * depth 24
    shapes = _Probe({"joint_blocks.0.context_block.attn.qkv.weight": (3 * hidden, hidden),
              "x_embedder.proj.weight": (hidden, 16, 2, 2), "final_layer.linear.weight": (64, hidden),
              "y_embedder.mlp.0.weight": (hidden, 2048), "context_embedder.weight": (hidden, 4096),
              "pos_embed": (1, pos_embed_max_size ** 2, hidden)})
    if qk_norm:
        shapes["joint_blocks.0.context_block.attn.ln_q.weight"] = (64,)
    shapes.update({f"joint_blocks.{i}.x_block.attn2.qkv.weight": (3 * hidden, hidden) for i in dual_attention})
    return shapes


def _flux_probe():  # FLUX.1 [dev]
    hidden = 3072
    shapes = _Probe({"img_in.weight": (hidden, 64), "txt_in.weight": (hidden, 4096),
                     "vector_in.in_layer.weight": (hidden, 768), "guidance_in.in_layer.weight": (hidden, 256)})
    shapes.update({f"double_blocks.{i}.img_attn.norm.key_norm.scale": (128,) for i in range(19)})
    shapes.update({f"single_blocks.{i}.norm.key_norm.scale": (128,) for i in range(38)})
    return shapes


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
    "sd3": ("SD3", _sd3_probe(192)),  # SD3 medium (2B)
    # SD3.5 medium: same family, adds qk RMSNorm and a second self-attention (attn2) in 13 blocks
    "sd35m": ("SD3", _sd3_probe(384, qk_norm=True, dual_attention=range(13))),
    "flux": ("Flux", _flux_probe()),
}

# Tiny models: the full-size configuration with these entries replaced (every family takes a
# 32-wide text context and, where it has one, a 32-wide pooled vector).
TINY_CONTEXT = 32
_TINY = {
    "sd15": dict(model_channels=32, num_res_blocks=[1, 1], channel_mult=[1, 2], transformer_depth=[1, 1],
                 transformer_depth_output=[1, 1, 1, 1], transformer_depth_middle=1, context_dim=TINY_CONTEXT),
    "sd3": dict(depth=2, adm_in_channels=TINY_CONTEXT, num_patches=256, pos_embed_max_size=16,
                context_embedder_config={"target": "torch.nn.Linear",
                                         "params": {"in_features": TINY_CONTEXT, "out_features": 128}}),
    "flux": dict(vec_in_dim=TINY_CONTEXT, context_in_dim=TINY_CONTEXT, hidden_size=64, mlp_ratio=2.0,
                 num_heads=2, depth=1, depth_single_blocks=1, axes_dim=[8, 12, 12]),
}
TINY_FAMILIES = tuple(_TINY)


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
    # main.py imports ComfyUI's utils package first; once nodes.py puts comfy/ on sys.path,
    # `import utils` would find comfy/utils.py instead and app.custom_node_manager would fail
    import utils.extra_config  # noqa: F401
    import torch
    import comfy.cli_args
    if "comfy.model_management" not in sys.modules:
        has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
        if not (torch.cuda.is_available() or has_mps):
            comfy.cli_args.args.cpu = True
    import comfy
    return comfy


def pack_module(name):
    """Import a pack module, e.g. pack_module('nodes.module_paths'), the way ComfyUI would see it.

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


def unet_config(family):
    """The full-size unet_config of a family in FAMILIES, as this host's detection sees it."""
    setup_comfy()
    import copy
    import torch
    import comfy.model_detection
    spec = FAMILIES[family][1]
    if not isinstance(spec, _Probe):
        return copy.deepcopy(spec)
    probe = {key: torch.empty(shape, device="meta") for key, shape in spec.items()}
    return comfy.model_detection.detect_unet_config(probe, "")


def build_model(family, device="meta", dtype=None):
    """Full-size ComfyUI BaseModel for family in FAMILIES, weights on `device` (meta: none).

    Goes through comfy.model_detection.model_config_from_unet_config, the same matching the
    checkpoint loader uses, so the supported_models class (and its model_base class) is ComfyUI's
    own choice; ComfyUI's layers take a device argument and skip weight init. dtype: float16
    unless given.
    """
    setup_comfy()
    import torch
    import comfy.model_detection
    model_config = comfy.model_detection.model_config_from_unet_config(unet_config(family))
    assert type(model_config).__name__ == FAMILIES[family][0], (family, type(model_config))
    model_config.set_inference_dtype(dtype or torch.float16, None)
    return model_config.get_model({}, "model.diffusion_model.", device=device)


def tiny_model(family, seed=0, dtype=None):
    """A ModelPatcher on the CPU of a tiny model of family in TINY_FAMILIES.

    The family's supported_models class with its full-size configuration (so the host's own
    defaults and required parameters) shrunk by _TINY; every weight N(0, 0.05^2) drawn from a
    generator seeded with `seed`, never from the global RNG. dtype: float32 unless given.
    """
    setup_comfy()
    import comfy.supported_models
    model_config = getattr(comfy.supported_models, FAMILIES[family][0])(dict(unet_config(family), **_TINY[family]))
    return patcher_of(model_config, seed, dtype)


def patcher_of(model_config, seed=0, dtype=None):
    """A CPU ModelPatcher of the model a supported_models config builds, weights N(0, 0.05^2) from a
    generator seeded with `seed`. dtype: float32 unless given."""
    import torch
    import comfy.model_patcher
    dtype = dtype or torch.float32
    model_config.set_inference_dtype(dtype, None)
    model = model_config.get_model({}, "model.diffusion_model.")
    gen = torch.Generator().manual_seed(seed)
    model.diffusion_model.load_state_dict(
        {k: torch.randn(v.shape, generator=gen) * 0.05 for k, v in model.diffusion_model.state_dict().items()})
    model.diffusion_model.to(dtype)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def tiny_clip(seed=0):
    """ComfyUI's own SD1.x text encoder (comfy.sd.CLIP over sd1_clip's tokenizer and CLIP-L model class),
    TINY_CONTEXT wide with two layers (the host's `clip_l_model_config` option), weights N(0, 0.1^2) from
    a generator seeded with `seed`. The real tokenizer, so captions become different token ids; its
    conditioning is TINY_CONTEXT wide, what the tiny models take."""
    setup_comfy()
    import torch
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base
    config = dict(hidden_size=TINY_CONTEXT, intermediate_size=2 * TINY_CONTEXT, num_attention_heads=2,
                  num_hidden_layers=2, projection_dim=TINY_CONTEXT)
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    clip = comfy.sd.CLIP(target, model_options={"clip_l_model_config": config, "dtype": torch.float32})
    gen = torch.Generator().manual_seed(seed)
    clip.cond_stage_model.load_state_dict(
        {k: torch.randn(v.shape, generator=gen) * 0.1 for k, v in clip.cond_stage_model.state_dict().items()})
    return clip


def random_adapter(model, seed, targets=("to_q", "to_k", "to_v", "to_out.0"), up_std=0.5, router_std=1.0,
                   alpha=1.0, **config):
    """A FeRA adapter (3 experts of rank 4) on the model's attention layers whose diffusers path
    ends with one of `targets`, every weight drawn from a generator seeded with `seed`: down as
    the reference initialises it, up N(0, up_std^2) so that the experts act, router
    N(0, router_std^2). config: further FeRAConfig fields."""
    import math
    import torch
    from fera_core import FeRAAdapter, FeRAConfig, RoutedExperts
    gen = torch.Generator().manual_seed(seed)
    layers = {}
    # sorted: ComfyUI builds its key maps from sets, so their order changes with PYTHONHASHSEED
    for path, (comfy_path, rows) in sorted(pack_module("nodes.module_paths").diffusers_to_comfy(model).items()):
        if path.endswith(tuple(targets)) and "attn" in path:
            layer = model.get_submodule(comfy_path)
            e = RoutedExperts(layer.in_features, rows[1] if rows else layer.out_features, 3, 4, alpha)
            with torch.no_grad():
                bound = 1 / math.sqrt(e.down[0].numel())  # Kaiming-uniform, a = sqrt(5)
                e.down.copy_((torch.rand(e.down.shape, generator=gen) * 2 - 1) * bound)
                e.up.copy_(torch.randn(e.up.shape, generator=gen) * up_std)
            layers[path] = e
    adapter = FeRAAdapter(FeRAConfig(alpha=alpha, target_modules=list(targets), match_full_name=True,
                                     indicator="partition", **config), layers)
    with torch.no_grad():
        for p in adapter.router.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * router_std)
    return adapter


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
    parts = dict(clip_state_dict=_text_encoder_state_dict(model), vae_state_dict=_vae_state_dict())
    if "unet_state_dict" in inspect.signature(model.state_dict_for_saving).parameters:
        # newer hosts take the diffusion model's weights from the caller (the ModelPatcher)
        parts["unet_state_dict"] = model.diffusion_model.state_dict()
    layout = model.state_dict_for_saving(**parts)

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
