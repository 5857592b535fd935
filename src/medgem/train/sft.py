"""LoRA supervised fine-tuning: the loop, its schedule, checkpoints and resume, on one or N processes.

The recipe follows the reference MedGemma notebook (AdamW, lr 2e-4, linear decay after 3 % warmup,
max grad norm 0.3, LoRA r=16 alpha=16 dropout 0.05 on all linears) with CPU-sized batches.

Determinism is designed in, so a resumed run repeats the uninterrupted one bit for bit on the CPU:
- the example order of epoch e is a permutation seeded by (seed, e), and optimizer step s always
  takes global examples [s*G, (s+1)*G) of that stream (G = batch x accumulation x processes);
- a checkpoint holds the adapter, optimizer, scheduler and every process's RNG state, and is written
  to a temporary folder that is renamed into place, so a kill never leaves a half checkpoint.

The loss is summed over label tokens and divided by the label tokens of the whole global batch
(known in advance on every process), so N processes with accumulation A compute the same gradient
as one process with accumulation N x A. Distributed runs start under torchrun (`WORLD_SIZE` set):
DDP, gloo on CPU or nccl on GPU; `fsdp=True` shards with FSDP instead, for models that do not fit
one GPU. FSDP needs CUDA (PyTorch's FSDP refuses CPU-only machines), has no mid-run checkpoints, and
has not been run here: no GPU machine was available when it was written.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from medgem.errors import CheckpointError, ConfigError, InputError
from medgem.train import curves
from medgem.train.data import (
    IGNORE,
    Batch,
    Encoder,
    Example,
    collate,
    encode_records,
    pack,
    read_records,
    split,
)
from medgem.train.lora import LoraConfig, apply_lora, load_lora_state_dict, read_adapter, save_adapter

log = logging.getLogger(__name__)

SCHEDULES = ("linear", "cosine", "constant")
# Settings a resumed run must share with the checkpoint, or it would not continue the same run.
RESUME_KEYS = ("model", "epochs", "max_steps", "batch_size", "grad_accum", "lr", "weight_decay", "warmup_ratio",
               "schedule", "max_grad_norm", "seed", "max_len", "packing", "dtype", "quantize", "lora")  # fmt: skip


@dataclass
class SFTConfig:
    model: str | None = None  # None: the embedded Gemma 3 270M
    mmproj: str | None = None
    out: str = "finetune-out"
    epochs: float = 1.0
    max_steps: int = 0  # 0: as many as `epochs` take
    max_minutes: float = 0.0  # stop after the step that crosses this much training time (0: no limit)
    # The same in CPU time of this process (all threads): the fair budget on a machine shared with other jobs.
    max_cpu_minutes: float = 0.0
    batch_size: int = 1  # per process and micro-step
    grad_accum: int = 4
    lr: float = 2e-4
    weight_decay: float = 0.0
    warmup_ratio: float = 0.03
    schedule: str = "linear"
    max_grad_norm: float = 0.3  # 0 turns clipping off
    seed: int = 0
    max_len: int = 2048
    packing: bool = False
    gradient_checkpointing: bool = False
    dtype: str = "float32"
    quantize: str = "none"  # "int8" / "int4": a frozen quantized base (QLoRA-style), applied when loading
    device: str = "cpu"
    save_every: int = 0  # 0: only the final adapter
    keep_checkpoints: int = 2
    eval_every: int = 0  # 0: only at the end (when there is eval data)
    eval_fraction: float = 0.0  # hold out this much of the training file when no eval file is given
    fsdp: bool = False
    lora: LoraConfig = field(default_factory=LoraConfig)

    def validate(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")
        for name in ("batch_size", "grad_accum", "max_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise ConfigError("give a positive number of epochs or max_steps")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"warmup_ratio must be in [0, 1), got {self.warmup_ratio}")
        if self.lr <= 0:
            raise ConfigError(f"learning rate must be positive, got {self.lr}")
        if self.fsdp and not self.device.startswith("cuda"):
            raise ConfigError("FSDP needs GPUs (--device cuda); on CPUs run torchrun without --fsdp (DDP)")
        if self.fsdp and self.save_every:
            raise ConfigError("mid-run checkpoints are not supported with FSDP yet; drop --save-every")


# -- processes -----------------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, value: float) -> float:
        if self.world == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t)

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()


def init_distributed(device: str) -> Dist:
    """Join the torchrun process group if there is one (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size())


# -- the loss --------------------------------------------------------------------------------------------


def language_model(model: nn.Module) -> nn.Module:
    """The Gemma3Text inside a text or multimodal model."""
    return getattr(model, "language_model", model)


class CausalLMLoss(nn.Module):
    """Summed next-token cross-entropy over labelled tokens. The 262k-wide LM head runs only where
    there is a label: for answer-only SFT that is a few tokens per sequence instead of all of them.
    Wrapping the model in this module lets DDP and FSDP see the whole computation as one forward."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor,
                pixel_values: torch.Tensor | None = None) -> torch.Tensor:
        images = {} if pixel_values is None else {"pixel_values": pixel_values}
        hidden = self.model(input_ids, positions=positions, return_hidden=True, **images)
        targets = labels[:, 1:]
        keep = targets != IGNORE
        logits = language_model(self.model).logits(hidden[:, :-1][keep])
        return F.cross_entropy(logits.float(), targets[keep], reduction="sum")


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in the backward pass instead of keeping its activations."""
    from torch.utils.checkpoint import checkpoint

    for layer in language_model(model).layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)


def lr_lambda(total: int, warmup: int, schedule: str):
    """Multiplier of the peak learning rate at optimizer step s (0-based)."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 1.0 - progress) if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


# -- the run -------------------------------------------------------------------------------------------


class Trainer:
    """One fine-tuning run; `run()` trains (resuming if asked) and writes the outputs under `cfg.out`."""

    def __init__(self, cfg: SFTConfig, train_data: str | Path, eval_data: str | Path | None = None,
                 pipe: Any = None, progress: bool = True):
        cfg.validate()
        self.cfg, self.progress = cfg, progress
        self.dist = init_distributed(cfg.device)
        self.device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cfg.device == "cuda" and
                                   self.dist.world > 1 else cfg.device)
        records = read_records(train_data)  # bad data fails before seconds of model loading
        eval_records = read_records(eval_data) if eval_data is not None else None
        if pipe is None:
            import medgem

            pipe = medgem.load(cfg.model, mmproj=cfg.mmproj, dtype=cfg.dtype, device=str(self.device),
                               quant=cfg.quantize)
        self.pipe = pipe
        self.model = pipe.model
        self.encoder = Encoder(pipe.tokenizer, pipe.processor)
        examples = encode_records(train_data, records, self.encoder, cfg.max_len)
        evals: list[Example] = []
        if eval_data is not None and eval_records is not None:
            evals = encode_records(eval_data, eval_records, self.encoder, cfg.max_len)
        elif cfg.eval_fraction:
            examples, evals = split(examples, cfg.eval_fraction, cfg.seed)
        self.train_examples = pack(examples, cfg.max_len) if cfg.packing else examples
        self.eval_examples = evals
        self.global_batch = cfg.batch_size * cfg.grad_accum * self.dist.world
        n = len(self.train_examples)
        self.total_steps = cfg.max_steps or math.ceil(cfg.epochs * n / self.global_batch)
        self.out = Path(cfg.out)
        self._setup_model()

    def _setup_model(self) -> None:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # LoRA A initialisation: the same on every process
        apply_lora(self.model, cfg.lora)
        if cfg.gradient_checkpointing:
            enable_gradient_checkpointing(self.model)
        self.model.train()
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        loss_module: nn.Module = CausalLMLoss(self.model)
        if self.dist.world > 1 and cfg.fsdp:
            from torch.distributed.fsdp import FullyShardedDataParallel

            loss_module = FullyShardedDataParallel(loss_module, use_orig_params=True,
                                                   device_id=self.device if self.device.type == "cuda" else None)
        elif self.dist.world > 1:
            multimodal = hasattr(self.model, "vision_tower")  # text-only batches leave vision adapters unused
            loss_module = nn.parallel.DistributedDataParallel(loss_module, find_unused_parameters=multimodal)
        self.loss_module = loss_module
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        warmup = math.ceil(cfg.warmup_ratio * self.total_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(self.total_steps, warmup, cfg.schedule))

    # -- data order ------------------------------------------------------------------------------------
    def _epoch_order(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch)
        return torch.randperm(len(self.train_examples), generator=g).tolist()

    def step_examples(self, step: int) -> list[Example]:
        """The global batch of optimizer step `step`: examples [step*G, (step+1)*G) of the epoch stream."""
        n, out, orders = len(self.train_examples), [], {}
        for flat in range(step * self.global_batch, (step + 1) * self.global_batch):
            epoch, pos = divmod(flat, n)
            if epoch not in orders:
                orders[epoch] = self._epoch_order(epoch)
            out.append(self.train_examples[orders[epoch][pos]])
        return out

    def _micro_batches(self, examples: list[Example]) -> list[list[Example]]:
        """This process's micro-batches: micro-step a takes slot (a * world + rank) of the global batch."""
        b, world, rank = self.cfg.batch_size, self.dist.world, self.dist.rank
        return [examples[(a * world + rank) * b:(a * world + rank + 1) * b] for a in range(self.cfg.grad_accum)]

    def _to_device(self, batch: Batch) -> dict[str, torch.Tensor | None]:
        pixels = batch.pixel_values
        if pixels is not None:
            pixels = pixels.to(self.device, dtype=next(self.model.parameters()).dtype)
        return dict(input_ids=batch.input_ids.to(self.device), labels=batch.labels.to(self.device),
                    positions=batch.positions.to(self.device), pixel_values=pixels)

    # -- one step --------------------------------------------------------------------------------------
    def train_step(self, step: int) -> dict[str, float]:
        examples = self.step_examples(step)
        n_labels = sum(ex.n_labels for ex in examples)
        if n_labels == 0:
            raise InputError("a training batch has no label tokens (no assistant turns or completions survive)")
        total = 0.0
        micro = self._micro_batches(examples)
        for a, chunk in enumerate(micro):
            batch = collate(chunk, self.pipe.tokenizer.pad_id, self.encoder)
            last = a == len(micro) - 1
            with contextlib.nullcontext() if last or self.dist.world == 1 else self.loss_module.no_sync():
                loss_sum = self.loss_module(**self._to_device(batch))
                # DDP averages gradients over processes; scale so the result is sum / n_labels.
                (loss_sum * (self.dist.world / n_labels)).backward()
            total += float(loss_sum.detach())
        max_norm = self.cfg.max_grad_norm if self.cfg.max_grad_norm > 0 else math.inf  # inf: measure, never clip
        clip = getattr(self.loss_module, "clip_grad_norm_", None)  # FSDP's norm spans every shard
        norm = clip(max_norm) if clip else torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss": self.dist.sum(total) / n_labels, "lr": lr, "grad_norm": float(norm), "label_tokens": n_labels}

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean cross-entropy per label token on the eval examples (shared out over processes)."""
        self.model.eval()
        mine = self.eval_examples[self.dist.rank::self.dist.world]
        total, count = 0.0, 0
        for i in range(0, len(mine), self.cfg.batch_size):
            batch = collate(mine[i:i + self.cfg.batch_size], self.pipe.tokenizer.pad_id, self.encoder)
            total += float(self.loss_module(**self._to_device(batch)))
            count += batch.n_labels
        self.model.train()
        return self.dist.sum(total) / max(self.dist.sum(count), 1.0)

    # -- checkpoints -----------------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.out / "checkpoints"

    def data_fingerprint(self) -> str:
        h = hashlib.sha256()
        for ex in self.train_examples:
            h.update(json.dumps([ex.input_ids, ex.labels]).encode())
        return h.hexdigest()[:16]

    def _settings(self) -> dict[str, Any]:
        settings = asdict(self.cfg)
        settings["lora"] = {k: v for k, v in settings["lora"].items() if k != "modules"}
        return {k: settings[k] for k in RESUME_KEYS} | {"world": self.dist.world, "data": self.data_fingerprint()}

    def save_checkpoint(self, step: int) -> None:
        """checkpoints/step-NNNNNN: adapter, optimizer, scheduler, RNG of every process; atomic."""
        rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if self.device.type == "cuda" else None}
        states = [None] * self.dist.world
        if self.dist.world > 1:
            dist.all_gather_object(states, rng)
        else:
            states = [rng]
        if self.dist.main:
            final = self.checkpoint_dir / f"step-{step:06d}"
            tmp = self.checkpoint_dir / f".tmp-step-{step:06d}"
            shutil.rmtree(tmp, ignore_errors=True)
            save_adapter(self.model, self.cfg.lora, tmp, str(self.cfg.model or "embedded"))
            torch.save({"step": step, "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "rng": states, "settings": self._settings()}, tmp / "trainer_state.pt")
            os.replace(tmp, final)
            for old in sorted(self.checkpoint_dir.glob("step-*"))[:-self.cfg.keep_checkpoints]:
                shutil.rmtree(old)
        self.dist.barrier()

    def latest_checkpoint(self) -> Path | None:
        found = sorted(p for p in self.checkpoint_dir.glob("step-*") if (p / "trainer_state.pt").is_file())
        return found[-1] if found else None

    def load_checkpoint(self, folder: Path) -> int:
        """Restore everything a step needs; returns the number of steps already done."""
        try:
            state = torch.load(folder / "trainer_state.pt", weights_only=False)
        except Exception as exc:  # noqa: BLE001 - torch raises many types on a damaged file
            raise CheckpointError(f"{folder.name}/trainer_state.pt cannot be read: {exc}") from exc
        saved, now = state["settings"], self._settings()
        for key in now:
            if saved.get(key) != now[key]:
                what = "the training data changed" if key == "data" else f"{key} was {saved.get(key)!r}, now {now[key]!r}"
                raise CheckpointError(f"cannot resume from {folder}: {what}; use a new --out folder")

        _, tensors, _ = read_adapter(folder)
        load_lora_state_dict(self.model, tensors, str(folder))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        rng = state["rng"][self.dist.rank]
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] is not None:
            torch.cuda.set_rng_state(rng["cuda"])
        return int(state["step"])

    # -- the loop ----------------------------------------------------------------------------------------
    def run(self, resume: bool = False) -> dict[str, Any]:
        from tqdm import tqdm

        cfg = self.cfg
        if self.dist.main:
            self.out.mkdir(parents=True, exist_ok=True)
            for tmp in self.checkpoint_dir.glob(".tmp-step-*"):
                shutil.rmtree(tmp)  # left by a run killed while saving
        self.dist.barrier()
        start = 0
        latest = self.latest_checkpoint() if resume else None
        if latest is not None:
            start = self.load_checkpoint(latest)
            log.info("resuming from %s", latest.name)
        elif self.latest_checkpoint() is not None:
            raise CheckpointError(f"{self.checkpoint_dir} already holds checkpoints; pass --resume or a new --out")
        log_csv = curves.CsvLog(self.out / "log.csv", start) if self.dist.main else None
        n = len(self.train_examples)
        began, cpu_began = time.perf_counter(), time.process_time()
        eval_losses: dict[int, float] = {}
        bar = tqdm(total=self.total_steps, initial=start, desc="finetune", unit="step",
                   disable=not (self.progress and self.dist.main))
        done = start
        for step in range(start, self.total_steps):
            row = {"step": step + 1, "epoch": round((step + 1) * self.global_batch / n, 4), **self.train_step(step)}
            done = step + 1
            out_of_time = bool(cfg.max_minutes or cfg.max_cpu_minutes) and self._out_of_time(began, cpu_began)
            last = done == self.total_steps or out_of_time
            if self.eval_examples and (last or (cfg.eval_every and done % cfg.eval_every == 0)):
                row["eval_loss"] = eval_losses[done] = self.evaluate()
            row["seconds"] = round(time.perf_counter() - began, 3)
            if log_csv is not None:
                log_csv.add(row)
            bar.update(1)
            bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}")
            if cfg.save_every and done % cfg.save_every == 0 and not last:
                self.save_checkpoint(done)
            if out_of_time:
                log.warning("stopped after step %d: the time limit is reached", done)
                break
        bar.close()
        return self._finish(start, time.perf_counter() - began, time.process_time() - cpu_began, eval_losses, done)

    def _out_of_time(self, began: float, cpu_began: float) -> bool:
        """Whether a time limit is spent; process 0's clocks decide for all, so they stop together."""
        cfg, spent = self.cfg, False
        if self.dist.main:
            wall, cpu = time.perf_counter() - began, time.process_time() - cpu_began
            spent = bool(cfg.max_minutes and wall > cfg.max_minutes * 60) or bool(
                cfg.max_cpu_minutes and cpu > cfg.max_cpu_minutes * 60)
        return self.dist.sum(float(spent)) > 0

    def _full_parameters(self):
        """FSDP keeps each process's shard only: gather whole adapter tensors before saving them."""
        if not self.cfg.fsdp or self.dist.world == 1:
            return contextlib.nullcontext()
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel.summon_full_params(self.loss_module, writeback=False)

    def _finish(self, start: int, seconds: float, cpu_seconds: float, eval_losses: dict[int, float],
                done: int) -> dict[str, Any]:
        self.model.eval()  # the caller's pipeline generates with the adapted model next
        rows = curves.read_rows(self.out / "log.csv") if self.dist.main else []
        summary = {
            "model": self.cfg.model or "embedded Gemma 3 270M", "steps": done, "planned_steps": self.total_steps,
            "resumed_at": start,
            "processes": self.dist.world, "global_batch": self.global_batch,
            "train_examples": len(self.train_examples), "eval_examples": len(self.eval_examples),
            "train_seconds": round(seconds, 2), "train_cpu_seconds": round(cpu_seconds, 2),
            "first_loss": float(rows[0]["loss"]) if rows else None,
            "last_loss": float(rows[-1]["loss"]) if rows else None,
            "eval_loss": {str(k): v for k, v in sorted(eval_losses.items())},
            "trainable_parameters": sum(p.numel() for p in self.params),
            "config": asdict(self.cfg),
        }
        with self._full_parameters():
            if self.dist.main:
                save_adapter(self.model, self.cfg.lora, self.out / "adapter", str(self.cfg.model or "embedded"))
        if self.dist.main:
            if rows:
                curves.plot(self.out / "log.csv", self.out / "loss.png")
            (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
        self.dist.barrier()
        return summary


def train(cfg: SFTConfig, train_data: str | Path, eval_data: str | Path | None = None, *, resume: bool = False,
          pipe: Any = None, progress: bool = True) -> dict[str, Any]:
    """Fine-tune and write adapter/, log.csv, loss.png and summary.json under cfg.out.

    With `pipe` (a loaded `medgem.Pipeline`) its model is adapted in place, so it generates with the
    adapter afterwards.
    """
    return Trainer(cfg, train_data, eval_data, pipe, progress).run(resume)


__all__ = ["CausalLMLoss", "SFTConfig", "Trainer", "train"]
