"""Contrastive trainer + sigmoid loss + zero-shot path together: a tiny dual encoder trained on captioned
textures must classify held-out images zero-shot (texture and colour) well above chance; resume is exact."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import medgem
from medgem.errors import InputError
from medgem.train.contrastive import ContrastiveConfig, batch_indices, read_pairs, train_contrastive


def test_zero_shot_beats_chance_after_training(tmp_path, trained_siglip, untrained_siglip, make_patterns, labels):
    held_out = make_patterns(tmp_path / "held_out", 90, seed=123)  # new periods, phases and shades
    images = [path for path, _, _ in held_out]

    def accuracy(model, kind: str) -> float:
        names = labels[kind]
        truth = np.array([names.index(pattern if kind == "pattern" else colour) for _, pattern, colour in held_out])
        probs = medgem.load_siglip(model).zero_shot(images, list(names), template="a {}")
        assert np.allclose(probs.sum(axis=1), 1, atol=1e-5)
        return float((probs.argmax(axis=1) == truth).mean())

    for kind, chance in (("pattern", 1 / 3), ("colour", 1 / 4)):
        before, after = accuracy(untrained_siglip, kind), accuracy(trained_siglip, kind)
        assert after >= 0.7, f"{kind}: zero-shot accuracy {after:.2f} after training (chance {chance:.2f}, before {before:.2f})"
    losses = [json.loads(line)["loss"] for line in (trained_siglip.parent / "log.jsonl").read_text().splitlines()]
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20])


def test_resume_after_interruption_gives_identical_weights(tmp_path, patterns_data, untrained_siglip):
    cfg = ContrastiveConfig(steps=6, batch_size=8, lr=1e-3, warmup_steps=2, save_every=3)
    straight = train_contrastive(untrained_siglip, patterns_data / "train.csv", tmp_path / "straight", cfg, progress=False)

    def interrupt(step: int, loss: float) -> None:
        if step == 4:
            raise KeyboardInterrupt

    out = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        train_contrastive(untrained_siglip, patterns_data / "train.csv", out, cfg, progress=False, on_step=interrupt)
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-3"] and not (out / "final").exists()
    resumed = train_contrastive(untrained_siglip, patterns_data / "train.csv", out, cfg, progress=False)
    a, b = medgem.load_siglip(straight).model.state_dict(), medgem.load_siglip(resumed).model.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a["logit_scale"], medgem.load_siglip(untrained_siglip).model.logit_scale.data)


def test_killed_cli_run_resumes_to_the_same_weights(tmp_path, patterns_data, untrained_siglip):
    """SIGKILL `medgem finetune siglip` once it has saved a checkpoint: only whole checkpoints are left and no
    final/, and --resume ends at the weights of a run never interrupted, each step logged exactly once."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from medgem.cli import main

    cfg = ContrastiveConfig(steps=12, batch_size=8, lr=1e-3, warmup_steps=2, save_every=3)
    straight = train_contrastive(untrained_siglip, patterns_data / "train.csv", tmp_path / "straight", cfg, progress=False)
    out = tmp_path / "cut"
    args = ["finetune", "siglip", str(patterns_data / "train.csv"), "--model", str(untrained_siglip), "--out", str(out),
            "--steps", "12", "--batch-size", "8", "--lr", "1e-3", "--warmup-steps", "2", "--save-every", "3",
            "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "medgem.cli", *args], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (out / "checkpoint-3" / "trainer.pt").is_file():
        assert process.poll() is None and time.monotonic() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (out / "final").exists()
    for checkpoint in out.glob("checkpoint-*"):
        if (checkpoint / "trainer.pt").is_file():
            medgem.load_siglip(checkpoint)  # whole, or still named .partial

    assert main([*args, "--resume"]) == 0
    a, b = medgem.load_siglip(straight).model.state_dict(), medgem.load_siglip(out / "final").model.state_dict()
    logged = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    expected = [json.loads(line)["loss"] for line in (straight.parent / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == list(range(1, 13))
    # Not bitwise: a child process rounds differently from this one from step 3 on (measured: loss within
    # 1.1e-5, weights within 2.6e-4 after 12 steps); in-process resume is bitwise (the test above).
    assert np.allclose([r["loss"] for r in logged], expected, atol=1e-4)
    for key in a:
        assert torch.allclose(a[key], b[key], atol=2e-3), key


def test_batches_cover_each_epoch_once():
    seen = [i for step in range(5) for i in batch_indices(50, 10, step, seed=3)]
    assert sorted(seen) == list(range(50))
    assert batch_indices(50, 10, 7, seed=3) == batch_indices(50, 10, 7, seed=3)


def test_read_pairs_csv_jsonl_and_errors(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"image": "x.png", "caption": "one"}\n\n{"path": "/abs/y.png", "text": "two"}\n')
    assert read_pairs(tmp_path / "a.jsonl") == [(str(tmp_path / "x.png"), "one"), ("/abs/y.png", "two")]
    (tmp_path / "b.csv").write_text("image,caption\nx.png,\n")
    with pytest.raises(InputError, match="row 1: needs a non-empty 'caption' or 'text'"):
        read_pairs(tmp_path / "b.csv")
    (tmp_path / "c.jsonl").write_text("{not json\n")
    with pytest.raises(InputError, match="line 1"):
        read_pairs(tmp_path / "c.jsonl")
    with pytest.raises(InputError, match="missing.csv: no such file"):
        read_pairs(tmp_path / "missing.csv")
