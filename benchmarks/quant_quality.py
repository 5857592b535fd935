"""Quality of weight-only quantization: int8 and int4 against the dense float32 model, same GGUF.

Two measures, as issue 5 asks:
- greedy agreement: the float32 model writes 64 greedy tokens for each of 20 prompts; the quantized
  model is fed the same prefixes and we count how often its top token is the same (teacher-forced,
  so one early difference does not count every later token as wrong). Also reported: how many of
  the 20 free-running greedy continuations are identical token for token.
- perplexity on a fixed public text that ships on Debian machines, the GNU GPL v3
  (/usr/share/common-licenses/GPL-3), first --ppl-tokens tokens in windows of --window tokens.

Targets: agreement >= 95 % (int8), perplexity within 1 % (int8) and 5 % (int4) of float32.
Writes benchmarks/results/quant_quality.json.

    python benchmarks/quant_quality.py [--new-tokens 64] [--ppl-tokens 4096] [--window 1024]
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time
from pathlib import Path

import torch

import medgem
from medgem.engine.quant import greedy_agreement

RESULTS = Path(__file__).parent / "results" / "quant_quality.json"
TEXT_FILE = Path("/usr/share/common-licenses/GPL-3")
PROMPTS = [
    "The most common cause of community-acquired pneumonia is",
    "Insulin is produced by",
    "Symptoms of a stroke include",
    "A chest X-ray of a patient with heart failure may show",
    "The normal range of serum potassium is",
    "Metformin works by",
    "Atrial fibrillation increases the risk of",
    "The Glasgow Coma Scale measures",
    "Signs of dehydration in children are",
    "Asthma is treated with",
    "The kidneys regulate blood pressure through",
    "A patient presents with crushing chest pain radiating to the left arm. The first step is",
    "Hypothyroidism causes",
    "The liver enzymes ALT and AST rise when",
    "Sepsis is defined as",
    "Vaccines work by",
    "The difference between type 1 and type 2 diabetes is",
    "Anemia can be caused by",
    "Pulmonary embolism is diagnosed with",
    "After a hip replacement, patients should",
]


@torch.inference_mode()
def perplexity(model: torch.nn.Module, ids: list[int], window: int) -> float:
    """exp(mean negative log-likelihood) over non-overlapping windows, each starting with <bos>."""
    nll, count = 0.0, 0
    for start in range(0, len(ids), window - 1):
        chunk = [2] + ids[start:start + window - 1]
        if len(chunk) < 2:
            break
        logits = model(torch.tensor([chunk]))[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, torch.tensor(chunk[1:]), reduction="sum"))
        count += len(chunk) - 1
    return math.exp(nll / count)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--ppl-tokens", type=int, default=4096)
    ap.add_argument("--window", type=int, default=1024)
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--modes", default="int8,int4", help="comma-separated --quant modes (int8, int4, gguf)")
    args = ap.parse_args()
    if not TEXT_FILE.is_file():
        raise SystemExit(f"{TEXT_FILE} is missing (Debian's base-files ships it); perplexity needs a fixed text")

    started = time.time()
    dense = medgem.load(dtype="float32")
    prompt_ids = [dense.prompt_ids(p, raw=True) for p in PROMPTS]
    reference = dense.complete(PROMPTS, raw=True, max_new_tokens=args.new_tokens, temperature=0, ignore_eos=True)
    sequences = [p + c.token_ids for p, c in zip(prompt_ids, reference)]
    lens = [len(p) for p in prompt_ids]
    text_ids = dense.tokenizer.encode(TEXT_FILE.read_text(), add_bos=False)[:args.ppl_tokens]
    results = {"float32": {"perplexity": round(perplexity(dense.model, text_ids, args.window), 4)}}
    del dense

    for mode in args.modes.split(","):
        pipe = medgem.load(quant=mode)
        free = pipe.complete(PROMPTS, raw=True, max_new_tokens=args.new_tokens, temperature=0, ignore_eos=True)
        ppl = perplexity(pipe.model, text_ids, args.window)
        results[mode] = {
            "greedy_agreement": round(greedy_agreement(pipe.model, sequences, lens), 4),
            "identical_continuations": sum(c.token_ids == r.token_ids for c, r in zip(free, reference)),
            "perplexity": round(ppl, 4),
            "perplexity_vs_float32": round(ppl / results["float32"]["perplexity"] - 1, 4),
        }
        print(mode, results[mode], flush=True)
    for mode, r in results.items():  # issue 5's targets: int8-like modes 95 % and 1 %, int4 5 %
        if mode != "float32":
            r["met"] = (abs(r["perplexity_vs_float32"]) <= 0.05 if mode == "int4" else
                        r["greedy_agreement"] >= 0.95 and abs(r["perplexity_vs_float32"]) <= 0.01)
    out = {
        "benchmark": "quant_quality", "model": "embedded Gemma 3 270M (Q4_K_M GGUF; float32 = its dequantized weights)",
        "prompts": len(PROMPTS), "new_tokens": args.new_tokens,
        "perplexity_text": f"{TEXT_FILE} (GNU GPL v3), first {len(text_ids)} tokens, windows of {args.window}",
        "targets": "int8: agreement >= 0.95 and perplexity within 1 %; int4: perplexity within 5 %",
        "results": results, "seconds": round(time.time() - started, 1), "platform": platform.platform(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1))
    print(json.dumps(results, indent=1), "->", args.out)


if __name__ == "__main__":
    main()
