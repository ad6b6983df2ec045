"""The diffusers trainer's data: images with same-named .txt captions, and the seeded order of rows.

Every random draw of optimizer step s (which images, and in step.py's noise_draws the noise levels
and noise) is made for the whole global batch from (seed, s), so the loss curve is the same however
the batch is split over processes, and a resumed run continues exactly.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class TrainingError(ValueError):
    """A setting or input the trainer cannot use; the message says which and why."""


class ImageCaptions:
    """Images with same-named .txt captions, resized (shorter side) and centre-cropped, in [-1, 1]."""

    def __init__(self, folder, resolution: int):
        folder = Path(folder)
        if not folder.is_dir():
            raise TrainingError(f"image folder {folder} does not exist")
        self.images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not self.images:
            raise TrainingError(f"{folder} has no images ({', '.join(IMAGE_SUFFIXES)})")
        missing = [p.name for p in self.images if not p.with_suffix(".txt").is_file()]
        if missing:
            raise TrainingError(f"{len(missing)} images in {folder} have no .txt caption, e.g. {missing[:3]}")
        self.captions = [p.with_suffix(".txt").read_text(encoding="utf-8").strip() for p in self.images]
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.images)

    def pixels(self, index: int) -> torch.Tensor:
        import numpy as np
        from PIL import Image

        with Image.open(self.images[index]) as im:
            im = im.convert("RGB")
            r = self.resolution
            scale = r / min(im.size)
            im = im.resize((max(r, round(im.width * scale)), max(r, round(im.height * scale))), Image.BICUBIC)
            left, top = (im.width - r) // 2, (im.height - r) // 2
            im = im.crop((left, top, left + r, top + r))
            return torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1


def batch_indices(step: int, batch: int, n: int, seed: int) -> list[int]:
    """The global batch of optimizer step `step`: the next rows of a stream of seeded permutations
    (one per epoch), so any step's batch is known without replaying the ones before it."""
    out, start = [], step * batch
    epoch, pos = divmod(start, n)
    while len(out) < batch:
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(derived_seed(seed, epoch, -1))).tolist()
        out += perm[pos:pos + batch - len(out)]
        epoch, pos = epoch + 1, 0
    return out


def derived_seed(*parts: int) -> int:
    """A 32-bit seed from several integers: torch's CPU generator keeps only a seed's low 32 bits, so
    packing them (seed << 32 | step) would drop the run's seed."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:4], "little")


def step_generator(seed: int, step: int, device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derived_seed(seed, step))
