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


FAMILIES = (
    Family("sd15", "SD1.5", ("SD15",), ("StableDiffusionPipeline",)),
    Family("sd2", "SD2", ("SD20", "SD21UnclipL", "SD21UnclipH"), ("StableDiffusionPipeline",)),
    Family("sdxl", "SDXL", ("SDXL", "SDXLRefiner"), ("StableDiffusionXLPipeline",)),
    Family("sd3", "SD3", ("SD3",), ("StableDiffusion3Pipeline",)),
    Family("flux", "Flux", ("Flux", "FluxSchnell")),
)
_BY_ID = {f.id: f for f in FAMILIES}
_BY_COMFY_CLASS = {c: f for f in FAMILIES for c in f.comfy_classes}


def of_comfy_class(class_name: str) -> Family:
    """The family of a ComfyUI supported_models class; one the table lacks is its own family,
    named after the class (so a new host model still gets a stable id and a readable name)."""
    return _BY_COMFY_CLASS.get(class_name) or Family(class_name.lower(), class_name, (class_name,))


def display_name(family_id: str) -> str:
    """'sd15' -> 'SD1.5'; an id the table lacks is shown as recorded."""
    family = _BY_ID.get(family_id)
    return family.name if family else family_id


def compatible(recorded: str, family: Family) -> bool:
    """Whether an adapter recorded for `recorded` may be used on `family` (unknown: not refused)."""
    return recorded in (UNKNOWN, "", family.id)
