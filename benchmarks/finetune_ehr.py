"""The seed's "50 % fewer EHR information-retrieval errors" in miniature, on real weights.

The embedded Gemma 3 270M (a general base model, not MedGemma) answers EHR questions about synthetic
FHIR patients (medgem.ehr.synth) from budgeted record contexts (medgem.ehr.qa.Asker, the prompts of
`medgem ehr ask`). It is scored by exact match on held-out patients, then LoRA-tuned on the
questions of other patients (a different set of people, same question kinds) within a time budget,
then scored again on the same held-out questions with the same greedy decoding.

The training budget is CPU time of the process: 120 CPU-minutes is 60 minutes on this 2-core machine
when it is idle, and stays a fair measure when other jobs share the cores (wall time is reported too).
Run it with OMP_WAIT_POLICY=PASSIVE on a shared machine: spinning OpenMP threads otherwise burn CPU
time (and everyone's wall time) while waiting for a core.

Writes benchmarks/results/finetune_ehr.json (error rates before/after, per question kind, training
time, machine load) plus the loss curve PNG and the training log CSV next to it.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/finetune_ehr.py   # 100 train / 10 held-out patients
    .venv/bin/python benchmarks/finetune_ehr.py --save runs/ehr    # then: medgem eval ehrqa / eval compare
    .venv/bin/python benchmarks/finetune_ehr.py --cpu-minutes 2 --train-patients 2 --eval-patients 1   # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

import medgem
from medgem.ehr import qa, synth
from medgem.train.lora import LoraConfig, merge_lora
from medgem.train.sft import SFTConfig, train
from medgem.weights import embedded_gguf
from medgem.weights.export import export_hf

RESULTS = Path(__file__).parent / "results"


def prompts_for(pipe, folder: Path, items: list[dict], budget: int) -> list[str]:
    count = lambda text: len(pipe.tokenizer.encode(text, add_bos=False))  # noqa: E731
    asker = qa.Asker(count, budget, window=pipe.config.sliding_window)
    return [asker.prompt(folder / it["bundle"], it["question"], it["answer_type"])[0] for it in items]


def score(pipe, prompts: list[str], items: list[dict], batch: int = 8) -> dict:
    """Greedy answers, exact match per item, error overall and per question kind."""
    pipe.model.eval()
    correct = []
    for i in range(0, len(prompts), batch):
        texts = pipe.generate_batch(prompts[i:i + batch], raw=True, max_new_tokens=qa.MAX_NEW_TOKENS,
                                    temperature=0.0, stop=qa.STOP)
        correct += [qa.exact_match(t, it["answer"], it["answer_type"]) for t, it in zip(texts, items[i:i + batch])]
    kinds: dict[str, list[bool]] = defaultdict(list)
    for ok, it in zip(correct, items):
        kinds[it["kind"]].append(ok)
    return {"n": len(items), "error": 1 - sum(correct) / len(items),
            "by_kind": {k: {"n": len(v), "error": round(1 - sum(v) / len(v), 4)} for k, v in sorted(kinds.items())}}


def save_for_eval(pipe, work: Path, eval_items: list[dict], folder: Path) -> None:
    """The merged model as an HF folder, and the held-out questions as an ehrqa JSONL with their bundles."""
    folder.mkdir(parents=True, exist_ok=True)
    export_hf(pipe.model, folder / "finetuned", embedded_gguf())
    for bundle in sorted({it["bundle"] for it in eval_items}):
        (folder / bundle).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(work / bundle, folder / bundle)
    with (folder / "heldout_qa.jsonl").open("w") as f:
        for it in eval_items:
            f.write(json.dumps(it) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--train-patients", type=int, default=100)
    ap.add_argument("--eval-patients", type=int, default=10)
    ap.add_argument("--seed", type=int, default=2024)
    ap.add_argument("--budget", type=int, default=768, help="prompt token budget (record + question)")
    ap.add_argument("--cpu-minutes", type=float, default=120.0, help="training budget in process CPU minutes")
    ap.add_argument("--minutes", type=float, default=0.0, help="training wall-clock limit (0: none)")
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--top-layers", type=int, default=8, help="adapt only the top N decoder layers (0: all)")
    ap.add_argument("--out", type=Path, default=RESULTS / "finetune_ehr.json")
    ap.add_argument("--save", type=Path, default=None,
                    help="keep the merged model (HF folder) and the held-out questions with their FHIR bundles "
                         "here, for `medgem eval ehrqa` and `medgem eval compare`")
    args = ap.parse_args()

    started, load_before = time.time(), os.getloadavg()
    pipe = medgem.load(dtype="float32")
    work = Path(tempfile.mkdtemp(prefix="finetune-ehr-"))
    synth.write(work, args.train_patients + args.eval_patients, args.seed)
    patients = [json.loads(line)["patient_id"] for line in (work / "truth.jsonl").open()]
    held_out = set(patients[args.train_patients:])
    items = [json.loads(line) for line in (work / "qa.jsonl").open()]
    train_items = [it for it in items if it["patient_id"] not in held_out]
    eval_items = [it for it in items if it["patient_id"] in held_out]
    train_prompts = prompts_for(pipe, work, train_items, args.budget)
    eval_prompts = prompts_for(pipe, work, eval_items, args.budget)
    with (work / "train.jsonl").open("w") as f:
        for prompt, it in zip(train_prompts, train_items):  # the answer line the scorer reads, then a stop
            f.write(json.dumps({"prompt": prompt, "completion": f" {it['answer']}\n"}) + "\n")

    t = time.time()
    before = score(pipe, eval_prompts, eval_items)
    before_seconds = time.time() - t
    print(f"before: error {before['error']:.3f} on {before['n']} held-out questions ({before_seconds:.0f} s)")

    layers = pipe.config.num_hidden_layers
    lora = LoraConfig(layers=list(range(layers - args.top_layers, layers)) if args.top_layers else None)
    cfg = SFTConfig(out=str(work / "run"), epochs=args.epochs, batch_size=args.batch_size, grad_accum=1, lr=args.lr,
                    max_len=args.budget + 64, max_minutes=args.minutes, max_cpu_minutes=args.cpu_minutes, lora=lora,
                    seed=args.seed)
    summary = train(cfg, work / "train.jsonl", pipe=pipe)
    merge_lora(pipe.model)
    if args.save:
        save_for_eval(pipe, work, eval_items, args.save)

    t = time.time()
    after = score(pipe, eval_prompts, eval_items)
    print(f"after: error {after['error']:.3f} ({time.time() - t:.0f} s)")
    reduction = (before["error"] - after["error"]) / before["error"] if before["error"] else 0.0
    stem = args.out.with_suffix("")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(work / "run" / "loss.png", f"{stem}_curve.png")
    shutil.copy(work / "run" / "log.csv", f"{stem}_log.csv")
    result = {
        "benchmark": "finetune_ehr", "model": "embedded Gemma 3 270M (base, Q4_K_M GGUF dequantized to fp32)",
        "data": {"generator": "medgem.ehr.synth", "seed": args.seed, "train_patients": args.train_patients,
                 "eval_patients": args.eval_patients, "train_questions": len(train_items),
                 "eval_questions": len(eval_items), "prompt_budget_tokens": args.budget},
        "before": before, "after": after, "relative_error_reduction": round(reduction, 4),
        "target": ">= 0.50 relative error reduction within 60 minutes of training on 2 cores (7200 CPU-seconds)",
        # The trainer stops after the step that crosses the budget, so the budget holds by construction.
        "met": reduction >= 0.5 and args.cpu_minutes <= 120,
        "training": {k: summary[k] for k in ("steps", "planned_steps", "train_examples", "train_seconds",
                                             "train_cpu_seconds", "first_loss", "last_loss", "trainable_parameters")}
        | {"lr": args.lr, "batch_size": args.batch_size, "lora": f"r=16 alpha=16 dropout=0.05, all linears of the "
           f"top {args.top_layers or layers} of {layers} layers"},
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                    "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "(default: active)"),
                    "load_average_start": load_before, "load_average_end": os.getloadavg(),
                    "note": "a shared machine: load averages above the core count mean other jobs took CPU time"},
        "total_seconds": round(time.time() - started, 1),
        "command": "python benchmarks/finetune_ehr.py " + " ".join(
            f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if k != "out"),
        "curve": f"{stem.name}_curve.png",
    }
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps({k: result[k] for k in ("relative_error_reduction", "met")}), "->", args.out)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
