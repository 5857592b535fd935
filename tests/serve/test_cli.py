"""`medgem serve` flags: help, settings from flags and MEDGEM_* variables, bad values refused before
any model loads."""

from __future__ import annotations

import pytest

from medgem.cli import build_parser, main
from medgem.cli.serve import settings_from_args


def test_help_lists_the_server_flags(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--api-key", "--host", "--port", "--max-queue", "--max-images", "--embedding-model", "--ray",
                 "--replicas", "--thinking", "--cors-origin"):
        assert flag in out


def test_settings_from_flags_and_environment(monkeypatch):
    monkeypatch.setenv("MEDGEM_API_KEYS", "alpha, beta,")
    args = build_parser().parse_args(["serve", "--port", "9001", "--max-images", "2", "--max-body-mb", "1.5",
                                      "--cors-origin", "https://viewer.example"])
    settings = settings_from_args(args)
    assert settings.api_keys == ("alpha", "beta") and settings.port == 9001 and settings.host == "127.0.0.1"
    assert settings.limits.max_images == 2 and settings.limits.max_body_bytes == int(1.5 * 2**20)
    assert settings.cors_origins == ("https://viewer.example",)
    flagged = settings_from_args(build_parser().parse_args(["serve", "--api-key", "gamma"]))
    assert flagged.api_keys == ("gamma",)  # flags win over the environment


@pytest.mark.parametrize("flags", [["--max-batch", "0"], ["--port", "70000"], ["--max-queue", "-1"],
                                   ["--max-tokens", "0"]])
def test_bad_values_exit_2_before_loading(capsys, flags):
    assert main(["serve", *flags]) == 2
    assert "medgem: error:" in capsys.readouterr().err
