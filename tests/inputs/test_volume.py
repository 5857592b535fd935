"""CT and MRI volumes as MedGemma 1.5's slices (inputs/volume.py), against an independent numpy
reading of the google-health/medgemma CT notebook: slice order, the 85-slice rule, the HU windows.

Series are real pydicom slices (CT_small, MR_small) copied to positions along the normal with shifted
values, written in shuffled file order with InstanceNumber running backwards (tests/conftest.py)."""

from __future__ import annotations

import io
import os
import re
import zipfile

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.pixels import apply_rescale

from medgem.errors import InputError
from medgem.inputs.volume import load_volume, series_folder


def notebook_indices(total: int, limit: int = 85) -> list[int]:
    """The notebook: dicom_instances[int(round(i / MAX_SLICE * (n - 1)))] for i in 1..MAX_SLICE."""
    if total <= limit:
        return list(range(total))
    return np.round(np.arange(1, limit + 1) / limit * (total - 1)).astype(int).tolist()


def notebook_window(hu: np.ndarray) -> np.ndarray:
    """The notebook's `window`: three clips, float32 (x - low) / (high - low) * 255, rounded to uint8."""
    planes = [(np.clip(hu, low, high).astype(np.float32) - np.float32(low)) / np.float32(high - low) * np.float32(255)
              for low, high in [(-1024, 1024), (-135, 215), (0, 80)]]
    return np.rint(np.stack(planes, axis=-1)).astype(np.uint8)


def hu_of(path) -> np.ndarray:
    ds = pydicom.dcmread(path)
    return apply_rescale(ds.pixel_array, ds)


def test_ct_series_gives_85_slices_in_patient_order_with_the_notebook_windows(series):
    paths = series(120)  # slice k at k * 2.5 mm, stored values + 10 k
    volume = load_volume(paths[0].parent, "ct")
    expected = notebook_indices(120)
    assert len(expected) == 85 and expected[0] == 1 and expected[-1] == 119
    assert volume.indices == expected and volume.total == 120 and volume.sorted_by == "ImagePositionPatient"
    assert volume.positions == sorted(volume.positions) and volume.warnings == []
    for image, k in zip(volume.images, expected, strict=True):
        assert image.mode == "RGB"
        assert np.array_equal(np.asarray(image), notebook_window(hu_of(paths[k])))
    low, high = hu_of(paths[1]).min(), hu_of(paths[119]).max()
    assert low < 0 < 80 < high and high > 1024  # the windows clip at both ends somewhere in the volume


def test_short_ct_keeps_every_slice_and_max_slices_shortens(series):
    paths = series(9)
    assert load_volume(paths[0].parent, "ct").indices == list(range(9))
    six = load_volume(paths[0].parent, "ct", max_slices=6)
    assert six.indices == notebook_indices(9, 6) == [1, 3, 4, 5, 7, 8]
    assert np.array_equal(np.asarray(six.images[0]), notebook_window(hu_of(paths[1])))


def test_mri_is_min_max_over_the_whole_volume_in_grey(series):
    paths = series(100, base="MR_small.dcm")
    volume = load_volume(paths[0].parent, "mri")
    values = {k: hu_of(p) for k, p in paths.items()}
    low = min(v.min() for v in values.values())
    high = max(v.max() for v in values.values())
    assert volume.indices == notebook_indices(100)
    for image, k in zip(volume.images, volume.indices, strict=True):
        grey = np.rint((np.clip(values[k], low, high).astype(np.float32) - np.float32(low))
                       / np.float32(high - low) * np.float32(255)).astype(np.uint8)
        pixels = np.asarray(image)
        assert np.array_equal(pixels[..., 0], grey) and np.array_equal(pixels[..., 1], grey)
        assert np.array_equal(pixels[..., 2], grey)
    assert np.asarray(volume.images[0]).max() < 255 and np.asarray(volume.images[-1]).max() == 255


def test_nifti_in_any_orientation_reads_as_the_same_axial_slices(tmp_path):
    data = np.random.default_rng(0).integers(-1000, 1500, (20, 16, 30)).astype(np.int16)  # x, y, z in RAS+
    data[0, 0, :] = 3000  # voxel (0, 0): the patient's left-most (RAS: x grows to the right), posterior-most
    ras = np.diag([0.8, 0.8, 2.0, 1.0])
    nib.save(nib.Nifti1Image(data, ras), tmp_path / "ras.nii.gz")
    flip = np.array([[-1, 0, 0, 19], [0, -1, 0, 15], [0, 0, 1, 0], [0, 0, 0, 1]])
    nib.save(nib.Nifti1Image(data[::-1, ::-1].copy(), ras @ flip), tmp_path / "lps.nii")  # same voxels, L-P-S
    a = load_volume(tmp_path / "ras.nii.gz", "ct", max_slices=10)
    b = load_volume(tmp_path / "lps.nii", "ct", max_slices=10)
    assert a.indices == b.indices == notebook_indices(30, 10) and a.sorted_by == "NIfTI affine"
    assert a.positions == pytest.approx(b.positions) and a.positions == sorted(a.positions)
    for x, y, k in zip(a.images, b.images, a.indices, strict=True):
        pixels = np.asarray(x)
        assert np.array_equal(pixels, np.asarray(y)) and pixels.shape == (16, 20, 3)
        assert np.array_equal(pixels, notebook_window(data[::-1, ::-1, k].T.astype(np.float64)))
        # as a viewer shows an axial slice: patient's left on the right, posterior at the bottom
        assert pixels[-1, -1].tolist() == [255, 255, 255]


def test_several_series_are_refused_with_their_list_or_picked(series, tmp_path):
    first, second = series(5), series(4, seed=1)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for i, p in enumerate([*first.values(), *second.values()]):
        os.link(p, mixed / f"f{i}")
    uids = [str(pydicom.dcmread(p).SeriesInstanceUID) for p in (first[0], second[0])]
    with pytest.raises(InputError, match="mixes 2 series") as info:
        load_volume(mixed, "ct")
    assert all(uid in str(info.value) for uid in uids) and "--series" in str(info.value)
    assert load_volume(mixed, "ct", series=uids[1]).total == 4
    with pytest.raises(InputError, match="no series 1.2.3 in the folder"):
        load_volume(mixed, "ct", series="1.2.3")


def test_warnings_for_non_axial_and_uneven_volumes(series):
    sagittal = series(6, orientation=(0, 1, 0, 0, 0, -1), step=3.0)
    assert any("not axial" in w for w in load_volume(sagittal[0].parent, "ct").warnings)
    gap = series(8)
    os.remove(gap[4])
    notes = load_volume(gap[0].parent, "ct").warnings
    assert any("uneven (2.50 to 5.00 mm" in w for w in notes)
    numbered = series(5, geometry=False)
    volume = load_volume(numbered[0].parent, "ct")
    assert volume.sorted_by == "InstanceNumber" and any("InstanceNumber" in w for w in volume.warnings)


def test_bad_volumes_are_one_line_errors(series, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    cases = [
        (empty, "ct", "holds no DICOM image files"),
        (series(3)[0].parent, "mri", "needs a MR volume (this one is CT); use the ct recipe"),
        (tmp_path / "missing.nii.gz", "ct", "no such file"),
        (tmp_path / "nowhere", "ct", "no such file"),
    ]
    (tmp_path / "bad.nii").write_bytes(b"\0" * 400)
    cases.append((tmp_path / "bad.nii", "ct", "not a readable NIfTI file"))
    os.mkfifo(tmp_path / "pipe.nii")
    cases.append((tmp_path / "pipe.nii", "ct", "not a regular file"))
    for path, recipe, message in cases:
        with pytest.raises(InputError, match=re.escape(message)) as info:
            load_volume(path, recipe)
        assert "\n" not in str(info.value)
    with pytest.raises(InputError, match="unknown volume recipe"):
        load_volume(empty, "xray")


def test_uploaded_series_as_a_zip_or_files(series):
    paths = series(7)
    blobs = [p.read_bytes() for p in paths.values()]
    packed = io.BytesIO()
    with zipfile.ZipFile(packed, "w") as zf:
        for i, blob in enumerate(blobs):
            zf.writestr(f"../../evil/{i}.dcm", blob)  # member names are never used as paths
    reference = load_volume(paths[0].parent, "ct")
    for kwargs in ({"archive": packed.getvalue()}, {"files": blobs}):
        with series_folder(**kwargs) as folder:
            got = load_volume(folder, "ct")
        assert got.indices == reference.indices
        assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(got.images, reference.images))
    with pytest.raises(InputError, match="not a readable zip"), series_folder(archive=b"PK\3\4 broken"):
        pass


def test_enhanced_multiframe_frames_sorted_by_their_own_positions(tmp_path):
    from pydicom.data import get_testdata_file
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    ds = pydicom.dcmread(get_testdata_file("emri_small.dcm"))  # real 10-frame MR, no per-frame geometry
    z = [4.0, 9.0, 0.0, 7.0, 1.0, 8.0, 3.0, 5.0, 2.0, 6.0]  # frame i lies at z[i] * 2 mm
    frames = []
    for depth in z:
        plane = Dataset()
        plane.ImagePositionPatient = [0.0, 0.0, depth * 2.0]
        item = Dataset()
        item.PlanePositionSequence = Sequence([plane])
        frames.append(item)
    orientation = Dataset()
    orientation.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    shared = Dataset()
    shared.PlaneOrientationSequence = Sequence([orientation])
    ds.PerFrameFunctionalGroupsSequence, ds.SharedFunctionalGroupsSequence = Sequence(frames), Sequence([shared])
    ds.save_as(tmp_path / "enhanced.dcm")
    volume = load_volume(tmp_path / "enhanced.dcm", "mri")
    order = np.argsort(z)
    stack = ds.pixel_array.astype(np.float64)[order]
    assert volume.total == 10 and volume.sorted_by == "ImagePositionPatient" and volume.warnings == []
    assert volume.positions == [2.0 * d for d in sorted(z)]
    for image, frame in zip(volume.images, stack, strict=True):
        grey = np.rint((frame.astype(np.float32) - np.float32(stack.min()))
                       / np.float32(stack.max() - stack.min()) * np.float32(255)).astype(np.uint8)
        assert np.array_equal(np.asarray(image)[..., 1], grey)
