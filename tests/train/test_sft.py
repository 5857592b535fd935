"""The SFT loop: the real 270M learns, image+text SFT beats chance, a killed run resumes bit for bit,
and two DDP processes (gloo) follow the single-process loss curve."""

from __future__ import annotations

import copy
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import medgem
from medgem.ehr import qa, synth
from medgem.pipeline import Pipeline
from medgem.train.lora import LoraConfig
from medgem.train.sft import SFTConfig, Trainer, lr_lambda, train

from .conftest import COLOURS, colour_rows, run_cli, write_jsonl


def run_in_process(args: list[str]) -> None:
    """`medgem ARGS` here, on one thread like the subprocesses of run_cli, so the arithmetic is identical."""
    from medgem.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(args) == 0
    finally:
        torch.set_num_threads(threads)


def losses(out: Path) -> dict[int, float]:
    with (out / "log.csv").open() as f:
        return {int(r["step"]): float(r["loss"]) for r in csv.DictReader(f)}


def test_schedules():
    linear, cosine = lr_lambda(10, 2, "linear"), lr_lambda(10, 2, "cosine")
    assert [linear(s) for s in (0, 1, 2)] == [0.5, 1.0, 1.0]
    assert linear(6) == pytest.approx(0.5) and cosine(6) == pytest.approx(0.5)
    assert cosine(4) > linear(4) and linear(10) == 0.0


@pytest.mark.parametrize("settings, message", [
    ({"fsdp": True}, "FSDP needs GPUs"),
    ({"schedule": "step"}, "unknown schedule"),
    ({"grad_accum": 0}, "grad_accum must be at least 1"),
    ({"lr": 0}, "learning rate must be positive"),
])
def test_settings_are_checked(settings, message):
    from medgem.errors import ConfigError

    with pytest.raises(ConfigError, match=message):
        SFTConfig(**settings).validate()


def ehr_rows(patients: list[synth.SyntheticPatient]) -> list[dict]:
    """Short EHR-QA items: the facts a question needs as its context, the exact answer as the completion."""
    rows = []
    for p in patients:
        for item in p.qa:
            facts = "\n".join(e["fact"] for e in item["evidence"])
            rows.append({"prompt": qa.build_prompt(facts, item["question"], item["answer_type"]),
                         "completion": f" {item['answer']}\n"})
    return rows


@pytest.mark.slow
def test_real_270m_twenty_steps_loss_falls(real_pipe, tmp_path):
    """20 LoRA steps on the embedded Gemma 3 270M: training loss and held-out patients' loss both fall."""
    pipe = Pipeline(copy.deepcopy(real_pipe.model), real_pipe.tokenizer, real_pipe.config, "embedded copy")
    patients = synth.generate(6, seed=3)
    train_file = write_jsonl(tmp_path / "train.jsonl", ehr_rows(patients[:5]))
    eval_file = write_jsonl(tmp_path / "eval.jsonl", ehr_rows(patients[5:]))
    layers = pipe.config.num_hidden_layers
    cfg = SFTConfig(out=str(tmp_path / "run"), max_steps=20, batch_size=2, grad_accum=1, lr=1e-3, warmup_ratio=0.1,
                    lora=LoraConfig(layers=list(range(layers - 4, layers))))
    trainer = Trainer(cfg, train_file, eval_file, pipe=pipe, progress=False)
    before = trainer.evaluate()
    summary = trainer.run()
    curve = list(losses(tmp_path / "run").values())
    assert len(curve) == 20
    assert sum(curve[-5:]) / 5 < 0.8 * sum(curve[:5]) / 5
    assert summary["eval_loss"]["20"] < 0.8 * before
    assert (tmp_path / "run" / "loss.png").stat().st_size > 1000
    assert (tmp_path / "run" / "adapter" / "adapter.safetensors").is_file()


def test_image_text_sft_beats_chance(tiny_mm_dir, tmp_path):
    """A tiny random MedGemma learns the colour of a square in an image: held-out accuracy well above 1/3."""
    train_file = write_jsonl(tmp_path / "train.jsonl", colour_rows(tmp_path / "img", 48, seed=1))
    held_out = colour_rows(tmp_path / "held", 24, seed=2)
    pipe = medgem.load(tiny_mm_dir, dtype="float32", quant="none")

    def accuracy() -> float:
        prompts = [[{**row["messages"][0], "content": [
            {**row["messages"][0]["content"][0], "image": str(tmp_path / row["messages"][0]["content"][0]["image"])},
            row["messages"][0]["content"][1]]}] for row in held_out]
        answers = pipe.generate_batch(prompts, max_new_tokens=2, temperature=0.0)
        return sum(a.strip().startswith(r["messages"][1]["content"]) for a, r in zip(answers, held_out)) / len(held_out)

    assert accuracy() < 0.5
    cfg = SFTConfig(out=str(tmp_path / "run"), epochs=4, batch_size=4, grad_accum=1, lr=5e-3, warmup_ratio=0.05,
                    lora=LoraConfig(dropout=0.0))
    train(cfg, train_file, pipe=pipe, progress=False)
    assert accuracy() >= 0.7, f"chance is {1 / len(COLOURS):.2f}"


def test_killed_run_resumes_bit_for_bit(tiny_text_dir, arithmetic_jsonl, tmp_path):
    """SIGKILL a run once it has saved step 2; --resume continues, and every later loss equals the
    uninterrupted run's (dropout on, so the RNG state has to come back too)."""
    args = ["finetune", "sft", str(arithmetic_jsonl), "--model", str(tiny_text_dir), "--max-steps", "16",
            "--batch-size", "2", "--grad-accum", "2", "--lr", "5e-3", "--lora-dropout", "0.1", "--no-progress"]
    run_in_process([*args, "--out", str(tmp_path / "whole")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [sys.executable, "-c", "import sys; from medgem.cli import main; sys.exit(main())"]
    killed = subprocess.Popen([*command, *args, "--out", str(tmp_path / "cut"), "--save-every", "1"], cwd=tmp_path,
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (tmp_path / "cut" / "checkpoints" / "step-000002").exists():
        assert killed.poll() is None and time.time() < deadline, "the run ended before its step-2 checkpoint"
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    done = sorted(p.name for p in (tmp_path / "cut" / "checkpoints").glob("step-*"))
    assert done and not (tmp_path / "cut" / "adapter").exists()
    resumed = run_cli([*args, "--out", str(tmp_path / "cut"), "--save-every", "1", "--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert 2 <= summary["resumed_at"] < 16
    expected, got = losses(tmp_path / "whole"), losses(tmp_path / "cut")
    assert sorted(got) == list(range(1, 17))
    for step in range(1, 17):
        assert abs(got[step] - expected[step]) <= 1e-6, (step, got[step], expected[step])
    assert len(set(expected.values())) == 16  # the losses move, so equality means something


def test_resume_refuses_changed_settings_and_existing_checkpoints(tiny_text_dir, arithmetic_jsonl, tmp_path):
    from medgem.errors import CheckpointError

    def config(**changes) -> SFTConfig:
        return SFTConfig(**{"model": str(tiny_text_dir), "out": str(tmp_path / "run"), "max_steps": 2,
                            "batch_size": 1, "grad_accum": 1, "save_every": 1, **changes})

    Trainer(config(), arithmetic_jsonl, progress=False).run()
    with pytest.raises(CheckpointError, match="already holds checkpoints"):
        Trainer(config(), arithmetic_jsonl, progress=False).run()
    with pytest.raises(CheckpointError, match="lr was 0.0002, now 0.001"):
        Trainer(config(lr=1e-3), arithmetic_jsonl, progress=False).run(resume=True)


def test_ddp_two_processes_match_one(tiny_text_dir, arithmetic_jsonl, tmp_path):
    """torchrun, 2 processes on gloo, batch 1 each = 1 process accumulating 2: same losses and adapter."""
    common = ["finetune", "sft", str(arithmetic_jsonl), "--model", str(tiny_text_dir), "--max-steps", "4",
              "--batch-size", "1", "--lr", "5e-3", "--lora-dropout", "0", "--no-progress"]
    run_in_process([*common, "--grad-accum", "2", "--out", str(tmp_path / "one")])
    entry = tmp_path / "entry.py"
    entry.write_text("import sys\nfrom medgem.cli import main\nsys.exit(main())\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(entry), *common, "--grad-accum", "1", "--out", str(tmp_path / "two")],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(two) == [1, 2, 3, 4]
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-5, abs=1e-6)
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["processes"] == 2
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / d / "adapter" / "adapter.safetensors") for d in ("one", "two"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=1e-4)


def test_cli_reports_bad_lines_without_traceback(tiny_text_dir, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"prompt": "p", "completion": " c"}) + "\n{oops\n")
    result = run_cli(["finetune", "sft", str(data), "--model", str(tiny_text_dir), "--out", str(tmp_path / "o")],
                     tmp_path)
    assert result.returncode == 2
    assert "bad.jsonl line 2: not valid JSON" in result.stderr and "Traceback" not in result.stderr


def test_packed_training_runs_and_logs(tiny_text_dir, arithmetic_jsonl, tmp_path):
    cfg = SFTConfig(model=str(tiny_text_dir), out=str(tmp_path / "run"), max_steps=3, batch_size=1, grad_accum=1,
                    packing=True, max_len=64, quantize="none", eval_fraction=0.25)
    trainer = Trainer(cfg, arithmetic_jsonl, progress=False)
    assert len(trainer.train_examples) < 18 and all(len(r) <= 64 for r in trainer.train_examples)
    summary = trainer.run()
    assert summary["steps"] == 3 and summary["eval_examples"] == 6 and "3" in summary["eval_loss"]
    rows = (tmp_path / "run" / "log.csv").read_text().splitlines()
    assert rows[0].startswith("step,epoch,loss,lr") and len(rows) == 4
