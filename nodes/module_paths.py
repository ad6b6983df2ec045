"""Map FeRA's diffusers-style module paths onto the modules of a loaded ComfyUI model.

FeRA adapter files name their target layers the way diffusers does; ComfyUI keeps the original
(ldm/sgm, MMDiT, BFL Flux) layouts and fuses q/k/v into one Linear in SD3 and Flux. Rather than
keeping our own tables, we reuse the diffusers maps ComfyUI ships for its LoRA loader
(comfy.utils.unet_to_diffusers / mmdit_to_diffusers / flux_to_diffusers), so new releases that
fix or extend them are picked up for free.
"""

import comfy.model_base
import comfy.utils
import torch

from ..fera_core.families import Family, of_comfy_class

_PREFIX = "diffusion_model."


def model_family(model) -> Family:
    """The family of a loaded model (comfy.model_base.BaseModel), from the supported_models class
    ComfyUI's detection chose for it."""
    return of_comfy_class(type(model.model_config).__name__)


def _raw_map(model):
    """ComfyUI's diffusers map for this model, targets relative to `model` (prefixed)."""
    cfg = model.model_config.unet_config
    mb, utils = comfy.model_base, comfy.utils
    # getattr keeps this working on hosts where a class or map is missing or renamed.
    for cls, fn in (("Flux", "flux_to_diffusers"), ("SD3", "mmdit_to_diffusers")):
        klass, conv = getattr(mb, cls, None), getattr(utils, fn, None)
        if klass is not None and conv is not None and isinstance(model, klass):
            return conv(cfg, output_prefix=_PREFIX)
    # unet_to_diffusers returns {} for anything that is not an ldm UNet (no num_res_blocks).
    return {k: _PREFIX + v for k, v in utils.unet_to_diffusers(cfg).items()}


def diffusers_to_comfy(model) -> dict[str, tuple[str, tuple[int, int] | None]]:
    """model: a comfy.model_base.BaseModel (what ModelPatcher.model is).

    Returns {diffusers module path (no '.weight', no prefix) : (ComfyUI module path relative to
    `model`, e.g. 'diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q',
    (row_offset, row_count) of the output features of that Linear/Conv the diffusers module
    corresponds to, or None when it is the whole layer)}.

    Only '.weight' entries are used (a module is identified by its weight). Entries are dropped
    when the target module does not exist in this model (ComfyUI's maps are generated from the
    config and cover optional layers, e.g. SD3's last context block has no output projection),
    and when ComfyUI marks them as needing a weight transform (adaLN scale/shift swaps), since
    a low-rank delta cannot be applied to such a layer as a plain row slice.
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
    return out

