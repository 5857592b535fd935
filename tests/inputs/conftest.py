"""Real medical files for the inputs tests: pydicom-data / pydicom test DICOMs, scikit-image photos,
and CT series folders built from a real CT slice (only position, numbering and a HU offset change)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file

import medgem.cli


@pytest.fixture(scope="session")
def identifiers() -> list[str]:
    """Identifying values written in the test files; none may reach a summary, log or message."""
    return [
        "CompressedSamples",
        "9RG1",
        "26210",
        "1CT1",
        "4MR1",
        "13US1",
        "CQ500-CT-310",  # names and IDs
        "JFK IMAGING CENTER",
        "Philips Medical Systems Hamburg",
        "BAPTIST MED CTR",  # institutions
        "Our Department",
        "THORAVISION",
        "exam Number",  # department, station, accession
        "20040826",
        "19950926",
        "19400305",  # dates
    ]


@pytest.fixture(scope="session")
def testfile() -> Callable[[str], str]:
    """Path of a file from pydicom's test data or pydicom-data, failing loudly if it is missing."""

    def path(name: str) -> str:
        found = get_testdata_file(name)
        assert found, f"{name} is not in pydicom's test data"
        return found

    return path


@pytest.fixture
def series(tmp_path: Path, series_writer) -> Callable[..., dict[int, Path]]:
    """Factory: series(count, **options) writes a series into a fresh folder (see tests/conftest.py
    write_series)."""
    made = 0

    def make(count: int, **options) -> dict[int, Path]:
        nonlocal made
        made += 1
        folder = tmp_path / f"series{made}"
        folder.mkdir()
        return series_writer(folder, count, **options)

    return make


@pytest.fixture
def patched_ct(tmp_path: Path) -> Callable[[dict[str, tuple[str, str]]], Path]:
    """Factory: CT_small.dcm with header values overwritten byte for byte, so that malformed values
    (which pydicom refuses to write) reach the reader. Argument: {keyword: (placeholder, raw value)}."""

    def make(edits: dict[str, tuple[str, str]]) -> Path:
        ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
        for keyword, (placeholder, _) in edits.items():
            setattr(ds, keyword, placeholder)
        path = tmp_path / "odd.dcm"
        ds.save_as(path)
        data = path.read_bytes()
        for placeholder, raw in edits.values():
            assert len(placeholder) == len(raw) and data.count(placeholder.encode()) == 1
            data = data.replace(placeholder.encode(), raw.encode())
        path.write_bytes(data)
        return path

    return make


@pytest.fixture
def run_cli(monkeypatch, capsys) -> Callable[..., tuple[int, str, str]]:
    """Run the real `medgem` entry point in-process: (exit code, stdout, stderr).

    Only the dicom group is registered, so this area's tests do not depend on other groups' modules.
    """
    monkeypatch.setattr(medgem.cli, "SUBCOMMANDS", ["dicom"])

    def run(*argv: str) -> tuple[int, str, str]:
        code = medgem.cli.main(list(argv))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run
