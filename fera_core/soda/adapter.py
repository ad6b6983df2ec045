"""SODA adapters in memory and on disk.

File format (version 1): safetensors holding only what was trained, never a copy of a weight:
    base_model.<diffusers module path>.soda.spectrum      (k,)     the spectrum increment
    base_model.<diffusers module path>.soda.rotation.<i>  (a_i, a_i) the i-th orthogonal Kronecker factor
Metadata (strings): "soda.format_version" = "1", "soda.key_namespace" = "diffusers", "soda.config" =
SODAConfig as JSON (method "soda", variant, rotated side, factor-size overrides, targets, base model
family), "soda.shapes" = {module path: frozen weight shape} as JSON (what the factor sizes and k are
checked against), optional "soda.training" = training settings. Every file is validated before any
tensor is used: names, shapes against the recorded weight shapes, dtypes, finiteness, and that each
factor is orthogonal.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..adapter_file import AdapterFileError, _check_tensors
from ..atomic import atomic_write
from .config import SODAConfig
from .factorisation import rotated_size, spectrum_size
from .layer import SODALayer, orthogonality_error

FORMAT_VERSION = "1"
KEY_NAMESPACE = "diffusers"
_KEY = re.compile(r"^base_model\.(?P<path>.+)\.soda\.(?:(?P<spectrum>spectrum)|rotation\.(?P<i>\d+))$")
# A stored factor may deviate from orthogonal by at most this (float32 files: ~1e-6 after training).
ORTHOGONALITY_TOLERANCE = {torch.float16: 1e-2, torch.bfloat16: 3e-2}
DEFAULT_TOLERANCE = 1e-4


def is_soda_file(meta: dict | None) -> bool:
    return "soda.format_version" in (meta or {})


def is_soda_path(path) -> bool:
    """Whether `path` is a safetensors file with SODA metadata (readable files only; never raises)."""
    try:
        with safe_open(str(path), "pt") as f:
            return is_soda_file(f.metadata())
    except (SafetensorError, OSError, ValueError):
        return False


class SODAAdapter(nn.Module):
    """The SODA layers of a model, keyed by diffusers module path; `name` and `training_settings` as FeRAAdapter's."""

    def __init__(self, config: SODAConfig, layers: dict[str, SODALayer], name: str | None = None,
                 training_settings: dict | None = None):
        super().__init__()
        self.config = config.validate()
        self.name, self.training_settings = name, training_settings
        self._layers = nn.ModuleDict({path.replace(".", "/"): layer for path, layer in layers.items()})

    @classmethod
    def for_shapes(cls, config: SODAConfig, shapes: dict[str, tuple]) -> "SODAAdapter":
        """A fresh adapter (identity: zero increments, identity rotations) for frozen weights of these shapes."""
        return cls(config, {path: new_layer(config, shape) for path, shape in shapes.items()})

    @property
    def layers(self) -> dict[str, SODALayer]:
        return {name.replace("/", "."): layer for name, layer in self._layers.items()}

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def file_state_dict(self) -> dict[str, torch.Tensor]:
        sd = {}
        for path, layer in self.layers.items():
            sd[f"base_model.{path}.soda.spectrum"] = layer.spectrum.detach().float().clone()
            for i, r in enumerate(layer.rotation.matrices()):
                sd[f"base_model.{path}.soda.rotation.{i}"] = r.detach().float().clone()
        return sd

    def orthogonality_error(self) -> float:
        """The largest max |R_i^T R_i - I| over every factor of every layer."""
        return max((orthogonality_error(r) for layer in self.layers.values() for r in layer.rotation.matrices()),
                   default=0.0)

    @classmethod
    def from_state_dict(cls, sd: dict, config: SODAConfig, shapes: dict, source="state dict") -> "SODAAdapter":
        _check_tensors(sd, source)
        found: dict[str, dict] = {}
        for key, value in sd.items():
            m = _KEY.match(key)
            if not m:
                raise AdapterFileError(source, f"unexpected key {key!r} (SODA keys: base_model.<path>.soda.spectrum, "
                                               "base_model.<path>.soda.rotation.<i>)")
            entry = found.setdefault(m["path"], {"rotation": {}})
            if m["spectrum"]:
                entry["spectrum"] = value
            else:
                entry["rotation"][int(m["i"])] = value
        if set(found) != set(shapes):
            raise AdapterFileError(source, f"tensors and recorded shapes name different layers: "
                                           f"{sorted(set(found) ^ set(shapes))[:3]}")
        layers = {path: _build_layer(path, found[path], config, tuple(shapes[path]), source) for path in sorted(found)}
        return cls(config, layers)


def new_layer(config: SODAConfig, shape) -> SODALayer:
    return SODALayer(shape, config.variant, config.side, config.kron_sizes(rotated_size(shape, config.side)))


def _build_layer(path: str, entry: dict, config: SODAConfig, shape: tuple, source) -> SODALayer:
    spectrum, rotation = entry.get("spectrum"), entry["rotation"]
    k, n = spectrum_size(shape), rotated_size(shape, config.side)
    if spectrum is None or tuple(spectrum.shape) != (k,):
        raise AdapterFileError(source, f"{path}: spectrum increment has shape "
                                       f"{None if spectrum is None else tuple(spectrum.shape)}, expected ({k},) for a "
                                       f"weight of shape {shape}")
    if sorted(rotation) != list(range(len(rotation))) or not rotation:
        raise AdapterFileError(source, f"{path}: rotation factors {sorted(rotation)} are not numbered 0..m-1")
    factors = [rotation[i] for i in range(len(rotation))]
    if any(f.ndim != 2 or f.shape[0] != f.shape[1] for f in factors) or \
            math.prod(f.shape[0] for f in factors) != n:
        raise AdapterFileError(source, f"{path}: rotation factors {[tuple(f.shape) for f in factors]} are not square "
                                       f"matrices whose sizes multiply to {n} (side {config.side} of {shape})")
    for i, f in enumerate(factors):
        error = orthogonality_error(f)
        if error > ORTHOGONALITY_TOLERANCE.get(f.dtype, DEFAULT_TOLERANCE):
            raise AdapterFileError(source, f"{path}: rotation factor {i} is not orthogonal (max |R^T R - I| = "
                                           f"{error:.2e})")
    layer = SODALayer(shape, config.variant, config.side, [f.shape[0] for f in factors])
    with torch.no_grad():
        layer.spectrum.copy_(spectrum.float())
    layer.rotation.load([f.float() for f in factors])
    return layer


def _metadata(meta: dict | None, source) -> tuple[SODAConfig, dict, dict | None]:
    meta = meta or {}
    if meta.get("soda.format_version") != FORMAT_VERSION:
        raise AdapterFileError(source, f"not a SODA adapter of format version {FORMAT_VERSION} "
                                       f"(soda.format_version = {meta.get('soda.format_version')!r})")
    if meta.get("soda.key_namespace", KEY_NAMESPACE) != KEY_NAMESPACE:
        raise AdapterFileError(source, f"unsupported key namespace {meta['soda.key_namespace']!r}")
    try:
        config = SODAConfig.from_dict(json.loads(meta["soda.config"]))
        shapes = json.loads(meta["soda.shapes"])
        if not isinstance(shapes, dict) or not all(
                isinstance(s, list) and len(s) in (2, 4) and all(isinstance(d, int) and d > 0 for d in s)
                for s in shapes.values()):
            raise ValueError("soda.shapes must map each layer to its weight shape")
    except (KeyError, TypeError, ValueError) as err:
        raise AdapterFileError(source, f"invalid SODA metadata: {err}") from None
    try:
        training = json.loads(meta["soda.training"])
    except (KeyError, TypeError, ValueError):
        training = None
    return config, shapes, training if isinstance(training, dict) else None


def load_soda(path, name: str | None = None) -> SODAAdapter:
    """Read and validate a SODA .safetensors adapter; name defaults to the file's name."""
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(path, "no such file")
    if path.suffix != ".safetensors":
        raise AdapterFileError(path, "SODA adapters are .safetensors files")
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        sd = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise AdapterFileError(path, f"unreadable safetensors file ({err})") from None
    if not is_soda_file(meta) and "fera.format_version" in (meta or {}):
        raise AdapterFileError(path, "this is a FeRA adapter, not a SODA one: load it with Load FeRA Adapter")
    config, shapes, training = _metadata(meta, path)
    adapter = SODAAdapter.from_state_dict(sd, config, shapes, source=path)
    adapter.name, adapter.training_settings = name or path.name, training
    return adapter


def save_soda(adapter: SODAAdapter, path) -> Path:
    """Write a .safetensors SODA adapter atomically: the file is complete or absent."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: adapters are saved as .safetensors")
    meta = {"soda.format_version": FORMAT_VERSION, "soda.key_namespace": KEY_NAMESPACE,
            "soda.config": json.dumps(adapter.config.to_dict(), sort_keys=True),
            "soda.shapes": json.dumps({p: list(layer.shape) for p, layer in adapter.layers.items()}, sort_keys=True)}
    if adapter.training_settings:
        meta["soda.training"] = json.dumps(adapter.training_settings, sort_keys=True)
    return atomic_write(path, lambda tmp: save_file(adapter.file_state_dict(), tmp, metadata=meta))
