"""Load FeRA Training Images in a real ComfyUI (COMFYUI_PATH): a folder of ComfyUI's input directory,
ComfyUI's own SD1.x text encoder (tiny, random weights), Train FeRA on its output, and a clear error
for each bad input."""
import re

import pytest
import torch

from comfy_host import pack_module, setup_comfy, tiny_clip

setup_comfy()
import folder_paths  # noqa: E402
import nodes as comfy_nodes  # noqa: E402  (ComfyUI's nodes.py: CLIP Text Encode)

from tiny_training import NODE_ARGS, tiny  # noqa: E402

dataset_nodes = pack_module("nodes.dataset_nodes")
train_nodes = pack_module("nodes.train_nodes")
Loader = dataset_nodes.LoadFeRATrainingImages
TrainingError = pack_module("fera_core.training.data").TrainingError
Image = pytest.importorskip("PIL.Image")

# name: (pixel size, colour, caption or None)
SET = {"b_wide.png": ((40, 20), (250, 10, 10), "a red thing"),
       "a_tall.jpg": ((20, 40), (10, 250, 10), None),
       "c_square.webp": ((24, 24), (10, 10, 250), "a blue thing")}


@pytest.fixture()
def input_dir(tmp_path):
    """ComfyUI's input directory moved to a temporary one for the test."""
    saved = folder_paths.get_input_directory()
    folder_paths.set_input_directory(str(tmp_path))
    yield tmp_path
    folder_paths.set_input_directory(saved)


@pytest.fixture(scope="module")
def clip():
    return tiny_clip()


def make_set(folder, images=SET):
    folder.mkdir(parents=True, exist_ok=True)
    for name, (size, color, caption) in images.items():
        Image.new("RGB", size, color).save(folder / name, quality=100)
        if caption is not None:
            (folder / name).with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
    return folder


def test_folder_gives_the_batch_one_conditioning_per_image_and_the_captions(input_dir, clip):
    make_set(input_dir / "sets" / "style")
    assert "sets/style" in Loader.GET_SCHEMA().inputs[0].options  # the combo offers input subfolders
    images, conditioning, captions = Loader.execute("sets/style", clip, 24, 16, "sks").args
    assert captions == ["sks", "a red thing", "a blue thing"]  # file name order; the default where no .txt
    assert images.shape == (3, 16, 24, 3) and images.dtype == torch.float32
    colors = torch.tensor([SET[n][1] for n in ("a_tall.jpg", "b_wide.png", "c_square.webp")]) / 255.0
    # solid images: every pixel keeps its colour (JPEG within 3 levels), in ComfyUI's [0, 1] IMAGE range
    torch.testing.assert_close(images, colors[:, None, None, :].expand_as(images), rtol=0, atol=3 / 255)
    assert len(conditioning) == 3
    for entry, caption in zip(conditioning, captions):
        (want,) = comfy_nodes.CLIPTextEncode().encode(clip, caption)[0]  # CLIP Text Encode's own output
        torch.testing.assert_close(entry[0], want[0], rtol=0, atol=0)
        torch.testing.assert_close(entry[1]["pooled_output"], want[1]["pooled_output"], rtol=0, atol=0)
    assert (conditioning[0][0] - conditioning[1][0]).abs().max() > 1e-2  # the captions differ, so do they


def test_train_fera_takes_its_conditioning_one_per_image(input_dir, clip, models_dir):  # noqa: F811
    """The tiny encoder is as wide as the tiny SD1.5 model's context: the node's output trains it."""
    make_set(input_dir / "style")
    _, conditioning, _ = Loader.execute("style", clip, 64, 64, "sks").args
    latents = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))  # VAE Encode of 64 x 64 images
    args = {k: [v] for k, v in (NODE_ARGS | {"steps": 2}).items()}
    with torch.inference_mode():
        out = train_nodes.TrainFeRA.execute([tiny("sd15")], [{"samples": latents}], [conditioning], **args)
    assert out.args[1].training_settings["images"] == 3
    with pytest.raises(ValueError, match="2 images but 3 conditionings"):
        with torch.inference_mode():
            train_nodes.TrainFeRA.execute([tiny("sd15")], [{"samples": latents[:2]}], [conditioning], **args)


def _plant(folder, name, data):
    folder.mkdir(parents=True, exist_ok=True)
    if data is None:
        Image.new("RGB", (16, 16)).save(folder / name)
    else:
        (folder / name).write_bytes(data)


# (files in the folder (None: a valid 16 x 16 image), call arguments, message)
BAD = {
    "empty folder": ({}, ("set", 64, 64, "sks"), "has no images (.png, .jpg, .jpeg, .webp, .bmp)"),
    "non-image files": ({"a.png": None, "clip.mp4": b"\0\0\0 ftyp", "notes.pdf": b"%PDF-1.4"},
                        ("set", 64, 64, "sks"), "are not images (.png, .jpg, .jpeg, .webp, .bmp) or .txt captions: "
                                                "clip.mp4, notes.pdf"),
    "unreadable image": ({"a.png": None, "b.png": b"\x89PNG\r\n\x1a\n garbage"}, ("set", 64, 64, "sks"),
                         "cannot read the image {dir}/b.png"),
    "width not a multiple of 8": ({"a.png": None}, ("set", 100, 64, "sks"),
                                  "width and height must be multiples of 8 (the VAE's scale), got 100 x 64"),
    "height not a multiple of 8": ({"a.png": None}, ("set", 64, 60, "sks"), "multiples of 8"),
    "missing captions, no default": ({"a.png": None, "b.png": None, "b.txt": b"x", "c.png": None},
                                     ("set", 64, 64, ""), "2 image(s) in {dir} have no .txt caption: a.png, c.png"),
    "a blank default is none": ({"a.png": None}, ("set", 64, 64, "  "), "have no .txt caption: a.png"),
    "folder outside the input directory": ({}, ("../elsewhere", 64, 64, "sks"),
                                           "folder must name a subfolder of ComfyUI's input directory, "
                                           "got '../elsewhere'"),
    "the input directory itself": ({}, (".", 64, 64, "sks"), "must name a subfolder"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_inputs_get_a_clear_error(input_dir, clip, case):
    files, (folder, width, height, default), message = BAD[case]
    (input_dir / "set").mkdir()
    for name, data in files.items():
        _plant(input_dir / "set", name, data)
    message = message.format(dir=input_dir / "set")
    with pytest.raises(TrainingError, match=re.escape(message)):
        Loader.execute(folder, clip, width, height, default)


def test_a_checkpoint_without_text_encoder_is_named(input_dir):
    make_set(input_dir / "set")
    with pytest.raises(TrainingError, match="clip is None: the checkpoint has no text encoder"):
        Loader.execute("set", None, 64, 64, "sks")

