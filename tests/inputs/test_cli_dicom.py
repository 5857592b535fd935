"""`medgem dicom info|preview` through the real entry point: de-identified output, PNGs checked by
their pixel statistics, one-line errors with exit code 2."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medgem.inputs.dicom import evenly_spaced, load_dicom

NOTICE_START = "[medgem is not a medical device"


def read_png(path: Path) -> np.ndarray:
    image = Image.open(path)
    assert image.format == "PNG" and image.mode == "RGB"
    return np.asarray(image).astype(np.float64)


@pytest.mark.parametrize(
    "name",
    ["RG1_UNCR.dcm", "CT_small.dcm", "MR_small.dcm", "US1_UNCR.dcm", "JPEG2000_UNC.dcm", "693_UNCR.dcm"],
)
def test_info_shows_no_identifiers(run_cli, testfile, identifiers, caplog, name):
    caplog.set_level(logging.DEBUG)
    code, out, err = run_cli("dicom", "info", testfile(name))
    assert code == 0 and err.startswith(NOTICE_START)
    code, as_json, _ = run_cli("dicom", "info", testfile(name), "--json")
    summary = json.loads(as_json)
    assert code == 0 and summary["patient_identity_removed"] == "YES"
    shown = out + as_json + err + caplog.text
    assert not [s for s in identifiers if s in shown]
    assert "modality" in out and summary["modality"] in out


def test_info_text_and_series_folder(run_cli, testfile, series):
    code, out, _ = run_cli("dicom", "info", testfile("RG1_UNCR.dcm"))
    lines = dict(line.split(None, 1) for line in out.strip().splitlines())
    assert lines["modality"] == "CR" and lines["photometric"] == "MONOCHROME1"
    assert lines["rows"] == "1955" and lines["columns"] == "1841" and lines["body_part"] == "CHEST"
    assert lines["series_description"] == "-"  # absent values print as '-'
    paths = series(6)
    code, out, _ = run_cli("dicom", "info", str(paths[0].parent), "--json")
    summary = json.loads(out)
    assert code == 0 and summary["slices"] == 6 and summary["sorted_by"] == "ImagePositionPatient"
    assert summary["window_presets"] == ["abdomen", "bone", "brain", "lung", "mediastinum"]


def test_preview_chest_radiograph_is_inverted(run_cli, testfile, tmp_path):
    out_png = tmp_path / "chest.png"
    code, out, _ = run_cli("dicom", "preview", testfile("RG1_J2KR.dcm"), "-o", str(out_png))
    assert code == 0 and "one image, 1841x1955" in out
    pixels = read_png(out_png)[..., 0]
    h, w = pixels.shape
    lungs = pixels[int(0.25 * h) : int(0.6 * h), int(0.2 * w) : int(0.35 * w)].mean()
    mediastinum = pixels[int(0.25 * h) : int(0.6 * h), int(0.45 * w) : int(0.55 * w)].mean()
    assert lungs + 40 < mediastinum and 150 < pixels.mean() < 230 and pixels.std() > 25
    assert np.array_equal(pixels, np.asarray(load_dicom(testfile("RG1_UNCR.dcm"))[0])[..., 0])


def test_preview_ct_windows_change_the_picture_as_expected(run_cli, testfile, tmp_path):
    stats = {}
    for window in ("lung", "mediastinum", "bone"):
        out_png = tmp_path / f"{window}.png"
        code, out, _ = run_cli(
            "dicom", "preview", testfile("693_UNCR.dcm"), "--window", window, "-o", str(out_png)
        )
        assert code == 0 and f"window {window}" in out
        pixels = read_png(out_png)[..., 0]
        brain = pixels[200:320, 200:320]  # soft tissue, ~40 HU
        stats[window] = brain.mean()
    # 40 HU sits high in the lung window, mid-grey in the mediastinal one, low in the bone window
    assert stats["lung"] > 200 and 90 < stats["mediastinum"] < 160 and stats["bone"] < 100


def test_preview_series_writes_a_contact_sheet_in_patient_order(run_cli, series, tmp_path):
    paths = series(20)
    out_png = tmp_path / "sheet.png"
    code, out, _ = run_cli(
        "dicom",
        "preview",
        str(paths[0].parent),
        "--slices",
        "5",
        "--window=-500/4000",
        "--size",
        "128",
        "-o",
        str(out_png),
    )
    assert code == 0 and "contact sheet of 5 images" in out
    sheet = read_png(out_png)[..., 0]
    assert sheet.shape == (2 * 128, 3 * 128)  # 3 columns x 2 rows of 128-pixel tiles
    tiles = [sheet[r * 128 : (r + 1) * 128, c * 128 : (c + 1) * 128] for r in range(2) for c in range(3)][:5]
    means = [t.mean() for t in tiles]
    assert means == sorted(means) and means[0] < means[-1]  # slice k is k*10 HU brighter
    assert sheet[128:, 256:].max() == 0  # the sixth cell is empty
    assert evenly_spaced(20, 5) == [2, 6, 10, 14, 18]


def test_preview_multiframe_frame_and_slices(run_cli, testfile, tmp_path):
    path = testfile("emri_small.dcm")
    code, _, _ = run_cli("dicom", "preview", path, "--frame", "3", "-o", str(tmp_path / "f3.png"))
    assert code == 0
    assert np.array_equal(read_png(tmp_path / "f3.png"), np.asarray(load_dicom(path, frame=3)[0]))
    code, out, _ = run_cli("dicom", "preview", path, "--slices", "10", "-o", str(tmp_path / "all.png"))
    assert code == 0 and "contact sheet of 10 images, 1024x768" in out
    color = testfile("color3d_jpeg_baseline.dcm")
    code, out, _ = run_cli("dicom", "preview", color, "--slices", "4", "-o", str(tmp_path / "us.png"))
    sheet = read_png(tmp_path / "us.png")
    assert code == 0 and np.abs(sheet[..., 0] - sheet[..., 2]).max() > 20  # colour survives


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["info", "{header_cut}"], "head.dcm: the DICOM file holds no image (modality CT), or is truncated"),
        (["info", "{text}"], "notes.dcm: not a DICOM file"),
        (["preview", "{trunc}", "-o", "{out}"], "cut.dcm: cannot decode"),
        (["preview", "{text}", "-o", "{out}"], "notes.dcm: not a PNG, JPEG or DICOM image"),
        (["preview", "{ct}", "--window", "lungs", "-o", "{out}"], "unknown window; "),
        (["preview", "{ct}", "--frame", "0", "--slices", "2", "-o", "{out}"], "not both"),
        (["preview", "{ct}", "-o", "{tmp}/x.jpg"], "x.jpg: the preview is written as PNG"),
        (["preview", "{ct}", "--frame", "4", "-o", "{out}"], "CT_small.dcm: frame 4 does not exist"),
    ],
)
def test_errors_are_one_line_exit_2(run_cli, testfile, tmp_path, identifiers, args, message):
    whole = Path(testfile("CT_small.dcm")).read_bytes()
    folder = tmp_path / "Doe_Jane_private"
    folder.mkdir()
    (folder / "cut.dcm").write_bytes(whole[: len(whole) - 5000])
    (folder / "head.dcm").write_bytes(whole[:1000])
    (folder / "notes.dcm").write_text("not an image\n" * 30)
    slots = {
        "trunc": folder / "cut.dcm",
        "header_cut": folder / "head.dcm",
        "text": folder / "notes.dcm",
        "ct": testfile("CT_small.dcm"),
        "out": tmp_path / "out.png",
        "tmp": tmp_path,
    }
    code, out, err = run_cli("dicom", *[a.format(**slots) for a in args])
    lines = [line for line in err.strip().splitlines() if not line.startswith(NOTICE_START)]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("medgem: error: ")
    assert message in lines[0] and "Traceback" not in err and "Doe_Jane" not in err
    assert not [s for s in identifiers if s in err + out]
    assert not (tmp_path / "out.png").exists()


def test_help_for_every_action(run_cli):
    for action in ([], ["info"], ["preview"]):
        with pytest.raises(SystemExit) as done:
            run_cli("dicom", *action, "--help")
        assert done.value.code == 0


@pytest.mark.parametrize("debug", [[], ["--debug"]])
def test_a_real_process_prints_no_header_values(patched_ct, identifiers, debug):
    """Python prints warnings to stderr outside pytest; pydicom's quote values. Run a real process."""
    odd = patched_ct(
        {"InstanceNumber": ("12345678", "1 Secret"), "SliceThickness": ("5.00000000", "5mm Secret")}
    )
    script = "import sys, medgem.cli as c; c.SUBCOMMANDS = ['dicom']; sys.exit(c.main(sys.argv[1:]))"
    done = subprocess.run(
        [sys.executable, "-c", script, *debug, "dicom", "info", str(odd)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "modality" in done.stdout
    shown = done.stdout + done.stderr
    assert "Secret" not in shown and not [s for s in identifiers if s in shown]
    assert ("withheld" in done.stderr) == bool(debug)  # --debug shows that pydicom warned, not what
