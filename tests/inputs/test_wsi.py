"""Whole-slide patches (inputs/wsi.py) from synthetic slides: a pyramidal TIFF read through OpenSlide and
the same slide as DICOM WSI (wsidicomizer) read through wsidicom give the same patches; the level nearest
10x, tissue-only 896 px patches in spatial order, seeded sampling, bounded memory on a 40,960 px slide,
and the bad slides."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from medgem.errors import InputError
from medgem.inputs.wsi import PATCH, load_patches, nearest_level, tissue_mask


def same_patches(a, b) -> None:
    assert (a.level, a.mpp, a.tissue_patches, a.corners) == (b.level, b.mpp, b.tissue_patches, b.corners)
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a.images, b.images, strict=True))


def test_level_nearest_10x_tissue_patches_in_spatial_order(tmp_path, slide_writer):
    level0 = slide_writer.tiff(tmp_path / "slide.tiff")  # 20x at level 0: 10x is level 1 (1792 px, 2 x 2 patches)
    got = load_patches(tmp_path / "slide.tiff")
    assert got.level == 1 and got.mpp == pytest.approx(1.0)
    assert got.tissue_patches == 1 and got.corners == [(0, 0)]  # only the top-left patch is stained
    expected = Image.fromarray(level0[: 2 * PATCH, : 2 * PATCH]).resize((PATCH, PATCH), Image.Resampling.BOX)
    diff = np.abs(np.asarray(got.images[0], dtype=int) - np.asarray(expected, dtype=int))
    assert got.images[0].size == (PATCH, PATCH) and diff.mean() < 2  # the level's own pixels (box-filtered)
    assert np.abs(np.asarray(got.images[0]).mean(axis=(0, 1)) - [200, 110, 170]).max() < 3  # stain, not glass


@pytest.fixture(scope="module")
def ten_x(tmp_path_factory, slide_writer):
    """10x at level 0: 4 x 4 patches, the top-left 2 x 2 stained."""
    path = tmp_path_factory.mktemp("slide") / "big.tiff"
    slide_writer.tiff(path, mpp=1.0)
    return path


@pytest.fixture(scope="module")
def ten_x_dicom(ten_x, slide_writer, tmp_path_factory) -> list[Path]:
    """The same slide converted to DICOM WSI by wsidicomizer: one file per level."""
    return slide_writer.dicom(ten_x, tmp_path_factory.mktemp("dicom") / "slide")


def test_sampling_is_seeded_and_spatially_ordered(ten_x):
    everything = load_patches(ten_x)
    assert everything.level == 0 and everything.corners == [(0, 0), (PATCH, 0), (0, PATCH), (PATCH, PATCH)]
    some = load_patches(ten_x, max_patches=2, seed=3)
    assert len(some.corners) == 2 and some.corners == sorted(some.corners, key=lambda c: (c[1], c[0]))
    assert some.corners == load_patches(ten_x, max_patches=2, seed=3).corners


def test_dicom_wsi_gives_the_openslide_patches(ten_x, ten_x_dicom):
    folder = ten_x_dicom[0].parent
    same_patches(load_patches(ten_x), load_patches(folder))  # all 4 tissue patches, pixel for pixel
    same_patches(load_patches(ten_x, max_patches=2, seed=5), load_patches(folder, max_patches=2, seed=5))


def test_nearest_level_and_mask():
    assert nearest_level(0.25, [1, 4, 16]) == 1 and nearest_level(0.5, [1, 2, 8]) == 1
    assert nearest_level(2.0, [1, 2]) == 0
    glass = np.full((64, 64, 3), 240, dtype=np.uint8)
    assert not tissue_mask(glass).any()
    glass[:, :16] = [190, 90, 160]
    assert tissue_mask(glass)[:, :16].all() and not tissue_mask(glass)[:, 16:].any()


def test_bad_slides(tmp_path, slide_writer, ten_x_dicom):
    slide_writer.tiff(tmp_path / "blank.tiff", tissue=False, side=2 * PATCH)
    slide_writer.tiff(tmp_path / "no-mpp.tiff", mpp=None, side=2 * PATCH)
    slide_writer.tiff(tmp_path / "corrupt.tiff")
    slide_writer.corrupt(tmp_path / "corrupt.tiff", 1)  # the 10x level
    (tmp_path / "junk.svs").write_bytes(b"not a slide" * 100)
    (tmp_path / "empty").mkdir()
    (tmp_path / "not-wsi").mkdir()
    (tmp_path / "not-wsi" / "a.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 64)
    cut = tmp_path / "cut"
    cut.mkdir()
    for f in ten_x_dicom:
        data = f.read_bytes()
        (cut / f.name).write_bytes(data[: len(data) // 2] if f == max(ten_x_dicom, key=lambda p: p.stat().st_size)
                                   else data)
    for name, message in [("blank.tiff", "no tissue found"), ("no-mpp.tiff", "microns per pixel"),
                          ("corrupt.tiff", "truncated or corrupt"), ("junk.svs", "not a whole-slide image"),
                          ("missing.svs", "no such file"), ("empty", "holds no files"),
                          ("not-wsi", "no DICOM whole-slide image"), ("cut", "truncated or corrupt")]:
        with pytest.raises(InputError, match=message) as info:
            load_patches(tmp_path / name)
        assert "\n" not in str(info.value)


def test_wsi_recipe_layout(ten_x):
    from medgem.processing.recipes import WSI_PROMPT, build

    prompt = build("wsi", source=ten_x, tissue="colon", procedure="biopsy", max_slices=3)
    text, *patches = prompt.messages[0]["content"]
    assert text == {"type": "text", "text": WSI_PROMPT + "\ncolon, biopsy:"}  # the notebook's prompt, then patches
    assert [p["type"] for p in patches] == ["image"] * 3 == ["image"] * prompt.images
    assert prompt.slide.tissue_patches == 4
    with pytest.raises(InputError, match="needs a slide file .or a DICOM WSI folder., its tissue"):
        build("wsi", source=ten_x, tissue="colon")


# -- a 40,960 px slide: bounded memory ------------------------------------------------------------
BIG, TILE, BLOCK, LEVELS = 40960, 512, 2048, 6  # 20x at level 0, so 10x is level 1 (20,480 px, 1.26 GB as RGB)
_rng = np.random.default_rng(1)
TEXTURE = np.clip(np.array([200, 110, 170]) + np.kron(_rng.integers(-25, 25, (TILE // 16, TILE // 16, 3)),
                                                      np.ones((16, 16, 1), int)), 0, 255).astype(np.uint8)
GLASS = np.full((TILE, TILE, 3), 242, np.uint8)


def tissue_grid() -> np.ndarray:
    """Which 2048 px blocks of level 0 are tissue (two regions); the extra last row and column lie beyond
    the slide."""
    grid = np.zeros((BIG // BLOCK + 1, BIG // BLOCK + 1), bool)
    grid[2:4, 3:6] = grid[12:15, 10:12] = True
    return grid


def level_tiles(grid: np.ndarray, downsample: int, encode):
    """A level's tiles, row by row, each encoded once per distinct content (most are glass), so that
    writing 8,500 tiles takes well under a second."""
    n = -(-BIG // downsample // TILE)
    runs = [np.unique(np.minimum((k * TILE + np.arange(TILE)) * downsample // BLOCK, grid.shape[0] - 1),
                      return_counts=True) for k in range(n)]
    cache: dict[tuple[bytes, bytes, bytes], bytes] = {}
    for rows, row_counts in runs:
        for cols, col_counts in runs:
            blocks = grid[np.ix_(rows, cols)]
            key = (blocks.tobytes(), row_counts.tobytes(), col_counts.tobytes())
            if key not in cache:
                mask = np.repeat(np.repeat(blocks, row_counts, 0), col_counts, 1)
                cache[key] = encode(np.where(mask[..., None], TEXTURE, GLASS))
            yield cache[key]


def write_big_tiff(path: Path, grid: np.ndarray) -> None:
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        for i in range(LEVELS):
            size, mpp = BIG >> i, {"resolution": (2e4, 2e4), "resolutionunit": "CENTIMETER"} if i == 0 else {}
            tif.write(level_tiles(grid, 2**i, lambda a: zlib.compress(a.tobytes())), shape=(size, size, 3),
                      dtype=np.uint8, tile=(TILE, TILE), compression="zlib", photometric="rgb",
                      subfiletype=0 if i == 0 else 1, **mpp)


def write_big_dicom(folder: Path, grid: np.ndarray, template: list[Path]) -> None:
    """The same slide as DICOM WSI: wsidicomizer's level-0 dataset as the template for each level, with
    the level's size, pixel spacing and JPEG-LS lossless frames."""
    import imagecodecs
    import pydicom
    from pydicom.encaps import encapsulate
    from pydicom.uid import JPEGLSLossless, generate_uid

    folder.mkdir()
    original = next(ds for ds in map(pydicom.dcmread, template) if ds.ImageType[0] == "ORIGINAL")
    for i in range(LEVELS):
        ds = copy.deepcopy(original)
        frames = list(level_tiles(grid, 2**i, imagecodecs.jpegls_encode))
        shared = ds.SharedFunctionalGroupsSequence[0]
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = JPEGLSLossless
        ds.InstanceNumber = i + 1
        ds.ImageType = shared.WholeSlideMicroscopyImageFrameTypeSequence[0].FrameType = \
            ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"] if i == 0 else ["DERIVED", "PRIMARY", "VOLUME", "RESAMPLED"]
        ds.TotalPixelMatrixColumns = ds.TotalPixelMatrixRows = BIG >> i
        ds.Rows = ds.Columns = TILE
        ds.NumberOfFrames = len(frames)
        shared.PixelMeasuresSequence[0].PixelSpacing = [0.0005 * 2**i] * 2  # mm
        ds.ImagedVolumeWidth = ds.ImagedVolumeHeight = BIG * 0.0005
        ds.PixelData = encapsulate(frames, has_bot=True)
        ds["PixelData"].VR = "OB"
        ds.save_as(folder / f"level{i}.dcm", enforce_file_format=True)


PEAK = """
import hashlib, json, sys
import numpy as np
from medgem.inputs.wsi import load_patches
out = []
for path in sys.argv[1:]:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # peak RSS from here
    got = load_patches(path, max_patches=8)
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    out.append({"peak_mb": peak, "level": got.level, "mpp": got.mpp, "tissue": got.tissue_patches,
                "corners": got.corners, "sha": [hashlib.sha256(i.tobytes()).hexdigest() for i in got.images],
                "stained": [float((np.asarray(i)[..., 1] < 180).mean()) for i in got.images]})
print(json.dumps(out))
"""


def test_a_40960_px_slide_streams_in_bounded_memory(tmp_path, ten_x_dicom):
    grid = tissue_grid()
    write_big_tiff(tmp_path / "big.tiff", grid)
    write_big_dicom(tmp_path / "big-dicom", grid, ten_x_dicom)
    assert (tmp_path / "big.tiff").stat().st_size < 20 * 2**20  # mostly glass: small files
    run = subprocess.run([sys.executable, "-c", PEAK, str(tmp_path / "big.tiff"), str(tmp_path / "big-dicom")],
                         capture_output=True, text=True, timeout=120,
                         env={"PYTHONPATH": str(Path(__file__).parents[2] / "src"), "PATH": "/usr/bin:/bin"})
    assert run.returncode == 0, run.stderr
    tiff, dicom = json.loads(run.stdout)
    full_level_mb = (BIG // 2) ** 2 * 3 / 2**20  # the 10x level as RGB: 1,200 MiB
    for got in (tiff, dicom):
        assert got["level"] == 1 and got["mpp"] == pytest.approx(1.0) and len(got["corners"]) == 8
        assert min(got["stained"]) >= 0.2  # every patch is tissue, none is glass
        assert got["peak_mb"] < full_level_mb / 3, got["peak_mb"]  # streamed: never a whole level in memory
    assert (tiff["corners"], tiff["sha"], tiff["tissue"]) == (dicom["corners"], dicom["sha"], dicom["tissue"])
    print(f"peak RSS: OpenSlide {tiff['peak_mb']:.0f} MB, DICOM {dicom['peak_mb']:.0f} MB; the 10x level is "
          f"{full_level_mb:.0f} MB")
