"""Load FeRA Training Images: a kohya-style folder (images with same-named .txt captions) as the
batch, the per-image conditioning and the captions Train FeRA takes. The pack's own node, so the
training workflow opens on every supported ComfyUI (0.3.64 has no LoadImageDataSetFromFolder,
0.33 no LoadImageSetFromFolderNode). Node IDs are public: never rename."""
from __future__ import annotations

import os

import numpy as np
import torch
from comfy_api.latest import io

import folder_paths

from ..fera_core.training.data import IMAGE_SUFFIXES, TrainingError, captions_of, fitted_image, image_files
from .sockets import CATEGORY

SIZE_STEP = 8  # the VAE's scale in every supported family: a latent pixel per 8 x 8 image pixels


def input_folder(folder: str) -> str:
    """The subfolder `folder` of ComfyUI's input directory; a path leading outside it is refused."""
    root = os.path.realpath(folder_paths.get_input_directory())
    path = os.path.realpath(os.path.join(root, folder))
    if not folder or path == root or os.path.commonpath([root, path]) != root:
        raise TrainingError(f"folder must name a subfolder of ComfyUI's input directory, got {folder!r}")
    return path


def encode(clip, captions: list[str]) -> list:
    """One CONDITIONING entry per caption, encoded as CLIP Text Encode does (each distinct caption once)."""
    if clip is None:
        raise TrainingError("clip is None: the checkpoint has no text encoder; load one with a CLIP loader")
    encoded = {text: clip.encode_from_tokens_scheduled(clip.tokenize(text)) for text in dict.fromkeys(captions)}
    return [entry for text in captions for entry in encoded[text]]


class LoadFeRATrainingImages(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoadFeRATrainingImages",
            display_name="Load FeRA Training Images",
            category=CATEGORY,
            description="Loads a folder of training images with same-named .txt captions (as kohya-style trainers "
                        "read them): the images resized and centre-cropped to one size, and one conditioning per "
                        "image encoded from its caption, for VAE Encode and Train FeRA.",
            inputs=[
                io.Combo.Input("folder", options=folder_paths.get_input_subfolders(),
                               tooltip=f"A subfolder of ComfyUI's input folder holding the images "
                                       f"({', '.join(IMAGE_SUFFIXES)}) and their .txt captions."),
                io.Clip.Input("clip", tooltip="The text encoder that encodes the captions (the model's own CLIP)."),
                io.Int.Input("width", default=512, min=64, max=8192, step=SIZE_STEP,
                             tooltip="Training width in pixels (a multiple of 8): each image is scaled to cover "
                                     "width x height, then centre-cropped."),
                io.Int.Input("height", default=512, min=64, max=8192, step=SIZE_STEP,
                             tooltip="Training height in pixels (a multiple of 8)."),
                io.String.Input("default_caption", default="", optional=True,
                                tooltip="Caption of images that have no .txt file; empty: such images are an "
                                        "error that names them."),
            ],
            outputs=[
                io.Image.Output(display_name="images", tooltip="The images as one batch, in file name order."),
                io.Conditioning.Output(display_name="conditioning",
                                       tooltip="One conditioning per image, from its caption (Train FeRA's "
                                               "positive input)."),
                io.String.Output(display_name="captions", is_output_list=True,
                                 tooltip="The caption of each image, in the same order."),
            ],
        )

    @classmethod
    def execute(cls, folder: str, clip, width: int, height: int, default_caption: str = "") -> io.NodeOutput:
        if width % SIZE_STEP or height % SIZE_STEP:
            raise TrainingError(f"width and height must be multiples of {SIZE_STEP} (the VAE's scale), "
                                f"got {width} x {height}")
        images = image_files(input_folder(folder))
        captions = captions_of(images, default_caption.strip() or None)
        pixels = torch.from_numpy(np.stack([np.asarray(fitted_image(p, width, height), dtype=np.float32)
                                            for p in images])) / 255.0
        return io.NodeOutput(pixels, encode(clip, captions), captions)


NODES = [LoadFeRATrainingImages]
