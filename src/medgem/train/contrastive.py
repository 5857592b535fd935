"""Contrastive fine-tuning of a SigLIP dual encoder on (image, caption) pairs with the sigmoid loss.

Data: a CSV with `image` (or `path`) and `caption` (or `text`) columns, or JSONL with the same keys;
relative image paths are read from the data file's folder. Each step takes a batch of pairs, scores
every image against every caption, and pushes matched pairs up and all others down (nn/siglip.py's
`sigmoid_loss`). AdamW, linear warm-up then cosine decay, gradient clipping.

Checkpoints: `OUT/checkpoint-STEP/` holds a complete model folder (loadable by `medgem.load_siglip`
and by transformers) plus `trainer.pt` (optimizer state and step). Each is written under a temporary
name and renamed when complete, so a killed run leaves only whole checkpoints; a rerun resumes from the
newest. Batches are a pure function of (seed, step) and the model has no dropout, so a resumed run
ends with the same weights as one that was never interrupted. The last step is saved as `OUT/final/`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from medgem.errors import InputError
from medgem.inputs.text import jsonl_objects, read_csv, read_text
from medgem.nn.siglip import sigmoid_loss
from medgem.siglip import SiglipEncoder, load_siglip
from medgem.weights.siglip import save_siglip

logger = logging.getLogger(__name__)

IMAGE_KEYS, CAPTION_KEYS = ("image", "path"), ("caption", "text")


@dataclass
class ContrastiveConfig:
    steps: int = 1000
    batch_size: int = 32
    lr: float = 1e-5
    weight_decay: float = 1e-4
    warmup_steps: int = 50
    max_grad_norm: float = 1.0
    save_every: int = 200
    keep_checkpoints: int = 2
    seed: int = 0
    cache_images: int = 4096  # data sets up to this size are decoded once and kept as pixels in memory


def _pick(row: dict, keys: tuple[str, ...], where: str) -> str:
    for key in keys:
        if row.get(key) not in (None, ""):
            return str(row[key])
    raise InputError(f"{where}: needs a non-empty {' or '.join(repr(k) for k in keys)} field")


def read_pairs(path: str | os.PathLike[str]) -> list[tuple[str, str]]:
    """(image path, caption) pairs from a CSV or JSONL file; paths resolved against the file's folder."""
    path = Path(path)
    if path.suffix.lower() in (".jsonl", ".json"):
        rows = [row for _, row in jsonl_objects(read_text(path), lambda n: f"{path.name} line {n}")]
    else:
        rows = read_csv(path)
    pairs = []
    for number, row in enumerate(rows, 1):
        where = f"{path.name} row {number}"
        image = Path(_pick(row, IMAGE_KEYS, where))
        pairs.append((str(image if image.is_absolute() else path.parent / image), _pick(row, CAPTION_KEYS, where)))
    if len(pairs) < 2:
        raise InputError(f"{path.name}: contrastive training needs at least 2 pairs, found {len(pairs)}")
    return pairs


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The pairs of one step: consecutive slices of a per-epoch shuffle (a function of seed and step only)."""
    size = min(batch_size, n)
    per_epoch = n // size
    epoch, slot = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    return order[slot * size : (slot + 1) * size].tolist()


def lr_factor(step: int, cfg: ContrastiveConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def checkpoints(out: Path) -> list[Path]:
    """Complete OUT/checkpoint-STEP folders, oldest first (half-written ones still carry `.partial`)."""
    found = [p for p in out.glob("checkpoint-*") if p.name.split("-", 1)[1].isdigit() and (p / "trainer.pt").is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-", 1)[1]))


def _save(enc: SiglipEncoder, optimizer, step: int, cfg: ContrastiveConfig, source: Path, target: Path) -> None:
    """A complete model folder plus trainer state, renamed into place only when fully written."""
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    save_siglip(enc.model, partial, side_files_from=source)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "config": asdict(cfg)}, partial / "trainer.pt")
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)


def _trim_log(path: Path, step: int) -> None:
    """Keep the whole log lines of steps up to `step` (where training restarts): a killed run leaves lines
    past its last checkpoint, and maybe one cut short, which the resumed run would otherwise repeat."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
    partial = path.with_name(path.name + ".partial")
    partial.write_text("".join(kept))
    os.replace(partial, path)


def train_contrastive(
    model: str | os.PathLike[str],
    data: str | os.PathLike[str],
    out: str | os.PathLike[str],
    cfg: ContrastiveConfig | None = None,
    *,
    resume: bool = True,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
) -> Path:
    """Fine-tune the SigLIP model at `model` on the pairs in `data`; returns OUT/final.

    resume: continue from the newest OUT/checkpoint-* (its weights and optimizer) when there is one.
    on_step(step, loss) is called after every optimizer step (logging, early stop by raising).
    """
    cfg = cfg or ContrastiveConfig()
    out, source = Path(out), Path(model)
    pairs = read_pairs(data)
    out.mkdir(parents=True, exist_ok=True)
    found = checkpoints(out)[-1] if resume and checkpoints(out) else None
    enc = load_siglip(found or source)
    enc.model.float().train()
    optimizer = torch.optim.AdamW(enc.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    start = 0
    if found:
        state = torch.load(found / "trainer.pt", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
        logger.info("resuming contrastive training at step %d", start)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg), last_epoch=start - 1)
    _trim_log(out / "log.jsonl", start)
    cache: dict[str, torch.Tensor] = {}

    def pixels(paths: list[str]) -> torch.Tensor:
        if len(pairs) > cfg.cache_images:
            return enc.pixels(paths)
        for path in paths:
            if path not in cache:
                cache[path] = enc.pixels([path])[0]
        return torch.stack([cache[path] for path in paths])

    bar = tqdm(total=cfg.steps, initial=start, unit="step", desc="contrastive", disable=not progress)
    with (out / "log.jsonl").open("a") as log:
        for step in range(start, cfg.steps):
            batch = [pairs[i] for i in batch_indices(len(pairs), cfg.batch_size, step, cfg.seed)]
            ids = enc.tokenizer([caption for _, caption in batch])
            loss = sigmoid_loss(enc.model(pixels([image for image, _ in batch]), ids))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(enc.model.parameters(), cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            log.write(json.dumps({"step": step + 1, "loss": loss.item(), "lr": scheduler.get_last_lr()[0]}) + "\n")
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}")
            if (step + 1) % cfg.save_every == 0 and step + 1 < cfg.steps:
                log.flush()
                _save(enc, optimizer, step + 1, cfg, source, out / f"checkpoint-{step + 1}")
                for old in checkpoints(out)[: -cfg.keep_checkpoints]:  # renamed first: no half-deleted
                    doomed = old.with_name(old.name + ".partial")      # folder can pass for a checkpoint
                    shutil.rmtree(doomed, ignore_errors=True)
                    old.rename(doomed)
                    shutil.rmtree(doomed, ignore_errors=True)
            if on_step is not None:
                on_step(step + 1, loss.item())
    bar.close()
    final = out / "final"
    _save(enc, optimizer, cfg.steps, cfg, source, final)
    return final
