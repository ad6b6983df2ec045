"""Bake a FeRA adapter at a fixed expert mix into one standard LoRA file.

At a fixed mix w the update of an adapted layer, sum_m w_m * scale * up_m(down_m(x)), is a
plain LoRA of rank (experts with w_m != 0) x r: down = [down_m], up = [w_m * scale * up_m].
The file carries no alpha, which every LoRA loader reads as alpha = rank (scale 1), so the
numbers are the same everywhere.

Key names are the ones both ComfyUI's LoRA loader (comfy.lora.model_lora_keys_unet) and
diffusers' load_lora_weights map without leftovers, checked for SD1.5, SD2, SDXL, SD3 and Flux:
- UNet families: kohya names, `lora_unet_<diffusers path, dots as _>.lora_{down,up}.weight`
  (ComfyUI maps `unet.<path>` only for non-attention layers, diffusers has no other common form);
- transformer families (SD3, Flux): `transformer.<diffusers path>.lora_{A,B}.weight`, which
  ComfyUI maps onto its fused q/k/v layers as row slices;
- adapters named by ComfyUI module path (key namespace "comfy"): ComfyUI's own
  `diffusion_model.<path>.lora_{down,up}.weight`, which its loader maps for every model it loads
  (what its own trainer writes).
What was baked (adapter config, mix, where the mix came from) is in the `fera.baked` metadata.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..adapter_file import COMFY, AdapterFileError, FeRAAdapter, _check_tensors
from ..atomic import atomic_write
from ..indicator import band_energies
from ..router import RoutingControls

BAKED_META = "fera.baked"
BAKE_VERSION = 1
KOHYA, TRANSFORMER, NATIVE = "kohya_unet", "diffusers_transformer", "comfy_native"
# First component of a diffusers UNet2DConditionModel module path.
UNET_ROOTS = frozenset({"down_blocks", "mid_block", "up_blocks", "conv_in", "conv_out", "conv_norm_out",
                        "time_embedding", "add_embedding", "class_embedding", "encoder_hid_proj"})
_KEY = {KOHYA: re.compile(r"^lora_unet_(?P<name>\w+)\.lora_(?P<kind>down|up)\.weight$"),
        TRANSFORMER: re.compile(r"^transformer\.(?P<name>[\w.]+)\.lora_(?P<kind>A|B)\.weight$"),
        NATIVE: re.compile(r"^diffusion_model\.(?P<name>[\w.]+)\.lora_(?P<kind>down|up)\.weight$")}


def key_style(paths, namespace: str | None = None) -> str:
    """NATIVE for ComfyUI-named layers (namespace "comfy"); of diffusers paths, KOHYA for UNet
    module paths, TRANSFORMER for transformer (DiT) paths."""
    if namespace == COMFY:
        return NATIVE
    unet = {p.split(".", 1)[0] in UNET_ROOTS for p in paths}
    if len(unet) != 1:
        raise ValueError("the adapter mixes UNet and transformer layer paths; no single LoRA key scheme fits "
                         f"(e.g. {sorted(paths)[:2]})")
    return KOHYA if unet.pop() else TRANSFORMER


def lora_keys(path: str, style: str) -> tuple[str, str]:
    """(down key, up key) of the LoRA pair for one diffusers module path."""
    if style == KOHYA:
        stem = "lora_unet_" + path.replace(".", "_")
        return f"{stem}.lora_down.weight", f"{stem}.lora_up.weight"
    if style == NATIVE:
        return f"diffusion_model.{path}.lora_down.weight", f"diffusion_model.{path}.lora_up.weight"
    return f"transformer.{path}.lora_A.weight", f"transformer.{path}.lora_B.weight"


def router_mix(adapter: FeRAAdapter, latent: torch.Tensor | None = None, energies=None,
               controls: RoutingControls | None = None) -> list[float]:
    """The adapter's own mix (router(band energies), after `controls`), averaged over the latent's rows.

    A fixed mix or forced expert in `controls` needs no latent: the router returns it (normalised,
    then gains applied) exactly as Apply FeRA would use it.
    """
    controls = controls or RoutingControls()
    cfg = adapter.config
    if energies is None:
        if latent is not None:
            energies = band_energies(latent, cfg.num_bands, cfg.indicator)
        elif controls.mix is not None:
            energies = torch.zeros(1, cfg.num_bands)  # ignored by a fixed mix
        else:
            raise ValueError("the router's mix needs a latent (or its band energies); give a latent, a mix or an expert")
    energies = torch.as_tensor(energies, dtype=torch.float32).reshape(-1, cfg.num_bands)
    if not torch.isfinite(energies).all():
        raise ValueError(f"band energies must be finite, got {energies.tolist()}")
    with torch.no_grad():
        return adapter.router(energies, controls).float().mean(0).tolist()


def bake_lora(adapter: FeRAAdapter, mix, strength: float = 1.0, source: dict | None = None,
              dtype: torch.dtype | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of the LoRA equal to `adapter` with every row routed to `mix`.

    mix: one weight per expert, used as given (a router output or trace mean already sums to 1).
    strength: folded into the up weights (Apply FeRA's strength). dtype: of the file (default: the
    adapter's). source: JSON-able description of where the mix came from, kept in the metadata.
    """
    cfg = adapter.config
    mix = [float(w) for w in mix]
    if len(mix) != cfg.num_experts:
        raise ValueError(f"mix needs one weight per expert ({cfg.num_experts}), got {len(mix)}: {mix}")
    if not all(map(math.isfinite, mix + [float(strength)])):
        raise ValueError(f"mix and strength must be finite, got {mix}, {strength}")
    active = [m for m, w in enumerate(mix) if w != 0.0]
    if not active:
        raise ValueError(f"mix {mix} gives every expert weight 0: the LoRA would be empty")
    style = key_style(adapter.layers, adapter.key_namespace)
    tensors = {}
    for path, experts in adapter.layers.items():
        pairs = experts.split()
        out_dtype = dtype or experts.up.dtype
        down = torch.cat([pairs[m][0] for m in active]).detach()
        up = torch.cat([pairs[m][1].detach().float() * (mix[m] * experts.scale * strength) for m in active], dim=1)
        down_key, up_key = lora_keys(path, style)
        tensors[down_key] = down.to(out_dtype).contiguous()
        tensors[up_key] = up.to(out_dtype).contiguous()
    info = {"version": BAKE_VERSION, "key_style": style, "rank": len(active) * cfg.rank, "experts": active,
            "mix": mix, "strength": float(strength), "source": source or {"kind": "mix"},
            "adapter_config": cfg.to_dict()}
    return tensors, {BAKED_META: json.dumps(info), "format": "pt"}


def save_lora(tensors: dict, metadata: dict, path) -> Path:
    """Write a baked LoRA atomically (.safetensors only): complete or absent."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: baked LoRAs are saved as .safetensors")
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_baked_lora(path) -> tuple[dict[str, torch.Tensor], dict]:
    """Read back a baked LoRA, refusing anything this module would not have written.

    Same checks as adapter files (named, floating, finite tensors of at least one dimension),
    plus: `fera.baked` metadata, keys of its key style only, complete down/up pairs of its rank.
    """
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(path, "no such file")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterFileError(path, f"unreadable safetensors file ({err})") from None
    try:
        info = json.loads(meta[BAKED_META])
        style, rank = info["key_style"], info["rank"]
        if info["version"] != BAKE_VERSION or style not in _KEY or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"version {info['version']!r}, key style {style!r}, rank {rank!r}")
    except (KeyError, TypeError, ValueError) as err:
        raise AdapterFileError(path, f"not a baked FeRA LoRA (metadata {BAKED_META!r}: {err})") from None
    _check_tensors(tensors, path)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        match = _KEY[style].match(key)
        if not match:
            raise AdapterFileError(path, f"unexpected key {key!r} for key style {style}")
        pairs.setdefault(match["name"], {})["down" if match["kind"] in ("down", "A") else "up"] = value
    for name, pair in pairs.items():
        down, up = pair.get("down"), pair.get("up")
        if down is None or up is None:
            raise AdapterFileError(path, f"{name} lacks its down or up weight")
        if down.ndim not in (2, 4) or up.ndim != down.ndim or down.shape[0] != rank or up.shape[1] != rank \
                or up.shape[2:] not in ((), (1, 1)):
            raise AdapterFileError(path, f"{name}: down {tuple(down.shape)} / up {tuple(up.shape)} are not a "
                                         f"rank-{rank} LoRA pair")
    return tensors, info
