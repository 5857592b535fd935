"""Whole-slide patches (inputs/wsi.py) from a synthetic pyramidal TIFF read through OpenSlide: the level
nearest 10x, tissue-only 896 px patches in spatial order, seeded sampling, and the bad slides."""

from __future__ import annotations

import numpy as np
import pytest
import tifffile
from PIL import Image

from medgem.errors import InputError
from medgem.inputs.wsi import PATCH, load_patches, nearest_level, tissue_mask


def write_slide(path, tissue: bool = True, mpp: float | None = 0.5, side: int = 4 * PATCH) -> np.ndarray:
    """A 3-level tiled pyramid (downsamples 1, 2, 4), white glass with a pink-purple stained band over
    the left half of the top half when `tissue`; resolution tags give `mpp` microns per pixel."""
    rng = np.random.default_rng(0)
    level0 = np.full((side, side, 3), 242, dtype=np.uint8)
    if tissue:
        band = np.array([200, 110, 170]) + rng.integers(-25, 25, (side // 2, side // 2, 3))
        level0[: side // 2, : side // 2] = np.clip(band, 0, 255)
    resolution = {} if mpp is None else {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path, bigtiff=False) as tif:
        for step in (1, 2, 4):
            level = np.asarray(Image.fromarray(level0).resize((side // step, side // step), Image.Resampling.BOX))
            tif.write(level, tile=(256, 256), photometric="rgb", compression="zlib",
                      **({} if step > 1 or mpp is None else resolution),
                      subfiletype=0 if step == 1 else 1)
    return level0


def test_level_nearest_10x_tissue_patches_in_spatial_order(tmp_path):
    level0 = write_slide(tmp_path / "slide.tiff")  # 20x at level 0: 10x is level 1 (1792 px, 2 x 2 patches)
    got = load_patches(tmp_path / "slide.tiff")
    assert got.level == 1 and got.mpp == pytest.approx(1.0)
    assert got.tissue_patches == 1 and got.corners == [(0, 0)]  # only the top-left patch is stained
    expected = Image.fromarray(level0[: 2 * PATCH, : 2 * PATCH]).resize((PATCH, PATCH), Image.Resampling.BOX)
    diff = np.abs(np.asarray(got.images[0], dtype=int) - np.asarray(expected, dtype=int))
    assert got.images[0].size == (PATCH, PATCH) and diff.mean() < 2  # the level's own pixels (box-filtered)
    assert np.abs(np.asarray(got.images[0]).mean(axis=(0, 1)) - [200, 110, 170]).max() < 3  # stain, not glass


@pytest.fixture(scope="module")
def ten_x(tmp_path_factory):
    """10x at level 0: 4 x 4 patches, the top-left 2 x 2 stained."""
    path = tmp_path_factory.mktemp("slide") / "big.tiff"
    write_slide(path, mpp=1.0)
    return path


def test_sampling_is_seeded_and_spatially_ordered(ten_x):
    everything = load_patches(ten_x)
    assert everything.level == 0 and everything.corners == [(0, 0), (PATCH, 0), (0, PATCH), (PATCH, PATCH)]
    some = load_patches(ten_x, max_patches=2, seed=3)
    assert len(some.corners) == 2 and some.corners == sorted(some.corners, key=lambda c: (c[1], c[0]))
    assert some.corners == load_patches(ten_x, max_patches=2, seed=3).corners


def test_nearest_level_and_mask():
    assert nearest_level(0.25, [1, 4, 16]) == 1 and nearest_level(0.5, [1, 2, 8]) == 1
    assert nearest_level(2.0, [1, 2]) == 0
    glass = np.full((64, 64, 3), 240, dtype=np.uint8)
    assert not tissue_mask(glass).any()
    glass[:, :16] = [190, 90, 160]
    assert tissue_mask(glass)[:, :16].all() and not tissue_mask(glass)[:, 16:].any()


def test_bad_slides(tmp_path):
    write_slide(tmp_path / "blank.tiff", tissue=False, side=2 * PATCH)
    write_slide(tmp_path / "no-mpp.tiff", mpp=None, side=2 * PATCH)
    (tmp_path / "junk.svs").write_bytes(b"not a slide" * 100)
    for name, message in [("blank.tiff", "no tissue found"), ("no-mpp.tiff", "microns per pixel"),
                          ("junk.svs", "not a whole-slide image"), ("missing.svs", "no such file")]:
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
    with pytest.raises(InputError, match="needs a slide file, its tissue and its procedure"):
        build("wsi", source=ten_x, tissue="colon")
