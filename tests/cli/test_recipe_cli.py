"""`medgem chat --recipe ...` and `medgem dicom preview --recipe ...`, run in-process through the real
entry point on a random multimodal checkpoint and real DICOM slices."""

from __future__ import annotations

import json

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

import medgem.cli
from medgem.cli.recipes import draw_boxes
from medgem.inputs.images import contact_sheet
from medgem.inputs.volume import load_volume
from medgem.processing.boxes import Box


@pytest.fixture
def cli(capsys):
    def run(*argv: str) -> tuple[int, str, str]:
        code = medgem.cli.main(list(argv))
        out = capsys.readouterr()
        return code, out.out, out.err

    return run


@pytest.fixture(scope="module")
def ct6(tmp_path_factory, series_writer):
    folder = tmp_path_factory.mktemp("ct6")
    series_writer(folder, 6)
    return folder


def one_error(code: int, err: str, needle: str) -> None:
    lines = [line for line in err.splitlines() if line.startswith("medgem: error:")]
    assert code == 2 and len(lines) == 1 and needle in lines[0] and "Traceback" not in err, err


def test_chat_ct_recipe_json(cli, tiny_medgemma, ct6):
    code, out, err = cli("chat", "--model", str(tiny_medgemma), "--dtype", "float32", "--recipe", "ct", "--image",
                         str(ct6), "--slices", "4", "--max-new-tokens", "3", "--json", "Any liver lesion?")
    assert code == 0, err
    report = json.loads(out)
    assert report["recipe"] == "ct" and report["reasoning"] == ""
    assert report["slices"]["total"] == 6 and report["slices"]["indices"] == [1, 2, 4, 5]  # round(2.5) == 2
    assert report["prompt_tokens"] > 4 * 4 and "not a medical device" in err.lower()


def test_chat_localize_writes_the_overlay_and_reports_no_boxes(cli, tiny_long, tmp_path):
    Image.new("RGB", (120, 80), (60, 60, 60)).save(tmp_path / "cxr.png")
    code, out, err = cli("chat", "--model", str(tiny_long), "--dtype", "float32", "--recipe", "localize",
                         "--image", str(tmp_path / "cxr.png"), "--boxes", str(tmp_path / "boxes.png"),
                         "--max-new-tokens", "3", "--json", "right clavicle")
    assert code == 0, err
    assert json.loads(out)["boxes"] == []  # a random model writes no JSON: an empty result, not an error
    assert Image.open(tmp_path / "boxes.png").size == (120, 80)


def test_chat_longitudinal_orders_by_date(cli, tiny_medgemma, tmp_path):
    for name, date in (("early", "20190101"), ("late", "20230101")):
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        ds.StudyDate = ds.AcquisitionDate = ds.ContentDate = date
        ds.save_as(tmp_path / name)
    code, _, err = cli("chat", "--model", str(tiny_medgemma), "--dtype", "float32", "--recipe", "longitudinal",
                       "--prior", str(tmp_path / "late"), "--current", str(tmp_path / "early"),
                       "--max-new-tokens", "2", "Compare.")
    assert code == 0, err
    assert "swapped" in err and "2019" not in err and "2023" not in err  # dates are never shown


def test_overlay_draws_the_boxes(tmp_path):
    image = Image.new("RGB", (200, 100))
    draw_boxes(image, [Box("heart", 20.0, 10.0, 120.0, 60.0)], tmp_path / "o.png")
    pixels = np.asarray(Image.open(tmp_path / "o.png"))
    assert pixels[30, 20].tolist() == [255, 0, 0] and pixels[35, 70].tolist() == [0, 0, 0]


def test_bad_recipe_flags_fail_before_the_model_loads(cli, ct6, tmp_path):
    missing = str(tmp_path / "no-such-model")  # never reached: each flag error comes first
    for argv, needle in [
        (["--recipe", "ct", "--image", str(ct6), "--image", str(ct6), "q"], "takes one --image"),
        (["--recipe", "ct", "--image", str(ct6), "--window", "lung", "q"], "--window does not combine"),
        (["--recipe", "localize", "--image", "x.png", "--boxes", "o.jpg", "lung"], "name the output *.png"),
        (["--recipe", "ct", "--image", str(ct6)], "needs a question"),
        (["--recipe", "longitudinal", "--prior", "a.dcm", "q"], "needs --prior FILE --current FILE"),
        (["--recipe", "localize", "--image", "x.png", "--series", "1.2", "q"], "go with --recipe ct or mri"),
    ]:
        one_error(*cli("chat", "--model", missing, *argv)[::2], needle)


def test_bad_inputs_are_one_line_errors_through_the_cli(cli, tiny_medgemma, series_writer, slide_writer, tmp_path):
    """Acceptance 7 on the command line: a folder with no images, mixed series, a slide with no tissue and a
    slide with a corrupt level each end in one error line (exit 2), never a traceback. (A box answer with
    no JSON is an empty result: test_chat_localize_writes_the_overlay_and_reports_no_boxes.)"""
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not an image")
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    for seed in (0, 1):  # two series, each with its own SeriesInstanceUID, in one folder
        (tmp_path / f"s{seed}").mkdir()
        for k, path in series_writer(tmp_path / f"s{seed}", 3, seed=seed).items():
            path.rename(mixed / f"s{seed}-{k}")
    slide_writer.tiff(tmp_path / "blank.tiff", tissue=False, side=1792)
    slide_writer.tiff(tmp_path / "corrupt.tiff", mpp=1.0, side=1792)
    slide_writer.corrupt(tmp_path / "corrupt.tiff", 0)  # the 10x level
    model = ["--model", str(tiny_medgemma), "--dtype", "float32", "--max-new-tokens", "2"]
    wsi = ["--recipe", "wsi", "--tissue", "colon", "--procedure", "biopsy"]
    for argv, needle in [
        (["--recipe", "ct", "--image", str(empty), "Findings?"], "holds no DICOM image files"),
        (["--recipe", "ct", "--image", str(mixed), "Findings?"], "mixes 2 series"),
        ([*wsi, "--image", str(tmp_path / "blank.tiff")], "no tissue found"),
        ([*wsi, "--image", str(tmp_path / "corrupt.tiff")], "truncated or corrupt"),
    ]:
        one_error(*cli("chat", *model, *argv)[::2], needle)


def test_dicom_preview_recipe_sheet(cli, ct6, tmp_path):
    code, out, err = cli("dicom", "preview", str(ct6), "--recipe", "ct", "-o", str(tmp_path / "sheet.png"))
    assert code == 0, err
    assert "6 of 6 slices" in out and "SLICE 1..6" in out
    sheet = np.asarray(Image.open(tmp_path / "sheet.png"))
    plain = np.asarray(contact_sheet(load_volume(ct6, "ct").images))
    assert sheet.shape == plain.shape == (512, 768, 3)
    unlabelled = (np.arange(512) % 256) >= 40  # below each tile's label
    assert np.array_equal(sheet[unlabelled], plain[unlabelled])  # the same slices and colours ...
    for y, x in ((0, 0), (256, 512)):  # ... with a label in each tile's corner
        assert not np.array_equal(sheet[y:y + 30, x:x + 100], plain[y:y + 30, x:x + 100])
    one_error(*cli("dicom", "preview", str(ct6), "--recipe", "mri", "-o", str(tmp_path / "s.png"))[::2],
              "use the ct recipe")
