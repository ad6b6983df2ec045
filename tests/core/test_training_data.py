"""Training folders (fera_core.training.data): which files are images, captions, the fitted pixels,
and a clear error for each bad input. Shared by the diffusers trainer and the ComfyUI loader node."""
import re

import numpy as np
import pytest

from fera_core.training.data import ImageCaptions, TrainingError, captions_of, fitted_image, image_files

Image = pytest.importorskip("PIL.Image")


def write(folder, name, size=(12, 8), color=(200, 30, 90)):
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(folder / name)
    return folder / name


def test_images_in_name_order_captions_and_hidden_files_and_subfolders_ignored(tmp_path):
    for name in ("b.PNG", "a.jpg", "c.webp"):
        write(tmp_path, name)
    (tmp_path / "a.txt").write_text("  a cat \n", encoding="utf-8")
    (tmp_path / ".DS_Store").write_bytes(b"\0")
    write(tmp_path / "10_more", "d.png")  # a subfolder is a folder of its own
    images = image_files(tmp_path)
    assert [p.name for p in images] == ["a.jpg", "b.PNG", "c.webp"]
    assert captions_of(images, default="sks") == ["a cat", "sks", "sks"]


@pytest.mark.parametrize("files, message", [
    ({}, "has no images"),
    ({"a.txt": b"a caption without its image"}, "has no images"),
    ({"ok.png": None, "notes.pdf": b"%PDF", "scan.tiff": b"II*\0"},
     "not images (.png, .jpg, .jpeg, .webp, .bmp) or .txt captions: notes.pdf, scan.tiff"),
])
def test_a_folder_without_usable_images_or_with_other_files_is_refused(tmp_path, files, message):
    for name, data in files.items():
        if data is None:
            write(tmp_path, name)
        else:
            (tmp_path / name).write_bytes(data)
    with pytest.raises(TrainingError, match=re.escape(message)):
        image_files(tmp_path)


def test_missing_folder_is_refused(tmp_path):
    with pytest.raises(TrainingError, match="does not exist"):
        image_files(tmp_path / "nope")


def test_missing_captions_are_an_error_naming_the_images_unless_a_default_is_given(tmp_path):
    for i in range(12):
        write(tmp_path, f"img{i:02}.png")
    (tmp_path / "img03.txt").write_text("x")
    images = image_files(tmp_path)
    with pytest.raises(TrainingError, match=r"11 image\(s\) in .* have no \.txt caption: img00\.png, img01\.png, "
                                            r"img02\.png, img04\.png, .* and 3 more"):
        captions_of(images)
    assert captions_of(images, default="")[3:5] == ["x", ""]  # "" is a caption: the caller decides


def test_unreadable_and_truncated_images_name_the_file(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    with pytest.raises(TrainingError, match="cannot read the image .*broken.png"):
        fitted_image(tmp_path / "broken.png", 8, 8)
    good = write(tmp_path, "cut.png", size=(64, 64))
    good.write_bytes(good.read_bytes()[:60])
    with pytest.raises(TrainingError, match="cannot read the image .*cut.png"):
        fitted_image(good, 8, 8)


def test_fitted_image_covers_then_centre_crops(tmp_path):
    """A 40 x 20 image with a red left quarter, a green middle half and a blue right quarter: fitted to
    16 x 16 it is scaled to 32 x 16 and cropped to the middle (green, red and blue trimmed off);
    fitted to 40 x 10 it is cut top and bottom and keeps all three."""
    px = np.zeros((20, 40, 3), np.uint8)
    px[:, :10, 0] = px[:, 10:30, 1] = px[:, 30:, 2] = 255
    path = tmp_path / "stripes.png"
    Image.fromarray(px).save(path)
    square = np.asarray(fitted_image(path, 16, 16))
    assert square.shape == (16, 16, 3)
    assert (square[:, 1:-1, 1] > 200).all() and (square[:, 1:-1, [0, 2]] < 60).all()
    wide = np.asarray(fitted_image(path, 40, 10))
    assert wide.shape == (10, 40, 3) and wide[:, 2, 0].min() > 200 and wide[:, -3, 2].min() > 200


def test_exif_orientation_is_applied(tmp_path):
    """A phone photo stored sideways (EXIF orientation 6: rotate 90 degrees) is trained upright."""
    px = np.zeros((10, 20, 3), np.uint8)
    px[:, :10] = 255  # white left half as stored
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "phone.jpg"
    Image.fromarray(px).save(path, exif=exif, quality=95)
    upright = np.asarray(fitted_image(path, 10, 20))  # stored 20 wide x 10 high, shown 10 x 20
    assert upright[:8, :, 0].mean() > 200 and upright[-8:, :, 0].mean() < 50  # white on top once turned


def test_diffusers_trainer_data_is_the_same_fitted_pixels(tmp_path):
    write(tmp_path, "a.png", size=(30, 20), color=(255, 0, 0))
    (tmp_path / "a.txt").write_text("red")
    data = ImageCaptions(tmp_path, 16)
    assert data.captions == ["red"] and data.pixels(0).shape == (3, 16, 16)
    want = np.asarray(fitted_image(tmp_path / "a.png", 16, 16), dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1
    np.testing.assert_array_equal(data.pixels(0).numpy(), want)
