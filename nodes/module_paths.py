"""Map an adapter's module paths onto the modules of a loaded ComfyUI model.

Adapter files name their layers in one of two namespaces (fera_core.adapter_file): diffusers'
module paths, or ComfyUI's own (`diffusion_model.<path>`, which ComfyUI's LoRA loader maps for
every family). For diffusers names we reuse the maps ComfyUI ships for its LoRA loader
(comfy.utils.unet_to_diffusers, mmdit_to_diffusers, flux_to_diffusers, z_image_to_diffusers, ...),
so new releases that fix or extend them are picked up for free. A map slices fused q/k/v layers;
slices that do not tile their layer exactly (Flux.2's single blocks, which the Flux map slices as
if they were Flux's; Lumina 2 with fewer k/v heads than q heads) are dropped rather than trusted.
"""

import comfy.model_base
import comfy.utils
import torch
from torch import nn

from ..fera_core.adapter_file import COMFY, DIFFUSERS
from ..fera_core.families import Family, of_comfy_class
from ..fera_core.model import ADAPTABLE

_PREFIX = "diffusion_model."
# (comfy.model_base class, comfy.utils map) of the families ComfyUI maps diffusers names for; a
# class is matched with isinstance, so subclasses (Flux.2, Chroma of Flux; Z-Image of Lumina2) too.
_DIFFUSERS_MAPS = (("Flux", "flux_to_diffusers"), ("SD3", "mmdit_to_diffusers"), ("Lumina2", "z_image_to_diffusers"),
                   ("AuraFlow", "auraflow_to_diffusers"), ("PixArt", "pixart_to_diffusers"),
                   ("Krea2", "krea2_to_diffusers"))


def model_family(model) -> Family:
    """The family of a loaded model (comfy.model_base.BaseModel), from the supported_models class
    ComfyUI's detection chose for it."""
    return of_comfy_class(type(model.model_config).__name__)


def _raw_map(model):
    """ComfyUI's diffusers map for this model, targets relative to `model` (prefixed)."""
    cfg = model.model_config.unet_config
    mb, utils = comfy.model_base, comfy.utils
    # getattr keeps this working on hosts where a class or map is missing or renamed.
    for cls, fn in _DIFFUSERS_MAPS:
        klass, conv = getattr(mb, cls, None), getattr(utils, fn, None)
        if klass is not None and conv is not None and isinstance(model, klass):
            return conv(cfg, output_prefix=_PREFIX)
    # unet_to_diffusers returns {} for anything that is not an ldm UNet (no num_res_blocks).
    return {k: _PREFIX + v for k, v in utils.unet_to_diffusers(cfg).items()}


def _tiled(model, path: str, slices: list[tuple[int, int]]) -> bool:
    """Whether row slices (offset, size) cover the outputs of the layer at `path` exactly once."""
    end = 0
    for offset, size in sorted(slices):
        if offset != end:
            return False
        end += size
    return end == model.get_submodule(path).weight.shape[0]


def diffusers_to_comfy(model) -> dict[str, tuple[str, tuple[int, int] | None]]:
    """model: a comfy.model_base.BaseModel (what ModelPatcher.model is).

    Returns {diffusers module path (no '.weight', no prefix) : (ComfyUI module path relative to
    `model`, e.g. 'diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q',
    (row_offset, row_count) of the output features of that Linear/Conv the diffusers module
    corresponds to, or None when it is the whole layer)}.

    Only '.weight' entries are used (a module is identified by its weight). Entries are dropped
    when the target module does not exist in this model (ComfyUI's maps are generated from the
    config and cover optional layers, e.g. SD3's last context block has no output projection),
    when ComfyUI marks them as needing a weight transform (adaLN scale/shift swaps), since
    a low-rank delta cannot be applied to such a layer as a plain row slice, and when the slices
    of a layer do not tile it exactly (the map does not describe this model's layer).
    """
    out = {}
    for dkey, target in sorted(_raw_map(model).items()):  # the same order whatever PYTHONHASHSEED
        if not dkey.endswith(".weight"):
            continue
        rows = None
        if isinstance(target, tuple):
            if len(target) != 2 or target[1] is None:
                continue  # (key, None, transform): permuted weight, not a slice
            target, (dim, offset, size) = target
            if dim != 0:
                continue
            rows = (offset, size)
        if not target.endswith(".weight"):
            continue
        path = target[: -len(".weight")]
        try:
            mod = model.get_submodule(path)
        except AttributeError:
            continue
        if not isinstance(getattr(mod, "weight", None), torch.Tensor):
            continue
        out[dkey[: -len(".weight")]] = (path, rows)
    slices: dict[str, list] = {}
    for path, rows in out.values():
        if rows is not None:
            slices.setdefault(path, []).append(rows)
    untiled = {path for path, rows in slices.items() if not _tiled(model, path, rows)}
    return {k: v for k, v in out.items() if v[0] not in untiled}


def native_names(model) -> dict[str, tuple[str, None]]:
    """The COMFY namespace as diffusers_to_comfy gives the diffusers one: {path below diffusion_model:
    (path relative to `model`, None)} of every layer experts can adapt."""
    return {path: (_PREFIX + path, None) for path, mod in model.diffusion_model.named_modules()
            if isinstance(mod, ADAPTABLE)}


def layer_names(model, namespace: str) -> dict[str, tuple[str, tuple[int, int] | None]]:
    """diffusers_to_comfy or native_names, for an adapter whose layers are named in `namespace`."""
    return native_names(model) if namespace == COMFY else diffusers_to_comfy(model)


def block_linears(model) -> dict[str, nn.Linear]:
    """{path below diffusion_model: layer} of the Linear layers inside the repeated blocks: the
    elements of the model's ModuleLists (transformer blocks, UNet stages, refiners), found by
    structure rather than by a table per family. Embedders and output heads lie outside them."""
    modules = dict(model.diffusion_model.named_modules())
    lists = {path for path, mod in modules.items() if isinstance(mod, nn.ModuleList)}

    def in_block(path: str) -> bool:
        parts = path.split(".")
        return any(parts[i].isdigit() and ".".join(parts[:i]) in lists for i in range(1, len(parts)))

    return {path: mod for path, mod in modules.items() if isinstance(mod, nn.Linear) and in_block(path)}


def name_layers(model, layers: dict[str, nn.Module]) -> tuple[str, dict[str, tuple[nn.Module, int | None]]]:
    """(key namespace, {adapter layer path: (layer, output slice size or None)}) for `layers`
    ({path below diffusion_model: layer}): diffusers names, slices of fused q/k/v included, when
    ComfyUI maps every one of them (files then interchange with diffusers and earlier files);
    otherwise ComfyUI's own names, one whole layer each."""
    by_layer: dict[str, list] = {}
    for dpath, (path, rows) in diffusers_to_comfy(model).items():
        by_layer.setdefault(path[len(_PREFIX):], []).append((dpath, rows))
    if not all(path in by_layer for path in layers):
        return COMFY, {path: (layer, None) for path, layer in layers.items()}
    # A layer ComfyUI maps under several names (Flux: ff.net.0.proj and LyCORIS' ff.linear_in; a fused
    # layer also as one whole alias) gets its slices if it has them, else the name ComfyUI lists first.
    order = {key[: -len(".weight")]: i for i, key in enumerate(_raw_map(model))}
    named = {}
    for path, layer in layers.items():
        sliced = [(dpath, rows) for dpath, rows in by_layer[path] if rows is not None]
        entries = sliced or [(min((dpath for dpath, _ in by_layer[path]), key=order.__getitem__), None)]
        named.update({dpath: (layer, rows[1] if rows else None) for dpath, rows in entries})
    return DIFFUSERS, named
