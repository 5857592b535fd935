"""PNG/JPEG inputs (scikit-image's real retina and IHC images) and the format-sniffing entry points."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data

from medgem.errors import InputError
from medgem.inputs.dicom import load_dicom
from medgem.inputs.images import contact_sheet, load_image, load_images_from_path


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> dict[str, Path]:
    """Retina fundus as PNG, IHC colon section as JPEG, a non-square retina crop as JPEG with EXIF
    orientation 6 (a phone held sideways), and a 16-bit greyscale PNG."""
    folder = tmp_path_factory.mktemp("photos")
    paths = {
        "retina.png": folder / "retina.png",
        "ihc.jpg": folder / "ihc.jpg",
        "rotated.jpg": folder / "rotated.jpg",
        "grey16.png": folder / "grey16.png",
    }
    Image.fromarray(data.retina()).save(paths["retina.png"])
    Image.fromarray(data.immunohistochemistry()).save(paths["ihc.jpg"], quality=90)
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the stored picture must be turned 90 degrees clockwise
    Image.fromarray(data.retina()[:, :1000]).save(paths["rotated.jpg"], exif=exif.tobytes())
    grey16 = (np.linspace(0, 60000, 200 * 300).reshape(200, 300)).astype(np.uint16)
    Image.fromarray(grey16).save(paths["grey16.png"])
    return paths


def test_png_and_jpeg_load_as_rgb_from_path_bytes_and_pil(photos):
    retina = data.retina()
    from_path = load_image(photos["retina.png"])
    assert from_path.mode == "RGB" and from_path.size == (1411, 1411)
    assert np.array_equal(np.asarray(from_path), retina)  # PNG is lossless: the very pixels
    assert np.array_equal(np.asarray(load_image(photos["retina.png"].read_bytes())), retina)
    assert np.array_equal(np.asarray(load_image(Image.fromarray(retina).convert("RGBA"))), retina)
    ihc = load_image(str(photos["ihc.jpg"]))
    assert ihc.mode == "RGB" and ihc.size == (512, 512)
    assert np.abs(np.asarray(ihc).astype(int) - data.immunohistochemistry()).mean() < 3


def test_exif_orientation_is_applied(photos):
    stored = np.asarray(Image.open(photos["rotated.jpg"]).convert("RGB"))
    assert stored.shape == (1411, 1000, 3)
    upright = load_image(photos["rotated.jpg"])
    assert upright.size == (1411, 1000)  # width x height: turned
    assert np.array_equal(np.asarray(upright), np.rot90(stored, k=-1))


def test_16bit_png_is_stretched_not_clipped(photos):
    pixels = np.asarray(load_image(photos["grey16.png"]))[..., 0]
    assert pixels.min() == 0 and pixels.max() == 255
    assert (
        120 < pixels.mean() < 135
    )  # a linear ramp stays a ramp (clipping would give ~255 nearly everywhere)


def test_size_shrinks_for_previews_only(photos):
    assert load_image(photos["retina.png"], size=256).size == (256, 256)
    assert load_image(photos["ihc.jpg"], size=4096).size == (512, 512)


def test_format_is_sniffed_not_taken_from_the_name(photos, testfile, tmp_path):
    no_suffix = tmp_path / "IM000123"
    shutil.copy(testfile("CT_small.dcm"), no_suffix)
    expected = np.asarray(load_dicom(testfile("CT_small.dcm"))[0])
    assert np.array_equal(np.asarray(load_image(no_suffix)), expected)
    assert np.array_equal(np.asarray(load_image(no_suffix.read_bytes())), expected)
    misnamed = tmp_path / "photo.dcm"
    shutil.copy(photos["retina.png"], misnamed)
    assert load_image(misnamed).size == (1411, 1411)
    rg1 = load_image(testfile("RG1_J2KR.dcm"), window="14000/28000")
    assert rg1.size == (1841, 1955)


@pytest.mark.parametrize("name", ["retina.png", "ihc.jpg"])
def test_truncated_png_and_jpeg_are_clear_errors(photos, tmp_path, name):
    whole = photos[name].read_bytes()
    cut = tmp_path / f"cut_{name}"
    cut.write_bytes(whole[: len(whole) // 3])
    with pytest.raises(InputError, match=rf"^cut_{name}: the image file is truncated or corrupt"):
        load_image(cut)


def test_non_image_missing_empty_and_folder_inputs(tmp_path):
    text = tmp_path / "report.png"
    text.write_text("FINDINGS: no acute abnormality.\n" * 10)
    with pytest.raises(InputError, match=r"^report.png: not a PNG, JPEG or DICOM image$"):
        load_image(text)
    with pytest.raises(InputError, match=r"^the image data: not a PNG, JPEG or DICOM image$"):
        load_image(b"\x00\x01garbage" * 50)
    with pytest.raises(InputError, match=r"/gone.jpg: no such file$"):
        load_image(tmp_path / "gone.jpg")
    (tmp_path / "empty.png").write_bytes(b"")
    with pytest.raises(InputError, match="empty.png: the file is empty"):
        load_image(tmp_path / "empty.png")
    with pytest.raises(InputError, match="is a folder"):
        load_image(tmp_path)


def test_dicom_options_on_a_photo_are_refused(photos):
    with pytest.raises(InputError, match="DICOM images only"):
        load_image(photos["retina.png"], window="lung")


def test_load_images_from_path_handles_files_frames_and_series(photos, testfile, series):
    assert len(load_images_from_path(photos["ihc.jpg"])) == 1
    assert len(load_images_from_path(testfile("CT_small.dcm"))) == 1
    frames = load_images_from_path(testfile("emri_small.dcm"), n_slices=5)
    assert len(frames) == 5 and frames[0].size == (64, 64)
    paths = series(9)
    slices = load_images_from_path(paths[0].parent, n_slices=3, window="abdomen")
    assert len(slices) == 3 and all(im.size == (128, 128) for im in slices)


def test_contact_sheet_is_row_major_and_fits_each_tile():
    colours = [(i * 25, 255 - i * 25, 100) for i in range(10)]
    images = [Image.new("RGB", (40 + i, 20), c) for i, c in enumerate(colours)]
    sheet = contact_sheet(images, tile=64)
    assert sheet.size == (4 * 64, 3 * 64)  # ceil(sqrt(10)) = 4 columns, 3 rows
    pixels = np.asarray(sheet)
    for i, colour in enumerate(colours):
        row, col = divmod(i, 4)
        assert tuple(pixels[row * 64 + 32, col * 64 + 32]) == colour  # tile centre
    assert tuple(pixels[2 * 64 + 32, 3 * 64 + 32]) == (0, 0, 0)  # unused cell stays black
