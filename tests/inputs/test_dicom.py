"""DICOM rendering on real files: photometric handling, HU windows checked by hand, codecs, frames,
series ordering, and clear errors for broken files."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.pixels import apply_voi, get_decoder

from medgem.errors import InputError
from medgem.inputs import dicom
from medgem.inputs.dicom import (
    WINDOW_PRESETS,
    dicom_to_images,
    evenly_spaced,
    load_dicom,
    load_series,
    read_dicom,
    read_series,
)


def grey(image) -> np.ndarray:
    """The single grey channel of a rendered image (all three RGB channels must agree)."""
    pixels = np.asarray(image)
    assert image.mode == "RGB" and pixels.ndim == 3
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all()
    return pixels[..., 0].astype(np.float64)


def hand_window(raw: np.ndarray, slope: float, intercept: float, center: float, width: float) -> np.ndarray:
    """The DICOM LINEAR window written out independently: HU, then PS3.3 C.11.2.1.2.1, then 8 bits."""
    hu = raw.astype(np.float64) * slope + intercept
    low, high = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    y = np.where(hu <= low, 0.0, np.where(hu > high, 1.0, (hu - (center - 0.5)) / (width - 1) + 0.5))
    return np.rint(y * 255)


def region(pixels: np.ndarray, rows: tuple[float, float], cols: tuple[float, float]) -> float:
    h, w = pixels.shape
    return float(pixels[int(rows[0] * h) : int(rows[1] * h), int(cols[0] * w) : int(cols[1] * w)].mean())


# --- projection radiograph: MONOCHROME1, orientation ----------------------------------------------


def test_chest_cr_is_inverted_upright_and_native_size(testfile):
    path = testfile("RG1_UNCR.dcm")
    [image] = load_dicom(path)
    assert image.size == (1841, 1955)  # (columns, rows): native resolution, nothing resized
    pixels = grey(image)
    lungs = min(region(pixels, (0.25, 0.6), (0.2, 0.35)), region(pixels, (0.25, 0.6), (0.65, 0.8)))
    mediastinum = region(pixels, (0.25, 0.6), (0.45, 0.55))
    abdomen = region(pixels, (0.85, 0.95), (0.3, 0.7))
    assert lungs + 40 < mediastinum  # air-filled lungs dark, dense mediastinum bright
    assert lungs + 40 < abdomen  # the dense abdomen is at the bottom: right side up
    # MONOCHROME1: high stored values mean *low* attenuation, so the display runs against the data.
    raw = pydicom.dcmread(path).pixel_array.astype(np.float64)
    assert np.corrcoef(raw.ravel()[::101], pixels.ravel()[::101])[0, 1] < -0.99


def test_radiograph_stored_head_down_or_mirrored_is_shown_upright(testfile, tmp_path):
    path = testfile("RG1_UNCR.dcm")
    upright = np.asarray(load_dicom(path)[0])
    ds = pydicom.dcmread(path)
    ds.PixelData = np.ascontiguousarray(ds.pixel_array[::-1, ::-1]).tobytes()
    ds.PatientOrientation = ["R", "H"]  # rows toward the patient's right, columns toward the head
    ds.save_as(tmp_path / "rotated.dcm")
    assert np.array_equal(np.asarray(load_dicom(tmp_path / "rotated.dcm")[0]), upright)


# --- CT: Hounsfield units and windows -----------------------------------------------------------


@pytest.mark.parametrize("preset", ["lung", "mediastinum", "bone", "brain"])
def test_ct_window_presets_match_hand_computation(testfile, preset):
    ds = pydicom.dcmread(testfile("693_UNCR.dcm"))
    raw = ds.pixel_array
    pixels = grey(load_dicom(testfile("693_UNCR.dcm"), window=preset)[0])
    center, width = WINDOW_PRESETS[preset]
    expected = hand_window(raw, float(ds.RescaleSlope), float(ds.RescaleIntercept), center, width)
    assert np.array_equal(pixels, expected)
    # Known pixels worked out on paper: brain tissue (raw 1065 -> 41 HU) and the -2000 padding ring.
    assert raw[400, 300] == 1065 and raw[0, 0] == -2000
    # e.g. lung: ((41 - (-600 - 0.5)) / (1500 - 1) + 0.5) * 255 = 236.6
    by_hand = {"lung": 237, "mediastinum": 121, "bone": 77, "brain": 132}
    assert pixels[400, 300] == by_hand[preset]
    assert pixels[0, 0] == 0


def test_ct_default_uses_the_file_window_and_custom_windows_parse(testfile):
    path = testfile("693_UNCR.dcm")
    ds = pydicom.dcmread(path)
    default = grey(load_dicom(path)[0])
    assert np.array_equal(
        default, hand_window(ds.pixel_array, 1, -1024, float(ds.WindowCenter), float(ds.WindowWidth))
    )
    assert np.array_equal(
        grey(load_dicom(path, window="40/400")[0]), grey(load_dicom(path, window="abdomen")[0])
    )
    assert np.array_equal(
        grey(load_dicom(path, window=(-600, 1500))[0]), grey(load_dicom(path, window="LUNG")[0])
    )


def test_minmax_ignores_ct_padding(testfile):
    """The -2000 ring outside the scan must not take up the grey scale: air inside it is black too
    (with the ring in the range, air would sit at 2000/4492 of the scale, grey 113)."""
    path = testfile("693_UNCR.dcm")
    raw = pydicom.dcmread(path).pixel_array
    pixels = grey(load_dicom(path, window="minmax")[0])
    air = (raw > -2000) & (raw < 50)
    assert air.sum() > 10_000 and pixels[air].max() <= 6
    assert pixels[raw == -2000].max() == 0 and pixels.max() == 255


def test_enhanced_ct_reads_rescale_and_window_from_functional_groups(testfile):
    path = testfile("eCT_Supplemental.dcm")
    ds = pydicom.dcmread(path)
    images = load_dicom(path, n_frames=2)
    for frame, image in enumerate(images):
        raw = ds.pixel_array[frame]
        assert np.array_equal(grey(image), hand_window(raw, 1.0, -1024.0, 49.0, 102.0))


def test_voi_lut_sequence_is_applied(testfile, tmp_path):
    path = testfile("vlut_04.dcm")
    ds = pydicom.dcmread(path)
    bits = ds.VOILUTSequence[0].LUTDescriptor[2]
    expected = np.rint(apply_voi(ds.pixel_array, ds).astype(np.float64) / (2**bits - 1) * 255)
    assert np.array_equal(grey(load_dicom(path)[0]), expected)
    # The LUT really drives the output: a reversed table gives the negative picture.
    ds.VOILUTSequence[0].LUTData = list(reversed(ds.VOILUTSequence[0].LUTData))
    ds.save_as(tmp_path / "reversed_lut.dcm")
    assert np.array_equal(grey(load_dicom(tmp_path / "reversed_lut.dcm")[0]), 255 - expected)


def test_bad_windows_are_clear_errors(testfile):
    with pytest.raises(InputError, match="unknown window; .*lung, mediastinum"):
        load_dicom(testfile("693_UNCR.dcm"), window="lungs")
    with pytest.raises(InputError, match="width must be positive"):
        load_dicom(testfile("693_UNCR.dcm"), window="40/0")
    with pytest.raises(InputError, match="needs a CT image.*MR"):
        load_dicom(testfile("MR_small.dcm"), window="brain")
    with pytest.raises(InputError, match="greyscale images.*RGB"):
        load_dicom(testfile("US1_UNCR.dcm"), window="300/600")


# --- MR, codecs, colour, multi-frame, NM ----------------------------------------------------------


def test_mr_applies_rescale_then_file_window(testfile):
    path = testfile("MR2_UNCR.dcm")
    ds = pydicom.dcmread(path)
    pixels = grey(load_dicom(path)[0])
    expected = hand_window(
        ds.pixel_array,
        float(ds.RescaleSlope),
        float(ds.RescaleIntercept),
        float(ds.WindowCenter),
        float(ds.WindowWidth),
    )
    # float32 rounding in the pipeline may move a value that sits on a rounding edge by one level
    assert pixels.shape == (1024, 1024) and np.abs(pixels - expected).max() <= 1
    assert (pixels != expected).mean() < 1e-3
    small = grey(load_dicom(testfile("MR_small.dcm"))[0])
    assert small.shape == (64, 64) and small.std() > 30


@pytest.mark.parametrize(
    ("lossless", "uncompressed"),
    [
        ("RG1_J2KR.dcm", "RG1_UNCR.dcm"),  # chest CR, 16-bit MONOCHROME1
        ("MR2_J2KR.dcm", "MR2_UNCR.dcm"),
        ("693_J2KR.dcm", "693_UNCR.dcm"),
        ("US1_J2KR.dcm", "US1_UNCR.dcm"),  # YBR_RCT colour
        ("emri_small_RLE.dcm", "emri_small.dcm"),
    ],
)
def test_lossless_compression_decodes_to_the_same_pixels(testfile, lossless, uncompressed):
    a = read_dicom(testfile(lossless))
    b = read_dicom(testfile(uncompressed))
    assert a.file_meta.TransferSyntaxUID.is_compressed and not b.file_meta.TransferSyntaxUID.is_compressed
    assert np.array_equal(a.pixel_array, b.pixel_array)
    assert all(
        np.array_equal(np.asarray(x), np.asarray(y))
        for x, y in zip(dicom_to_images(a, n_frames=3), dicom_to_images(b, n_frames=3), strict=True)
    )


def test_multiframe_mr_frames_are_chosen_evenly_or_by_index(testfile):
    path = testfile("emri_small.dcm")
    raw = pydicom.dcmread(path).pixel_array
    assert raw.shape == (10, 64, 64)
    # a fixed window makes each frame's rendering independent of which other frames were chosen
    window = (float(raw.max() + raw.min()) / 2, float(raw.max() - raw.min()))
    every = load_dicom(path, n_frames=10, window=window)
    assert len(every) == 10 and all(im.size == (64, 64) for im in every)
    indices = evenly_spaced(10, 4)
    assert indices == [1, 3, 6, 8]
    for image, index in zip(load_dicom(path, n_frames=4, window=window), indices, strict=True):
        assert np.array_equal(np.asarray(image), np.asarray(every[index]))
        assert np.array_equal(grey(image), hand_window(raw[index], 1, 0, *window))
    assert np.array_equal(np.asarray(load_dicom(path, frame=6, window=window)[0]), np.asarray(every[6]))
    assert not np.array_equal(np.asarray(every[0]), np.asarray(every[9]))
    [middle] = load_dicom(path)
    assert middle.size == (64, 64)
    with pytest.raises(InputError, match="frame 10 does not exist.*has 10"):
        load_dicom(path, frame=10)
    with pytest.raises(InputError, match="not both"):
        load_dicom(path, frame=1, n_frames=2)


@pytest.mark.parametrize(
    "name",
    [
        "US1_UNCR.dcm",
        "OBXXXX1A_2frame.dcm",
        "color3d_jpeg_baseline.dcm",
        "gdcm-US-ALOKA-16.dcm",
        "SC_rgb_16bit_2frame.dcm",
    ],
)
def test_colour_ultrasound_and_palette_files_render_in_colour(testfile, name):
    ds = read_dicom(testfile(name))
    images = dicom_to_images(ds, n_frames=3)
    assert len(images) == min(3, int(ds.get("NumberOfFrames") or 1))
    for image in images:
        pixels = np.asarray(image).astype(np.int16)
        assert image.mode == "RGB" and image.size == (ds.Columns, ds.Rows)
        assert np.abs(pixels[..., 0] - pixels[..., 2]).max() > 20  # real colour, not grey
        assert 3 < pixels.mean() < 250


def test_palette_image_without_its_palette_is_an_input_error(testfile):
    """Found by benchmarks/fuzz.py (3 answers of 500 in 5,000): pydicom's ValueError for a missing LUT."""
    ds = read_dicom(testfile("CT_small.dcm"))
    ds.PhotometricInterpretation = "PALETTE COLOR"
    with pytest.raises(InputError, match="PALETTE COLOR image without a usable palette lookup table"):
        dicom_to_images(ds)


def test_16bit_rgb_is_scaled_not_clipped(testfile):
    eight = np.asarray(load_dicom(testfile("SC_rgb_2frame.dcm"), frame=0)[0]).astype(int)
    sixteen = np.asarray(load_dicom(testfile("SC_rgb_16bit_2frame.dcm"), frame=0)[0]).astype(int)
    assert np.abs(eight - sixteen).max() <= 1


@pytest.mark.parametrize("name", ["JPEG2000_UNC.dcm", "JPEG2000.dcm"])
def test_nuclear_medicine_whole_body_loads(testfile, name):
    [image] = load_dicom(testfile(name))
    pixels = grey(image)
    assert image.size == (256, 1024) and pixels.std() > 5


def test_codec_without_decoder_names_the_package(testfile):
    path = testfile("JPEG-LL.dcm")  # JPEG Lossless, process 14: not decodable by Pillow
    if get_decoder(pydicom.uid.JPEGLosslessSV1).is_available:
        assert load_dicom(path)[0].size == (256, 1024)
    else:
        with pytest.raises(
            InputError, match="JPEG-LL.dcm: decoding JPEG Lossless.*needs an extra package.*pylibjpeg"
        ):
            load_dicom(path)


def test_bare_dataset_without_preamble_loads(testfile):
    ds = pydicom.dcmread(testfile("CT_small.dcm"))
    ds.file_meta, ds.preamble = FileMetaDataset(), None
    buffer = io.BytesIO()
    pydicom.dcmwrite(buffer, ds, implicit_vr=True, little_endian=True, enforce_file_format=False)
    bare = buffer.getvalue()
    assert not dicom.is_dicom(bare)
    expected = np.asarray(load_dicom(testfile("CT_small.dcm"), window="brain")[0])
    assert np.array_equal(np.asarray(load_dicom(bare, window="brain")[0]), expected)


# --- broken files ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "keep"),
    [("CT_small.dcm", 0.5), ("emri_small.dcm", 0.99), ("RG1_J2KR.dcm", 0.5), ("CT_small.dcm", 0.0002)],
)
def test_truncated_dicom_is_a_clear_error(testfile, tmp_path, name, keep):
    data = Path(testfile(name)).read_bytes()
    cut = tmp_path / "private_folder_Doe" / f"cut_{name}"
    cut.parent.mkdir()
    cut.write_bytes(data[: max(int(len(data) * keep), 10)])
    with pytest.raises(InputError) as info:
        load_dicom(cut)
    message = str(info.value)
    assert message.startswith(f"cut_{name}:") and "private_folder_Doe" not in message
    assert any(word in message for word in ("truncated", "not a DICOM file"))


def test_known_broken_test_files(testfile):
    with pytest.raises(InputError, match="MR_truncated.dcm: cannot decode.*truncated"):
        load_dicom(testfile("MR_truncated.dcm"))
    with pytest.raises(InputError, match="truncated or empty"):
        load_dicom(testfile("emri_small_jpeg_2k_lossless_too_short.dcm"))


def test_non_dicom_and_missing_files(tmp_path):
    notes = tmp_path / "notes.dcm"
    notes.write_text("Patient said the pain started last week.\n" * 20)
    with pytest.raises(InputError, match=r"^notes.dcm: not a DICOM file$"):
        read_dicom(notes)
    with pytest.raises(InputError, match=r"/absent.dcm: no such file$"):
        read_dicom(tmp_path / "absent.dcm")


# --- series ---------------------------------------------------------------------------------------


def test_evenly_spaced_is_distinct_sorted_and_uncapped():
    for total in (1, 2, 7, 85, 86, 300):
        for n in (1, 2, 3, 8, 85, 100, 400):
            picked = evenly_spaced(total, n)
            assert picked == sorted(set(picked)) and len(picked) == min(n, total)
            assert picked[0] >= 0 and picked[-1] < total
    assert evenly_spaced(9, 1) == [4]
    with pytest.raises(InputError, match="at least 1"):
        evenly_spaced(5, 0)


def test_series_sorted_by_position_not_file_or_instance_number(series):
    paths = series(12)
    slices, method = read_series(paths[0].parent)
    assert method == "ImagePositionPatient"
    positions = [float(ds.ImagePositionPatient[2]) for ds in slices]
    assert positions == sorted(positions) and len(slices) == 12
    chosen = evenly_spaced(12, 5)
    images = load_series(paths[0].parent, n_slices=5, window="-500/4000")
    expected = [np.asarray(load_dicom(paths[k], window="-500/4000")[0]) for k in chosen]
    assert all(np.array_equal(np.asarray(a), b) for a, b in zip(images, expected, strict=True))
    means = [grey(im).mean() for im in images]
    assert means == sorted(means) and means[0] < means[-1]


def test_oblique_series_sorts_along_the_slice_normal(series):
    # sagittal slices: the normal is -x, so position along it *falls* as x grows
    paths = series(6, orientation=(0, 1, 0, 0, 0, -1), step=3.0)
    slices, _ = read_series(paths[0].parent)
    xs = [float(ds.ImagePositionPatient[0]) for ds in slices]
    assert xs == sorted(xs, reverse=True) and len(set(xs)) == 6
    normal = np.cross([0, 1, 0], [0, 0, -1])
    along = [float(np.dot(np.asarray(ds.ImagePositionPatient, float), normal)) for ds in slices]
    assert along == sorted(along)


def test_series_without_geometry_falls_back_to_instance_number(series):
    paths = series(7, geometry=False)
    slices, method = read_series(paths[0].parent)
    assert method == "InstanceNumber"
    assert [int(ds.InstanceNumber) for ds in slices] == list(range(1, 8))


def test_large_series_gives_more_than_85_slices(series):
    paths = series(120)
    images = load_series(paths[0].parent, n_slices=100, window="-500/4000")
    assert len(images) == 100
    means = [grey(im).mean() for im in images]
    assert all(a < b for a, b in zip(means, means[1:], strict=False))  # distinct, in patient order
    assert len(load_series(paths[0].parent, n_slices=500)) == 120  # asking for more gives every slice


def test_series_minmax_is_shared_across_slices(series):
    paths = series(4)
    images = load_series(paths[0].parent, n_slices=4)  # CT_small has no window: min/max fallback
    means = [grey(im).mean() for im in images]
    assert means == sorted(means) and means[-1] - means[0] > 3  # one range: brighter slices stay brighter


def test_series_folder_skips_other_files_and_refuses_mixtures(series, testfile, tmp_path):
    paths = series(3)
    folder = paths[0].parent
    (folder / "README.txt").write_text("exported by the PACS")
    (folder / ".DS_Store").write_bytes(b"\0" * 300)
    assert len(read_series(folder)[0]) == 3
    (folder / "other.dcm").write_bytes(Path(testfile("MR_small.dcm")).read_bytes())
    with pytest.raises(InputError, match="mixes 2 series"):
        read_series(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="empty: the folder holds no DICOM image files"):
        load_series(empty)
    with pytest.raises(InputError, match="no such folder"):
        load_series(tmp_path / "missing")
