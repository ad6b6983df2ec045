"""Bake a SODA adapter into one standard LoRA of a chosen rank, for tools without SODA.

A SODA layer changes its frozen weight by dW = W'(W0) - W0 (at strength t: t dW, the blend Apply
SODA uses), which is in general of full rank. The LoRA keeps its best rank-r approximation in the
Frobenius norm (Eckart-Young): with dW = sum_i sigma_i u_i v_i^T, up = [sigma_i u_i], down = [v_i^T]
for the r largest sigma_i. The fraction of dW's energy kept, sum_{i<=r} sigma_i^2 / sum_i sigma_i^2,
is reported per layer (and recorded in the file's metadata); a layer whose dW has rank < r is kept
exactly, its pair padded with zero rows so every pair has rank r. Key names, the absent alpha and the
`fera.baked` metadata are FeRA's bake's (fera_core.bake.lora), so the same loaders read both.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors import safe_open

from ..soda.adapter import SODAAdapter
from ..soda.factorisation import as_matrix
from ..soda.merge import LayerMerge
from .lora import BAKE_VERSION, BAKED_META, key_style, lora_keys


def low_rank(diff: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(up (out, rank), down (rank, cols), captured energy fraction) of a (out, cols) matrix."""
    u, s, vt = torch.linalg.svd(diff.double(), full_matrices=False)
    r = min(rank, s.shape[0])
    total = float(s.square().sum())
    captured = float(s[:r].square().sum()) / total if total > 0 else 1.0
    up, down = u[:, :r] * s[:r], vt[:r]
    if r < rank:
        up = torch.cat([up, up.new_zeros(up.shape[0], rank - r)], dim=1)
        down = torch.cat([down, down.new_zeros(rank - r, down.shape[1])])
    return up, down, captured


def bake_soda(adapter: SODAAdapter, weights: dict[str, torch.Tensor], rank: int, strength: float = 1.0,
              dtype: torch.dtype = torch.float16, source: dict | None = None):
    """(tensors, metadata, {layer path: captured energy fraction}) of the rank-`rank` LoRA of the adapter's
    change to `weights` ({diffusers module path: frozen weight}) at `strength`."""
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if not math.isfinite(strength):
        raise ValueError(f"strength must be finite, got {strength}")
    missing = sorted(set(adapter.layers) - set(weights))
    if missing:
        raise ValueError(f"no frozen weight for {len(missing)} adapted layers, e.g. {missing[:3]}")
    style = key_style(adapter.layers)
    tensors, captured = {}, {}
    for path, layer in adapter.layers.items():
        w0 = weights[path]
        if tuple(w0.shape) != layer.shape:
            raise ValueError(f"{path}: the adapter is for a weight of shape {layer.shape}, the base weight is "
                             f"{tuple(w0.shape)}")
        diff = as_matrix(LayerMerge(layer).difference(w0.float(), strength))
        up, down, captured[path] = low_rank(diff, rank)
        if w0.ndim == 4:
            down, up = down.reshape(rank, *w0.shape[1:]), up[:, :, None, None]
        down_key, up_key = lora_keys(path, style)
        tensors[down_key], tensors[up_key] = down.to(dtype).contiguous(), up.to(dtype).contiguous()
    info = {"version": BAKE_VERSION, "key_style": style, "rank": rank, "strength": float(strength),
            "source": dict(source or {}, kind="soda"), "adapter_config": adapter.config.to_dict(),
            "captured_energy": captured}
    return tensors, {BAKED_META: json.dumps(info), "format": "pt"}, captured


def read_base_weights(location, paths) -> dict[str, torch.Tensor]:
    """{path: <path>.weight} from a diffusers model's safetensors: one file, or a folder of them (shards, or a
    pipeline's unet/ or transformer/ folder). Only the tensors asked for are read."""
    location = Path(location)
    if location.is_dir():
        for sub in ("unet", "transformer"):
            if (location / sub).is_dir():
                location = location / sub
        files = sorted(location.glob("*.safetensors"))
    else:
        files = [location]
    if not files or not all(f.is_file() for f in files):
        raise ValueError(f"{location}: no .safetensors base weights found")
    wanted, out = {f"{p}.weight": p for p in paths}, {}
    for file in files:
        with safe_open(str(file), "pt") as f:
            for key in set(f.keys()) & set(wanted):
                out[wanted[key]] = f.get_tensor(key)
    return out
