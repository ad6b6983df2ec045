"""The model families the project knows, in one table: the id an adapter file records, the name
users know, and how a host recognises the family (ComfyUI's supported_models class names, a
diffusers pipeline class). Refusals name families the way users do."""
from __future__ import annotations

from dataclasses import dataclass

UNKNOWN = "unknown"


@dataclass(frozen=True)
class Family:
    id: str  # FeRAConfig.base_model in adapter files: a public contract, never renamed
    name: str  # as users know it
    comfy_classes: tuple[str, ...] = ()  # comfy.supported_models classes ComfyUI's detection picks
    diffusers_pipelines: tuple[str, ...] = ()


# A family groups the host classes whose adapted layers are the same (variants that only add inputs
# or layers, e.g. Wan 2.1 T2V and I2V): an adapter is refused between families, never between
# variants, and the per-layer shape check stays the real guard.
FAMILIES = (
    Family("sd15", "SD1.5", ("SD15",), ("StableDiffusionPipeline",)),
    Family("sd2", "SD2", ("SD20", "SD21UnclipL", "SD21UnclipH"), ("StableDiffusionPipeline",)),
    Family("sdxl", "SDXL", ("SDXL", "SDXLRefiner"), ("StableDiffusionXLPipeline",)),
    Family("sd3", "SD3", ("SD3",), ("StableDiffusion3Pipeline",)),
    Family("flux", "Flux", ("Flux", "FluxSchnell", "FluxInpaint")),
    Family("flux2", "Flux.2", ("Flux2",)),
    Family("chroma", "Chroma", ("Chroma",)),
    Family("zimage", "Z-Image", ("ZImage",)),
    Family("lumina2", "Lumina 2", ("Lumina2",)),
    Family("qwen_image", "Qwen-Image", ("QwenImage",)),
    Family("hidream", "HiDream", ("HiDream",)),
    Family("cosmos_predict2", "Cosmos Predict2", ("CosmosT2IPredict2", "CosmosI2VPredict2")),
    # Wan 2.2 A14B loads as these classes; the Fun, Camera, Vace, HuMo, S2V and Animate variants add layers
    Family("wan21", "Wan 2.1 / 2.2 A14B", ("WAN21_T2V", "WAN21_I2V", "WAN21_FunControl2V", "WAN21_Camera",
                                           "WAN22_Camera", "WAN21_Vace", "WAN21_HuMo", "WAN22_S2V", "WAN22_Animate",
                                           "WAN21_CausalAR_T2V")),
    Family("wan22_5b", "Wan 2.2 5B", ("WAN22_T2V",)),
    Family("hunyuan_video", "HunyuanVideo", ("HunyuanVideo", "HunyuanVideoI2V", "HunyuanVideoSkyreelsI2V")),
    Family("hunyuan_video15", "HunyuanVideo 1.5", ("HunyuanVideo15",)),
    Family("ltxv", "LTX-Video", ("LTXV",)),
    Family("ltx2", "LTX-2", ("LTXAV",)),
)
_BY_ID = {f.id: f for f in FAMILIES}
_BY_COMFY_CLASS = {c: f for f in FAMILIES for c in f.comfy_classes}


def of_comfy_class(class_name: str) -> Family:
    """The family of a ComfyUI supported_models class; one the table lacks is its own family,
    named after the class (so a new host model still gets a stable id and a readable name)."""
    return _BY_COMFY_CLASS.get(class_name) or Family(class_name.lower(), class_name, (class_name,))


def display_name(family_id: str) -> str:
    """'sd15' -> 'SD1.5'; none recorded -> 'unknown base'; an id the table lacks is shown as recorded."""
    if family_id in (UNKNOWN, ""):
        return "unknown base"
    family = _BY_ID.get(family_id)
    return family.name if family else family_id


def compatible(recorded: str, family: Family) -> bool:
    """Whether an adapter recorded for `recorded` may be used on `family` (unknown: not refused)."""
    return recorded in (UNKNOWN, "", family.id)
