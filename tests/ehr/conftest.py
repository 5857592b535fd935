"""Fixtures for the EHR tests: 50 synthetic patients written as real FHIR files, the embedded
model's real tokenizer as the token counter, and the real `medgem` entry point."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from medgem.ehr.synth import SyntheticPatient, generate
from medgem.inputs.fhir import Record, load_record

SEED = 11


@pytest.fixture(scope="session")
def patients() -> list[SyntheticPatient]:
    return generate(50, SEED)


@pytest.fixture(scope="session")
def bundle_files(patients, tmp_path_factory) -> list[Path]:
    """One Bundle JSON file per patient, as `medgem ehr synth` writes them."""
    folder = tmp_path_factory.mktemp("bundles")
    paths = []
    for p in patients:
        path = folder / f"{p.id}.json"
        path.write_text(json.dumps(p.bundle))
        paths.append(path)
    return paths


@pytest.fixture(scope="session")
def records(bundle_files) -> list[Record]:
    return [load_record(path) for path in bundle_files]


@pytest.fixture(scope="session")
def count_tokens() -> Callable[[str], int]:
    """Token counts from the embedded Gemma 3 tokenizer (the one `ehr ask` counts with)."""
    from medgem.processing.tokenizer import Tokenizer
    from medgem.weights import embedded_gguf, gguf_reader, medgem_home

    tokenizer = Tokenizer.from_gguf(gguf_reader.GGUFIndex.load(embedded_gguf()), medgem_home() / "tokenizers")
    return lambda text: len(tokenizer.encode(text, add_bos=False))


@pytest.fixture(scope="session")
def seed() -> int:
    return SEED


@pytest.fixture(scope="session")
def write_bulk() -> Callable[[list[SyntheticPatient], Path], Path]:
    """Writes a Bulk Data export: one NDJSON file per resource type (patients made with relative refs)."""

    def write(patients: list[SyntheticPatient], folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        files: dict[str, list[str]] = {}
        for p in patients:
            for entry in p.bundle["entry"]:
                resource = entry["resource"]
                files.setdefault(resource["resourceType"], []).append(json.dumps(resource))
        for kind, lines in files.items():
            (folder / f"{kind}.ndjson").write_text("\n".join(lines) + "\n")
        return folder

    return write


@pytest.fixture
def run_cli(capsys) -> Callable[..., tuple[int, str, str]]:
    """Run `medgem ARGS...` in-process through the real entry point: (exit code, stdout, stderr)."""
    from medgem.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        code = main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return run
