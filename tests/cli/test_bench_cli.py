"""`medgem bench` on the embedded model, as a user runs it, and the arithmetic it shares with
benchmarks/decode.py."""

from __future__ import annotations

import json

import pytest

from medgem.bench import bench_prompt, check_sizes, measure
from medgem.engine import blocks, vnni
from medgem.errors import InputError
from medgem.notice import NOTICE

from .test_generate_cli import assert_clean_error, medgem


def test_bench_reports_the_settings_and_speeds(tmp_path):
    out = tmp_path / "bench.json"
    proc = medgem("bench", "--prompt-tokens", "40", "--new-tokens", "12", "--runs", "2", "--threads", "2",
                  "--json", str(out))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["quant"] == "int8" and result["dtype"] == "bfloat16" and result["threads"] == 2
    assert result["prompt_tokens"] == 40 and result["new_tokens"] == 12 and not result["compiled"]
    assert len(result["decode_tok_s_runs"]) == 2 and result["decode_tok_s"] > 0 and result["prefill_tok_s"] > 0
    assert 0 < result["load_s"] < 60 and result["peak_rss_mb"] > 100
    if vnni.available():  # which kernel this CPU ran: int8 panels on AVX-512 VNNI, else the block kernel
        assert result["kernel"] == vnni.kernel_name()
    elif blocks.available():
        assert result["kernel"] == blocks.kernel_name()
    else:
        assert result["kernel"] == "PyTorch _weight_int8pack_mm / _weight_int4pack_mm"
    assert "decode_tok_s" in proc.stdout and NOTICE in proc.stderr


@pytest.mark.parametrize("flags,needle", [
    (["--new-tokens", "1"], "at least 2 new tokens"),
    (["--runs", "0"], "runs must be at least 1"),
    (["--prompt-tokens", "40000"], "exceed the model's context"),
])
def test_bench_refuses_sizes_it_cannot_measure(flags, needle):
    assert_clean_error(medgem("bench", *flags), needle)


def test_bench_prompt_has_exactly_the_asked_tokens():
    def words(text: str) -> list[int]:
        return [1] + [len(w) for w in text.split()]

    assert len(bench_prompt(words, 7)) == 7 and len(bench_prompt(words, 900)) == 900  # repeated past one copy


def test_measure_arithmetic_with_a_scripted_generation():
    """The harness alone (the real-model run is the test above): a warm-up, then medians over the runs."""
    samples = iter([(9.0, 9.0, 5), (0.5, 2.0, 9), (0.25, 1.0, 9), (1.0, 4.0, 9)])
    result = measure(lambda: next(samples), load_s=1.234, prompt_tokens=100, runs=3)
    assert result["prefill_tok_s"] == 200.0  # median of 200, 400 and 100
    assert result["decode_tok_s_runs"] == [4.0, 8.0, 2.0] and result["decode_tok_s"] == 4.0
    assert result["load_s"] == 1.23 and result["new_tokens"] == 9
    with pytest.raises(InputError, match="at least 2 new tokens"):
        check_sizes(10, 1, 1)
