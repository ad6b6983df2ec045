"""Training data: folders of images with same-named .txt captions (read by the diffusers trainer and
by ComfyUI's Load FeRA Training Images node), and the trainer's seeded order of rows.

Every random draw of optimizer step s (which images, and in step.py's noise_draws the noise levels
and noise) is made for the whole global batch from (seed, s), so the loss curve is the same however
the batch is split over processes, and a resumed run continues exactly.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_SUFFIX = ".txt"


class TrainingError(ValueError):
    """A setting or input the trainer cannot use; the message says which and why."""


def _names(paths, shown: int = 8) -> str:
    names = [p.name for p in paths]
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def image_files(folder) -> list[Path]:
    """The images of a training folder, by name. Any other file (captions, hidden files and subfolders
    aside) is refused rather than skipped: a photo in a format not read here would silently be left out."""
    folder = Path(folder)
    if not folder.is_dir():
        raise TrainingError(f"image folder {folder} does not exist")
    files = sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    others = [p for p in files if p.suffix.lower() not in IMAGE_SUFFIXES + (CAPTION_SUFFIX,)]
    if others:
        raise TrainingError(f"{folder} holds files that are not images ({', '.join(IMAGE_SUFFIXES)}) or "
                            f"{CAPTION_SUFFIX} captions: {_names(others)}; convert them or move them out")
    images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
    if not images:
        raise TrainingError(f"{folder} has no images ({', '.join(IMAGE_SUFFIXES)})")
    return images


def captions_of(images: list[Path], default: str | None = None) -> list[str]:
    """Each image's same-named .txt caption; `default` for images without one (None: they are an error)."""
    missing = {p for p in images if not p.with_suffix(CAPTION_SUFFIX).is_file()}
    if missing and default is None:
        raise TrainingError(f"{len(missing)} image(s) in {images[0].parent} have no {CAPTION_SUFFIX} caption: "
                            f"{_names(sorted(missing))}")
    return [default if p in missing else p.with_suffix(CAPTION_SUFFIX).read_text(encoding="utf-8").strip()
            for p in images]


def fitted_image(path: Path, width: int, height: int):
    """The image at `path` as an RGB PIL image of width x height: turned upright (EXIF), scaled to cover
    the size, then centre-cropped. A file PIL cannot read is a TrainingError naming it."""
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise TrainingError(f"cannot read the image {path}: {err}") from None
    scale = max(width / im.width, height / im.height)
    im = im.resize((max(width, round(im.width * scale)), max(height, round(im.height * scale))), Image.BICUBIC)
    left, top = (im.width - width) // 2, (im.height - height) // 2
    return im.crop((left, top, left + width, top + height))


class ImageCaptions:
    """Images with same-named .txt captions, resized (shorter side) and centre-cropped, in [-1, 1]."""

    def __init__(self, folder, resolution: int):
        self.images = image_files(folder)
        self.captions = captions_of(self.images)
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.images)

    def pixels(self, index: int) -> torch.Tensor:
        import numpy as np

        im = fitted_image(self.images[index], self.resolution, self.resolution)
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
