"""A diffusers pipeline's frozen parts as the trainer uses them, and the one module accelerate wraps."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..families import FAMILIES
from ..model import FeRAModel
from .data import TrainingError

_KINDS = {"StableDiffusionPipeline": "sd", "StableDiffusionXLPipeline": "sdxl", "StableDiffusion3Pipeline": "sd3"}


class Pipeline:
    """A diffusers pipeline's frozen parts as the trainer uses them: latents from the VAE (posterior
    mean: deterministic, so every process and every resume sees the same x0), conditioning from the
    pipeline's own encode_prompt, and how its UNet or transformer is called."""

    def __init__(self, path, device, dtype):
        path = Path(path)
        index_file = path / "model_index.json"
        if not index_file.is_file():
            raise TrainingError(f"{path} is not a diffusers pipeline directory (no model_index.json)")
        index = json.loads(index_file.read_text())
        self.class_name = index.get("_class_name")
        self.kind = _KINDS.get(self.class_name)
        if self.kind is None:
            raise TrainingError(f"{path}: {index.get('_class_name')} is not supported; supported pipelines: "
                                f"{sorted(_KINDS)}")
        from diffusers import DiffusionPipeline
        # Absent parts (SD3 without T5) stay absent; an SD safety checker is not needed to train.
        skip = {k: None for k, v in index.items() if isinstance(v, list) and v[0] is None}
        if self.kind == "sd":
            skip.update(safety_checker=None, feature_extractor=None)
        self.pipe = DiffusionPipeline.from_pretrained(str(path), **skip)
        for module in self.pipe.components.values():
            if isinstance(module, nn.Module):
                module.requires_grad_(False).eval().to(device, dtype)
        self.model = self.pipe.transformer if self.kind == "sd3" else self.pipe.unet
        self.scheduler, self.device, self.dtype = self.pipe.scheduler, device, dtype
        vae = self.pipe.vae.config
        self.scaling, self.shift = vae.scaling_factor, vae.get("shift_factor") or 0.0

    @property
    def family(self) -> str:
        """The family id adapters record. The pipeline class names it, except that SD1.x and SD2.x share
        StableDiffusionPipeline: SD2's UNet projects into its transformers with Linear layers, SD1's with
        1x1 convolutions (a structural fact, true of a model of any width)."""
        candidates = [f.id for f in FAMILIES if self.class_name in f.diffusers_pipelines]
        if len(candidates) > 1:
            return "sd2" if self.model.config.use_linear_projection else "sd15"
        return candidates[0]

    def latent_shape(self, resolution: int) -> tuple[int, int, int]:
        factor = self.pipe.vae_scale_factor
        if resolution % factor:
            raise TrainingError(f"--resolution {resolution} is not a multiple of the VAE's factor {factor}")
        return self.pipe.vae.config.latent_channels, resolution // factor, resolution // factor

    @torch.no_grad()
    def latents(self, pixels: torch.Tensor) -> torch.Tensor:
        dist = self.pipe.vae.encode(pixels.to(self.device, self.dtype)).latent_dist
        return ((dist.mean - self.shift) * self.scaling).float()

    @torch.no_grad()
    def text(self, captions: list[str], resolution: int) -> dict:
        kw = dict(device=self.device, num_images_per_prompt=1, do_classifier_free_guidance=False)
        if self.kind == "sd":
            return {"encoder_hidden_states": self.pipe.encode_prompt(captions, **kw)[0]}
        if self.kind == "sd3":
            embeds, _, pooled, _ = self.pipe.encode_prompt(captions, None, None, **kw)
            return {"encoder_hidden_states": embeds, "pooled_projections": pooled}
        embeds, _, pooled, _ = self.pipe.encode_prompt(captions, **kw)
        # SDXL's size conditioning: original = target = the training size, no crop.
        time_ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], device=self.device)
        return {"encoder_hidden_states": embeds,
                "added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids.to(embeds.dtype).expand(len(captions), 6)}}

    def __call__(self, model: nn.Module, x_t: torch.Tensor, timestep, cond: dict) -> torch.Tensor:
        x_t = x_t.to(self.dtype)
        if self.kind == "sd3":
            return model(hidden_states=x_t, timestep=timestep, return_dict=False, **cond)[0]
        return model(x_t, timestep, return_dict=False, **cond)[0]


class Denoiser(nn.Module):
    """FeRAModel's (or SODAModel's) UNet or transformer as the one module accelerate wraps (DDP, autocast):
    forward routes by the latent and calls the model, or calls it with the experts off. Keeps FeRA's last
    routing (None for SODA, which routes nothing)."""

    def __init__(self, fera: FeRAModel, call):
        super().__init__()
        self.fera, self.call = fera, call
        self.routing: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, x_t, timestep, cond, experts: bool):
        out = self.fera.predict(x_t, timestep, cond, experts=experts, call=self.call)
        if experts and isinstance(self.fera, FeRAModel):
            self.routing = (self.fera.current_e_t.detach(), self.fera.current_weights.detach())
        return out
