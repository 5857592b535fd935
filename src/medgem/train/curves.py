"""The training log: one CSV row per optimizer step, and a PNG of the loss curve drawn from it."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

FIELDS = ["step", "epoch", "loss", "lr", "grad_norm", "label_tokens", "seconds", "eval_loss"]


class CsvLog:
    """Appends rows to log.csv; on resume keeps only complete rows up to the checkpoint's step."""

    def __init__(self, path: str | Path, resume_step: int = 0):
        self.path = Path(path)
        kept = [r for r in read_rows(self.path) if int(r["step"]) <= resume_step] if resume_step else []
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, FIELDS)
            writer.writeheader()
            writer.writerows(kept)

    def add(self, row: dict[str, Any]) -> None:
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, FIELDS).writerow({k: row.get(k, "") for k in FIELDS})


def read_rows(path: str | Path) -> list[dict[str, str]]:
    """Rows of a log.csv; a row cut short by a kill is dropped."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return [r for r in csv.DictReader(f) if r.get("step") and r.get("eval_loss") is not None]


def plot(log_csv: str | Path, png: str | Path, title: str = "LoRA fine-tuning") -> None:
    """Training loss (and eval loss where measured) against step, with the learning rate below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_rows(log_csv)
    steps = [int(r["step"]) for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 5), sharex=True, height_ratios=[3, 1])
    loss = [float(r["loss"]) for r in rows]
    window = max(1, len(loss) // 30)  # long runs are noisy step to step: draw a running mean over them
    if window > 1:
        top.plot(steps, loss, color="tab:blue", alpha=0.3, lw=0.8)
        mean = [sum(loss[max(0, i - window + 1):i + 1]) / len(loss[max(0, i - window + 1):i + 1])
                for i in range(len(loss))]
        top.plot(steps, mean, color="tab:blue", lw=1.5, label=f"train loss (mean of {window} steps)")
    else:
        top.plot(steps, loss, color="tab:blue", lw=1, label="train loss")
    evals = [(int(r["step"]), float(r["eval_loss"])) for r in rows if r["eval_loss"]]
    if evals:
        top.plot(*zip(*evals), "o-", color="tab:orange", label="eval loss", ms=4)
    top.set_ylabel("cross-entropy per label token")
    top.set_title(title)
    top.legend()
    top.grid(alpha=0.3)
    bottom.plot(steps, [float(r["lr"]) for r in rows], color="gray", lw=1)
    bottom.set_ylabel("learning rate")
    bottom.set_xlabel("optimizer step")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
