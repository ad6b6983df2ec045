"""SODA on a ComfyUI ModelPatcher: sampling through ComfyUI's own weight patches, training through its
weight wrappers.

Sampling: each adapted weight gets a patch (ModelPatcher.add_patches) whose value is a
comfy.weight_adapter.WeightAdapterBase, as LoRA, OFT and BOFT patches are; ComfyUI calls its
calculate_weight when it patches the weight (once per model load; per forward only in its low-VRAM
and dynamic-VRAM modes), with its own offloading, casting, strength and patch stacking. The patch
adds strength * (W'(W) - W) to the weight it receives (fera_core.soda.merge: a blend, like OFT's);
the factorisation of that weight is computed at the first call and kept on the adapter, so a changed
strength or a reloaded model does not factorise again. Strength 0 adds no patch: the base model bit
for bit. The pack imports weight_adapter only here and checks for it: hosts without it are refused
with a message.

Training: each adapted weight gets a weight wrapper (ModelPatcher.add_weight_wrapper, what ComfyUI's
own trainer uses) computing W' from the weight the layer casts, differentiably in the adapter's
parameters and keeping no intermediates for backward (fera_core.soda.rebuilt); each weight is factorised
at its first forward and kept for the session.
"""
from __future__ import annotations

import weakref

import torch

from ..fera_core.families import compatible, display_name
from ..fera_core.soda.adapter import SODAAdapter
from ..fera_core.soda.factorisation import spectral_basis
from ..fera_core.soda.merge import LayerMerge
from ..fera_core.soda.rebuilt import Piece, adapted_weight
from .module_paths import diffusers_to_comfy, model_family
from .routing import AdapterMismatchError

try:
    from comfy.weight_adapter import WeightAdapterBase
except ImportError:  # ComfyUI before comfy/weight_adapter
    WeightAdapterBase = None

_MERGES: "weakref.WeakKeyDictionary[SODAAdapter, dict]" = weakref.WeakKeyDictionary()


def match_weights(model, adapter: SODAAdapter) -> dict[str, list[tuple[str, tuple[int, int] | None]]]:
    """{ComfyUI weight key: [(adapter layer path, output rows or None), ...]}; refuses any partial fit."""
    family = model_family(model)
    if not compatible(adapter.config.base_model, family):
        raise AdapterMismatchError(f"SODA adapter trained for {display_name(adapter.config.base_model)}, this model "
                                   f"is {family.name}. Nothing was patched.")
    names = diffusers_to_comfy(model)
    targets: dict[str, list] = {}
    problems = []
    for path, layer in adapter.layers.items():
        if path not in names:
            problems.append(f"{path}: no such layer")
            continue
        comfy_path, rows = names[path]
        weight = model.get_submodule(comfy_path).weight
        shape = tuple(weight.shape) if rows is None else (rows[1], *weight.shape[1:])
        if shape != layer.shape:
            problems.append(f"{path}: adapter for {layer.shape}, model weight {shape}")
            continue
        targets.setdefault(f"{comfy_path}.weight", []).append((path, rows))
    if problems:
        raise AdapterMismatchError(f"SODA adapter (trained for {display_name(adapter.config.base_model)}) does not fit "
                                   f"this {family.name} model: {len(problems)} of {len(adapter.layers)} layers do not "
                                   f"match (e.g. {problems[:2]}). Nothing was patched.")
    return targets


def merges(adapter: SODAAdapter, store_dtype: torch.dtype) -> dict[str, LayerMerge]:
    """The adapter's LayerMerges, one per layer, kept as long as the adapter lives (their cache survives
    re-executed Apply SODA nodes)."""
    kept = _MERGES.setdefault(adapter, {})
    for path, layer in adapter.layers.items():
        if path not in kept or kept[path].store_dtype != store_dtype:
            kept[path] = LayerMerge(layer, store_dtype)
    return kept


if WeightAdapterBase is not None:
    class SODAPatch(WeightAdapterBase):
        """One weight's SODA patch. weights = (LayerMerge,): ComfyUI may rebuild the patch as
        type(p)(loaded_keys, weights) when it prefetches patch tensors; the merge passes through."""

        name = "soda"

        def __init__(self, loaded_keys, weights):
            self.loaded_keys, self.weights = loaded_keys, weights

        def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                             intermediate_dtype=torch.float32, original_weight=None):
            merge = self.weights[0]
            weight += function(merge.difference(weight, strength)).type(weight.dtype)
            return weight


def apply_soda(patcher, adapter: SODAAdapter, strength: float):
    """A clone of `patcher` with the adapter's weight patches at `strength`; `patcher` is untouched."""
    if WeightAdapterBase is None:
        raise RuntimeError("Applying SODA needs ComfyUI's comfy.weight_adapter (ComfyUI 0.3.64 or newer)")
    targets = match_weights(patcher.model, adapter)
    clone = patcher.clone()
    if strength == 0:
        return clone
    dtype = patcher.model_dtype()
    kept = merges(adapter, dtype if dtype in (torch.float16, torch.bfloat16) else torch.float32)
    patches = {}
    for key, entries in targets.items():
        for path, rows in entries:
            patch = SODAPatch({key}, (kept[path],))
            patches[key if rows is None else (key, (0, rows[0], rows[1]))] = patch
    added = clone.add_patches(patches, strength)
    if len(added) != len(patches):
        raise RuntimeError(f"ComfyUI accepted {len(added)} of {len(patches)} SODA weight patches")
    return clone


class LiveSODA:
    """Training: the weight wrapper of every adapted weight, W -> W'(W), differentiable in the adapter and keeping
    no intermediates for backward (fera_core.soda.rebuilt)."""

    def __init__(self, adapter: SODAAdapter):
        self.adapter, self.bases = adapter, {}

    def _piece(self, path: str, offset: int, weight: torch.Tensor) -> Piece:
        layer = self.adapter.layers[path]
        basis = self.bases.get(path)
        if basis is None or basis[0].device != weight.device or basis[0].dtype != weight.dtype:
            basis = self.bases[path] = tuple(b.to(weight.dtype) for b in
                                             spectral_basis(weight.detach(), layer.variant, layer.side))
        return Piece(offset, layer, basis)

    def wrapper(self, entries: list[tuple[str, tuple[int, int] | None]]):
        def soda_weight(weight):
            pieces = [self._piece(path, 0, weight) if rows is None else
                      self._piece(path, rows[0], weight.narrow(0, rows[0], rows[1])) for path, rows in entries]
            return adapted_weight(weight, pieces)
        return soda_weight


def attach_live(patcher, adapter: SODAAdapter):
    """A clone of `patcher` whose adapted weights are computed from the adapter's parameters (training)."""
    live = LiveSODA(adapter)
    clone = patcher.clone()
    for key, entries in match_weights(patcher.model, adapter).items():
        clone.add_weight_wrapper(key, live.wrapper(entries))
    return clone
