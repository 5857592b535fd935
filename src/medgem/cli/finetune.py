"""`medgem finetune`: LoRA SFT, merging and export, and image-classifier heads.

    medgem finetune sft DATA.jsonl --out DIR [--model M] [--eval-fraction 0.1] [--resume]
    medgem finetune merge --adapter DIR/adapter --out MERGED [--format hf|gguf|both]
    medgem finetune classify IMAGES.csv --model M --out DIR [--siglip]
    medgem finetune siglip PAIRS.csv --model SIGLIP --out DIR [--steps 1000] [--resume]

Distributed: `torchrun --nproc_per_node N --no-python medgem finetune sft ...` (DDP; gloo on CPU).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from medgem import progress
from medgem.cli.common import print_notice
from medgem.errors import InputError


def register(subparsers) -> None:
    parser = subparsers.add_parser("finetune", help="LoRA fine-tuning, merging/export, classifier heads, "
                                   "contrastive MedSigLIP",
                                   description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="finetune_command", metavar="COMMAND", required=True)
    _register_sft(sub)
    _register_merge(sub)
    _register_classify(sub)
    _register_siglip(sub)


def _model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=os.environ.get("MEDGEM_MODEL"),
                   help="base model: HF folder, .gguf file or hub id (default: the embedded Gemma 3 270M)")
    p.add_argument("--mmproj", default=None, help="llama.cpp mmproj GGUF with the vision tower")
    p.add_argument("--device", default=os.environ.get("MEDGEM_DEVICE", "cpu"))


def _register_sft(sub) -> None:
    p = sub.add_parser("sft", help="LoRA supervised fine-tuning on a JSONL file",
                       description="LoRA SFT. Each JSONL line is {\"messages\": [...]} (loss on assistant turns; "
                       "images by path, DICOM included) or {\"prompt\": ..., \"completion\": ...} (raw "
                       "completion). Writes DIR/adapter, DIR/log.csv, DIR/loss.png, DIR/summary.json and "
                       "checkpoints under DIR/checkpoints.")
    p.add_argument("data", type=Path, help="training JSONL")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    _model_flags(p)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="base weights (default float32)")
    p.add_argument("--quant", default="none", choices=["none", "int8", "int4"],
                   help="frozen quantized base, QLoRA-style (default none)")
    p.add_argument("--eval-data", type=Path, help="eval JSONL (default: --eval-fraction of the training file)")
    p.add_argument("--eval-fraction", type=float, default=0.0, help="hold out this share of the training file")
    p.add_argument("--eval-every", type=int, default=0, help="eval loss every N steps (and always at the end)")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-steps", type=int, default=0, help="stop after N optimizer steps (overrides --epochs)")
    p.add_argument("--max-minutes", type=float, default=0.0, help="stop when training has taken this long")
    p.add_argument("--max-cpu-minutes", type=float, default=0.0,
                   help="stop when this process has used this much CPU time (fair on a shared machine)")
    p.add_argument("--batch-size", type=int, default=1, help="sequences per process per micro-step")
    p.add_argument("--grad-accum", type=int, default=4, help="micro-steps per optimizer step")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-ratio", type=float, default=0.03)
    p.add_argument("--schedule", default="linear", choices=["linear", "cosine", "constant"])
    p.add_argument("--max-grad-norm", type=float, default=0.3, help="0 turns clipping off")
    p.add_argument("--max-len", type=int, default=2048, help="longer examples are skipped")
    p.add_argument("--packing", action="store_true", help="pack several examples into each sequence")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute layers in backward (less memory)")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--target-modules", default="all-linear", help="'all-linear' or names, e.g. q_proj,v_proj")
    p.add_argument("--lora-layers", default=None, help="decoder layers to adapt, e.g. 10-17 or 0,5,11 (default all)")
    p.add_argument("--save-every", type=int, default=0, help="checkpoint every N steps (0: only the final adapter)")
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--fsdp", action="store_true", help="shard with FSDP under torchrun (for GPUs; untested on CPU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_sft)


def parse_layers(text: str | None) -> list[int] | None:
    """'10-17' or '0,5,11' -> indices."""
    if not text:
        return None
    out: list[int] = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            out += list(range(int(lo), int(hi) + 1)) if hi else [int(lo)]
    except ValueError:
        raise InputError(f"--lora-layers {text!r}: expected ranges like 10-17 or lists like 0,5,11") from None
    return out


def run_sft(args: argparse.Namespace) -> int:
    from medgem.train.lora import LoraConfig
    from medgem.train.sft import SFTConfig, Trainer

    print_notice()
    lora = LoraConfig(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout,
                      target_modules=args.target_modules, layers=parse_layers(args.lora_layers))
    cfg = SFTConfig(
        model=args.model, mmproj=args.mmproj, out=str(args.out), epochs=args.epochs, max_steps=args.max_steps,
        max_minutes=args.max_minutes, max_cpu_minutes=args.max_cpu_minutes, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
        weight_decay=args.weight_decay, warmup_ratio=args.warmup_ratio, schedule=args.schedule,
        max_grad_norm=args.max_grad_norm, seed=args.seed, max_len=args.max_len, packing=args.packing,
        gradient_checkpointing=args.gradient_checkpointing, dtype=args.dtype, quantize=args.quant,
        device=args.device, save_every=args.save_every, keep_checkpoints=args.keep_checkpoints,
        eval_every=args.eval_every, eval_fraction=args.eval_fraction, fsdp=args.fsdp, lora=lora,
    )
    trainer = Trainer(cfg, args.data, args.eval_data, progress=not args.no_progress and progress.enabled())
    summary = trainer.run(resume=args.resume)
    if trainer.dist.main:
        shown = {k: summary[k] for k in ("steps", "train_examples", "eval_examples", "train_seconds", "first_loss",
                                         "last_loss", "eval_loss")}
        print(json.dumps({**shown, "out": str(args.out)}, indent=1))
    return 0


def _register_merge(sub) -> None:
    p = sub.add_parser("merge", help="fold a LoRA adapter into its base and export (HF safetensors and/or GGUF)",
                       description="Load the base model in float32, apply the adapter, fold it into the weights "
                       "and write an HF folder that transformers loads and/or a llama.cpp GGUF (+ mmproj).")
    p.add_argument("--adapter", type=Path, required=True, help="adapter folder (DIR/adapter or a checkpoint)")
    p.add_argument("--out", type=Path, required=True, help="new output folder")
    _model_flags(p)
    p.add_argument("--format", default="hf", choices=["hf", "gguf", "both"])
    p.add_argument("--gguf-type", default="f16", choices=["f32", "f16", "bf16", "q8_0"])
    p.add_argument("--hf-dtype", default="float32", choices=["float32", "bfloat16"])
    p.set_defaults(func=run_merge)


def run_merge(args: argparse.Namespace) -> int:
    import medgem
    from medgem.pipeline import resolve_source
    from medgem.train.lora import load_adapter, merge_lora, read_adapter
    from medgem.weights import resolve_dtype
    from medgem.weights.export import export_gguf, export_hf, export_mmproj

    print_notice()
    if args.out.exists() and any(args.out.iterdir()):
        raise InputError(f"{args.out} exists and is not empty; choose a new output folder")
    _, _, base = read_adapter(args.adapter)
    model_src = args.model if args.model is not None else (None if base in ("", "embedded") else base)
    pipe = medgem.load(model_src, mmproj=args.mmproj, dtype="float32", device=args.device, quant="none")
    load_adapter(pipe.model, args.adapter)
    merge_lora(pipe.model)
    source = resolve_source(model_src)
    image_processor = pipe.processor.image_processor if pipe.processor is not None else None
    written = []
    if args.format in ("hf", "both"):
        export_hf(pipe.model, args.out, source, dtype=resolve_dtype(args.hf_dtype), image_processor=image_processor)
        written.append(str(args.out))
    if args.format in ("gguf", "both"):
        args.out.mkdir(parents=True, exist_ok=True)
        written.append(str(export_gguf(pipe.model, args.out / "model.gguf", source, args.gguf_type)))
        if image_processor is not None:
            written.append(str(export_mmproj(pipe.model, args.out / "mmproj.gguf", image_processor, args.gguf_type)))
    print(json.dumps({"merged": str(args.adapter), "base": model_src or "embedded", "written": written}, indent=1))
    return 0


def _register_classify(sub) -> None:
    p = sub.add_parser("classify", help="train a classifier head on frozen MedGemma or MedSigLIP image features",
                       description="A CSV with path (or image) and label columns; image paths are relative to "
                       "the CSV (PNG, JPEG or DICOM). Fits a logistic-regression head on frozen image features "
                       "and reports held-out accuracy and ROC AUC. Writes OUT/probe.json and OUT/metrics.json.")
    p.add_argument("data", type=Path, help="CSV with path and label columns")
    p.add_argument("--out", type=Path, required=True, help="output folder for the head")
    _model_flags(p)
    p.add_argument("--siglip", action="store_true", help="--model is a MedSigLIP folder (default: multimodal MedGemma)")
    p.add_argument("--eval-csv", type=Path, help="eval CSV (default: a stratified --eval-fraction of DATA)")
    p.add_argument("--eval-fraction", type=float, default=0.2)
    p.add_argument("--c", type=float, default=1.0, help="inverse L2 strength of the logistic regression")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_classify)


def run_classify(args: argparse.Namespace) -> int:
    from medgem.retrieval.probe import read_labelled
    from medgem.train.classify import feature_extractor, train_classifier

    print_notice()
    data = read_labelled(args.data)
    eval_data = read_labelled(args.eval_csv) if args.eval_csv else None
    extract, fingerprint = feature_extractor(args.model, args.siglip, args.mmproj, args.device)
    result = train_classifier(data, extract, fingerprint, args.out, eval_data, args.eval_fraction, args.c, args.seed)
    print(json.dumps({"eval": result["eval"], "chance_accuracy": result["chance_accuracy"], "out": str(args.out)},
                     indent=1))
    return 0


def _register_siglip(sub) -> None:
    p = sub.add_parser("siglip", help="contrastive fine-tuning of a SigLIP/MedSigLIP dual encoder (sigmoid loss)",
                       description="Fine-tunes both towers on (image, caption) pairs from a CSV (image or path, "
                       "caption or text columns) or JSONL with the same keys; image paths are relative to the "
                       "file (PNG, JPEG or DICOM). Writes OUT/checkpoint-STEP/ every --save-every steps (each a "
                       "complete model folder), OUT/log.jsonl, and OUT/final/ (load it with --model in "
                       "classify, embed, probe or index). Options left unset keep the defaults of "
                       "medgem.train.contrastive.ContrastiveConfig (1000 steps of 32 pairs, lr 1e-5).")
    p.add_argument("data", type=Path, help="CSV or JSONL of image-caption pairs")
    p.add_argument("--model", required=True, help="SigLIP/MedSigLIP HF folder to start from")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    for name in ("steps", "batch_size", "warmup_steps", "save_every", "keep_checkpoints", "seed"):
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int, default=argparse.SUPPRESS)
    for name in ("lr", "weight_decay", "max_grad_norm"):
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=float, default=argparse.SUPPRESS)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_siglip)


def run_siglip(args: argparse.Namespace) -> int:
    from dataclasses import fields

    from medgem.train.contrastive import ContrastiveConfig, checkpoints, train_contrastive

    cfg = ContrastiveConfig(**{f.name: getattr(args, f.name) for f in fields(ContrastiveConfig) if hasattr(args, f.name)})
    if cfg.steps < 1 or cfg.batch_size < 2 or cfg.save_every < 1 or cfg.keep_checkpoints < 1 or cfg.lr <= 0:
        raise InputError("--steps, --save-every and --keep-checkpoints must be >= 1, --batch-size >= 2 (the loss "
                         "contrasts pairs) and --lr > 0")
    if checkpoints(args.out) and not args.resume:
        raise InputError(f"{args.out} already holds checkpoints; pass --resume to continue, or choose another --out")
    print_notice()
    final = train_contrastive(args.model, args.data, args.out, cfg, resume=args.resume, progress=not args.no_progress and progress.enabled())
    last = json.loads((args.out / "log.jsonl").read_text().splitlines()[-1])
    print(json.dumps({"final": str(final), "steps": last["step"], "loss": last["loss"], "log": str(args.out / "log.jsonl")},
                     indent=1))
    return 0
