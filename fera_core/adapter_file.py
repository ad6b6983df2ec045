"""FeRA adapters in memory and on disk.

File format (version 1): safetensors. Tensor keys are the reference's, so files interchange
with the reference trainer:
    router.net.0.weight, router.net.0.bias, router.net.2.weight, router.net.2.bias
    base_model.<module path>.experts.<m>.lora_down.weight   (r, in) or (r, in, kh, kw)
    base_model.<module path>.experts.<m>.lora_up.weight     (out, r) or (out, r, 1, 1)
Metadata (strings): "fera.format_version" = "1", "fera.key_namespace" = "diffusers" or "comfy",
"fera.config" = FeRAConfig as JSON (rank, alpha, experts, bands, tau, indicator,
target modules, matching rule, base model family); optional "fera.training" = the training
settings as JSON. Readers ignore metadata keys they do not know.

The key namespace says whose module paths name the layers: "diffusers" (diffusers' module
paths, the reference's and every file before ComfyUI-native training; the default when the key
is absent) or "comfy" (ComfyUI's own paths below `diffusion_model.`, e.g. `blocks.0.self_attn.q`
for Wan, for the families diffusers names no layers of). The file layout is the same for both.

Reference files (torch.save pickles) are read with torch.load(weights_only=True), which
refuses anything but tensors and plain containers. They carry no alpha or tau: the caller
supplies them (reference defaults otherwise) and conversion records them. Every file is
validated (names, shapes, dtypes, finiteness) before any tensor is used.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from .atomic import atomic_write
from .config import FeRAConfig
from .experts import RoutedExperts
from .indicator import REFERENCE
from .router import SoftFrequencyRouter

FORMAT_VERSION = "1"
DIFFUSERS, COMFY = "diffusers", "comfy"
KEY_NAMESPACES = (DIFFUSERS, COMFY)
_EXPERT_KEY = re.compile(r"^base_model\.(?P<path>.+)\.experts\.(?P<m>\d+)\.lora_(?P<kind>down|up)\.weight$")
_ROUTER_SHAPES = ("net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class AdapterFileError(ValueError):
    """A FeRA adapter file (or state dict) that cannot be used; the message names it and why."""

    def __init__(self, source, problem: str):
        super().__init__(f"{source}: {problem}")


class FeRAAdapter(nn.Module):
    """A router and the routed experts of every adapted layer, keyed by module path.

    key_namespace: whose module paths the layer keys are (DIFFUSERS or COMFY, see the module doc).
    name: what traces and plots call the adapter (its file name when loaded from a file).
    training_settings: how it was trained (a trainer's settings, JSON-serialisable), saved as the
    optional "fera.training" metadata; None when unknown. (Not `training`: that is nn.Module's
    train/eval flag.)
    """

    def __init__(self, config: FeRAConfig, layers: dict[str, RoutedExperts], name: str | None = None,
                 training_settings: dict | None = None, key_namespace: str = DIFFUSERS):
        super().__init__()
        if key_namespace not in KEY_NAMESPACES:
            raise ValueError(f"unknown key namespace {key_namespace!r}; expected one of {KEY_NAMESPACES}")
        self.name, self.training_settings, self.key_namespace = name, training_settings, key_namespace
        self.config = config.validate()
        self.router = SoftFrequencyRouter(config.num_bands, config.num_experts, config.router_tau, config.router_hidden)
        # ModuleDict names may not contain dots; module paths do.
        self._layers = nn.ModuleDict({path.replace(".", "/"): experts for path, experts in layers.items()})

    @property
    def layers(self) -> dict[str, RoutedExperts]:
        return {name.replace("/", "."): experts for name, experts in self._layers.items()}

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def file_state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors under the reference's key names (fresh copies, safe to serialise)."""
        sd = {f"router.{k}": v.detach().clone() for k, v in self.router.state_dict().items()}
        for path, experts in self.layers.items():
            for m, (down, up) in enumerate(experts.split()):
                sd[f"base_model.{path}.experts.{m}.lora_down.weight"] = down.detach().clone()
                sd[f"base_model.{path}.experts.{m}.lora_up.weight"] = up.detach().clone()
        return sd

    @classmethod
    def from_state_dict(cls, sd: dict, config: FeRAConfig, source="state dict",
                        key_namespace: str = DIFFUSERS) -> "FeRAAdapter":
        """Build an adapter from reference-named tensors, refusing anything malformed."""
        _check_tensors(sd, source)
        router = {k[len("router."):]: v for k, v in sd.items() if k.startswith("router.")}
        if sorted(router) != sorted(_ROUTER_SHAPES):
            raise AdapterFileError(source, f"router tensors must be {['router.' + k for k in _ROUTER_SHAPES]}, "
                                           f"found {sorted('router.' + k for k in router)}")
        pairs: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
        unknown = []
        for key, value in sd.items():
            if key.startswith("router."):
                continue
            match = _EXPERT_KEY.match(key)
            if not match:
                unknown.append(key)
                continue
            pairs.setdefault(match["path"], {}).setdefault(int(match["m"]), {})[match["kind"]] = value
        if unknown:
            raise AdapterFileError(source, f"{len(unknown)} unexpected keys, e.g. {unknown[:3]}")
        if not pairs:
            raise AdapterFileError(source, "no expert weights (no 'base_model.<path>.experts.<m>.lora_down.weight' keys)")
        _check_router(router, config, source)
        layers = {path: _build_experts(path, by_expert, config, source) for path, by_expert in sorted(pairs.items())}
        adapter = cls(config, layers, key_namespace=key_namespace)
        adapter.router.load_state_dict(router)
        adapter.router.to(router["net.0.weight"].dtype)
        return adapter


def _check_tensors(sd, source) -> None:
    if not isinstance(sd, dict) or not sd:
        raise AdapterFileError(source, f"expected a non-empty dict of tensors, got {type(sd).__name__}")
    for key, value in sd.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise AdapterFileError(source, f"entry {key!r} is not a named tensor")
        if value.ndim == 0:
            raise AdapterFileError(source, f"{key} is a 0-d tensor; every FeRA tensor has at least one dimension")
        if value.dtype not in _FLOAT_DTYPES:
            raise AdapterFileError(source, f"{key} has dtype {value.dtype}; expected a floating-point dtype")
        if not torch.isfinite(value).all():
            raise AdapterFileError(source, f"{key} contains NaN or infinite values")


def _check_router(router: dict, config: FeRAConfig, source) -> None:
    h, n, m = config.router_hidden, config.num_bands, config.num_experts
    expected = {"net.0.weight": (h, n), "net.0.bias": (h,), "net.2.weight": (m, h), "net.2.bias": (m,)}
    for key, shape in expected.items():
        if tuple(router[key].shape) != shape:
            raise AdapterFileError(source, f"router.{key} has shape {tuple(router[key].shape)}, expected {shape} "
                                           f"for {n} bands, {m} experts, hidden {h}")


def _build_experts(path: str, by_expert: dict, config: FeRAConfig, source) -> RoutedExperts:
    m_count, r = config.num_experts, config.rank
    if sorted(by_expert) != list(range(m_count)):
        raise AdapterFileError(source, f"{path} has experts {sorted(by_expert)}, expected 0..{m_count - 1}")
    down0 = by_expert[0].get("down")
    up0 = by_expert[0].get("up")
    if down0 is None or up0 is None:
        raise AdapterFileError(source, f"{path} expert 0 lacks lora_down or lora_up")
    kernel = tuple(down0.shape[2:]) if down0.ndim == 4 else None
    if down0.ndim not in (2, 4) or down0.shape[0] != r:
        raise AdapterFileError(source, f"{path} lora_down has shape {tuple(down0.shape)}; expected (rank={r}, in) "
                               "or (rank, in, kh, kw)")
    experts = RoutedExperts(down0.shape[1], up0.shape[0], m_count, r, config.alpha, kernel)
    pairs = []
    for m in range(m_count):
        down, up = by_expert[m].get("down"), by_expert[m].get("up")
        if down is None or up is None:
            raise AdapterFileError(source, f"{path} expert {m} lacks lora_down or lora_up")
        want_down, want_up = tuple(experts.down.shape[1:]), tuple(experts.up.shape[:1]) + tuple(experts.up.shape[2:])
        if tuple(down.shape) != (r, *want_down) or tuple(up.shape) != (want_up[0], r, *want_up[1:]):
            raise AdapterFileError(source, f"{path} expert {m}: lora_down {tuple(down.shape)} / lora_up "
                                   f"{tuple(up.shape)} do not match expert 0 ({(r, *want_down)} / "
                                   f"{(want_up[0], r, *want_up[1:])})")
        pairs.append((down, up))
    experts.to(down0.dtype)
    experts.load_split(pairs)
    return experts


def _metadata_config(meta: dict | None, source) -> tuple[FeRAConfig, str]:
    """(config, key namespace) of a file's metadata."""
    meta = meta or {}
    if "soda.format_version" in meta and "fera.format_version" not in meta:
        raise AdapterFileError(source, "this is a SODA adapter, not a FeRA one: load it with Load SODA Adapter")
    if meta.get("fera.format_version") != FORMAT_VERSION:
        raise AdapterFileError(source, f"not a FeRA adapter of format version {FORMAT_VERSION} "
                                       f"(fera.format_version = {meta.get('fera.format_version')!r})")
    namespace = meta.get("fera.key_namespace", DIFFUSERS)
    if namespace not in KEY_NAMESPACES:
        raise AdapterFileError(source, f"unsupported key namespace {namespace!r}")
    try:
        return FeRAConfig.from_dict(json.loads(meta["fera.config"])), namespace
    except (KeyError, TypeError, ValueError) as err:
        raise AdapterFileError(source, f"invalid fera.config metadata: {err}") from None


def _metadata_training(meta: dict | None) -> dict | None:
    """The optional training settings; unreadable ones are dropped (they never affect the adapter)."""
    try:
        training = json.loads((meta or {})["fera.training"])
    except (KeyError, TypeError, ValueError):
        return None
    return training if isinstance(training, dict) else None


def _reference_config(sd: dict, source, alpha: float | None, tau: float | None, base_model: str | None) -> FeRAConfig:
    """A reference .pt file records no config: read sizes off its tensors, take alpha/tau from the caller."""
    _check_tensors(sd, source)
    try:
        hidden, bands = sd["router.net.0.weight"].shape
        experts = sd["router.net.2.weight"].shape[0]
    except (KeyError, ValueError):
        raise AdapterFileError(source, "no valid router.net.0.weight / router.net.2.weight") from None
    paths = {m["path"]: sd[k].shape[0] for k in sd if (m := _EXPERT_KEY.match(k)) and m["kind"] == "down"}
    if not paths:
        raise AdapterFileError(source, "no expert weights (no 'base_model.<path>.experts.<m>.lora_down.weight' keys)")
    config = FeRAConfig(
        rank=next(iter(paths.values())), num_bands=bands, num_experts=experts, router_hidden=hidden,
        target_modules=sorted({p.rsplit(".", 1)[-1] for p in paths}), indicator=REFERENCE,
        base_model=base_model or "unknown")
    if alpha is not None:
        config.alpha = alpha
    if tau is not None:
        config.router_tau = tau
    try:
        return config.validate()
    except ValueError as err:
        raise AdapterFileError(source, str(err)) from None


def load_adapter(path, alpha: float | None = None, tau: float | None = None,
                 base_model: str | None = None, name: str | None = None) -> FeRAAdapter:
    """Read a FeRA adapter: this project's .safetensors, or a reference .pt (never unpickled).

    alpha, tau and base_model fill what a reference file lacks; for .safetensors they must
    be None (the file records them). name: the adapter's name (default: the file's name).
    """
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(path, "no such file")
    if path.suffix == ".safetensors":
        if alpha is not None or tau is not None or base_model is not None:
            raise AdapterFileError(path, "alpha, tau and base_model are recorded in .safetensors adapters; "
                                         "they can only be supplied for reference .pt files")
        try:
            from safetensors import safe_open
            with safe_open(str(path), "pt") as f:
                meta = f.metadata()
            sd = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as err:
            raise AdapterFileError(path, f"unreadable safetensors file ({err})") from None
        config, namespace = _metadata_config(meta, path)
        training = _metadata_training(meta)
    elif path.suffix in (".pt", ".pth", ".bin"):
        try:
            sd = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as err:  # weights_only raises UnpicklingError, RuntimeError, EOFError...
            raise AdapterFileError(path, f"not a plain tensor file, refused without unpickling ({type(err).__name__}: "
                                         f"{str(err).splitlines()[0] if str(err) else ''})") from None
        config = _reference_config(sd, path, alpha, tau, base_model)
        training, namespace = None, DIFFUSERS
    else:
        raise AdapterFileError(path, "unsupported extension; expected .safetensors, .pt, .pth or .bin")
    adapter = FeRAAdapter.from_state_dict(sd, config, source=path, key_namespace=namespace)
    adapter.name, adapter.training_settings = name or path.name, training
    return adapter


def save_adapter(adapter: FeRAAdapter, path) -> Path:
    """Write a .safetensors adapter atomically: the file is complete or absent."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: adapters are saved as .safetensors")
    meta = {"fera.format_version": FORMAT_VERSION, "fera.key_namespace": adapter.key_namespace,
            "fera.config": json.dumps(adapter.config.to_dict(), sort_keys=True)}
    if adapter.training_settings:
        meta["fera.training"] = json.dumps(adapter.training_settings, sort_keys=True)
    return atomic_write(path, lambda tmp: save_file(adapter.file_state_dict(), tmp, metadata=meta))

