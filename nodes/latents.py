"""A LATENT as the router reads it: in the model's own latent space.

The router reads the latent the network receives (APPLY_MODEL's x), which is in the model's space:
the LATENT after its latent format's process_in (SD's scale, Flux's shift and scale, Wan's
per-channel mean and std) and, for models with 5-D latents (Wan, Qwen-Image, Cosmos Predict2),
with 4-D image latents given a frame axis as the sampler does (comfy.sample.fix_empty_latent_channels).
Band energies are shares of the energy, so a scale does not change them, but a shift or a
per-channel normalisation does: anything that shows or bakes the router's view of a latent reads it
through model_space.
"""
from __future__ import annotations

import comfy.sample
import comfy.utils
import torch


def video_stream(x: torch.Tensor, latent_shapes=None) -> torch.Tensor:
    """What the router reads of a model call's latent: models that pack several streams into one
    (B, 1, N) latent (LTX-2's video and audio; ComfyUI passes the parts' shapes as latent_shapes) are
    routed on the first, the video, unpacked with ComfyUI's own comfy.utils.unpack_latents."""
    if latent_shapes is not None and len(latent_shapes) > 1:
        return comfy.utils.unpack_latents(x, latent_shapes)[0]
    return x


def video_part(samples: torch.Tensor) -> torch.Tensor:
    """A LATENT's samples as the router reads them: of a nested (multi-part) latent, the first part, the
    video (LTX-2's video and audio; see video_stream)."""
    return samples.unbind()[0] if getattr(samples, "is_nested", False) else samples


def with_frames(patcher, samples: torch.Tensor) -> torch.Tensor:
    """The latent with the layout the model's sampler gives it (4-D image latents of a 5-D model unsqueezed)."""
    return comfy.sample.fix_empty_latent_channels(patcher, samples)


def model_space(patcher, samples: torch.Tensor) -> torch.Tensor:
    """A LATENT's samples as the network (and so the router) sees them at the clean end of the schedule."""
    return patcher.model.process_latent_in(with_frames(patcher, video_part(samples)).float())
