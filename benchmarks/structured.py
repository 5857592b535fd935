"""Structured outputs: which grammar library, and what a JSON schema costs the decode loop.

Two parts, one process, the embedded Gemma 3 270M (vocabulary 262,144):
- libraries: xgrammar and llguidance side by side on the same vocabulary: tokenizer setup, schema
  compile (cold, then cached), and the per-token mask time while a fixed valid JSON document is fed
  token by token (so both libraries walk the same states);
- overhead: medgem's decode tok/s with a JSON schema against unconstrained, greedy, at batch 1 and 8
  (continuous-batching scheduler, every request constrained), plus the grammar cache's hits.
Writes benchmarks/results/structured.json.

    python benchmarks/structured.py [--new-tokens 64] [--runs 3] [--skip-overhead]
"""

from __future__ import annotations  # noqa: I001 (medgem is imported before torch on purpose, below)

import argparse
import json
import statistics
import time
from importlib.metadata import version
from pathlib import Path

import medgem  # (before torch: the engine's OpenMP and huge-page defaults)
import numpy as np
import torch
from medgem.engine.constraints import JSON_OPTIONS, Constraint, Grammars, Matcher, ll_tokenizer
from medgem.engine.sampling import SamplingParams
from medgem.engine.scheduler import Request, Scheduler

RESULTS = Path(__file__).parent / "results"
SCHEMA = {
    "type": "object",
    "properties": {
        "patient": {"type": "object", "properties": {
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "sex": {"enum": ["female", "male", "other", "unknown"]}}, "required": ["age", "sex"]},
        "findings": {"type": "array", "maxItems": 4, "items": {"type": "object", "properties": {
            "label": {"type": "string", "maxLength": 40},
            "severity": {"enum": ["mild", "moderate", "severe"]}}, "required": ["label", "severity"]}},
        "urgent": {"type": "boolean"},
    },
    "required": ["patient", "findings", "urgent"],
}
DOCUMENT = json.dumps({"patient": {"age": 67, "sex": "female"},
                       "findings": [{"label": "right lower lobe opacity", "severity": "moderate"},
                                    {"label": "small pleural effusion", "severity": "mild"}],
                       "urgent": False}, separators=(", ", ": "))
PROMPT = ("Chest radiograph of a 67-year-old woman: right lower lobe opacity, small effusion.\n"
          "The findings as JSON:")


def _ms(seconds: list[float]) -> float:
    return round(1000 * statistics.median(seconds), 4)


def libraries(pipe) -> dict:
    """Setup, compile and per-token mask time of xgrammar and llguidance on the same token walk."""
    import llguidance

    tok, vocab, stops = pipe.tokenizer, pipe.config.vocab_size, list(pipe.tokenizer.stop_ids)
    walk = tok.encode(DOCUMENT, add_bos=False)
    out: dict = {"vocab_size": vocab, "tokens_walked": len(walk)}

    t = time.perf_counter()
    lltok = ll_tokenizer(tok, vocab, tuple(stops))
    ll_setup = time.perf_counter() - t
    t = time.perf_counter()
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, overrides=JSON_OPTIONS)
    ll = llguidance.LLMatcher(lltok, grammar, log_level=0)
    ll_compile = time.perf_counter() - t
    assert not ll.is_error(), ll.get_error()
    t = time.perf_counter()
    ll.deep_copy()
    ll_copy = time.perf_counter() - t
    matcher, masks = Matcher(ll, vocab), []
    for token in walk:
        t = time.perf_counter()
        allowed = matcher.allowed()
        masks.append(time.perf_counter() - t)
        assert allowed[token], f"llguidance refused token {token} of the valid document"
        matcher.accept(token)
    logits = torch.randn(vocab)
    apply = []
    for _ in range(20):
        t = time.perf_counter()
        matcher.mask(logits)
        apply.append(time.perf_counter() - t)
    out["llguidance"] = {"version": version("llguidance"),
                         "tokenizer_setup_s": round(ll_setup, 3), "compile_ms": round(1000 * ll_compile, 2),
                         "cached_copy_ms": round(1000 * ll_copy, 3), "mask_ms_median": _ms(masks),
                         "mask_ms_max": round(1000 * max(masks), 3), "first_mask_ms": round(1000 * masks[0], 3),
                         "mask_to_logits_ms": _ms(apply)}

    try:  # not a medgem dependency: `pip install --no-deps xgrammar apache-tvm-ffi` (it asks for
        import xgrammar as xgr  # transformers and triton, which its CPU path does not use)
    except ImportError:
        out["xgrammar"] = "not installed"
        return out
    encoded = [b"\xff" + b if special else b for b, special in tok.token_bytes()]
    t = time.perf_counter()
    info = xgr.TokenizerInfo(encoded, xgr.VocabType.RAW, vocab_size=vocab, stop_token_ids=stops)
    compiler = xgr.GrammarCompiler(info, max_threads=2)
    xg_setup = time.perf_counter() - t
    t = time.perf_counter()
    compiled = compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(", ", ": "))
    xg_compile = time.perf_counter() - t
    t = time.perf_counter()
    compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=False, separators=(", ", ": "))
    xg_cached = time.perf_counter() - t
    xm = xgr.GrammarMatcher(compiled)
    bitmask = xgr.allocate_token_bitmask(1, vocab)
    xmasks = []
    for token in walk:
        t = time.perf_counter()
        xm.fill_next_token_bitmask(bitmask)
        xmasks.append(time.perf_counter() - t)
        bits = np.unpackbits(bitmask[0].numpy().view(np.uint8), bitorder="little")
        assert bits[token], f"xgrammar refused token {token} of the valid document"
        assert xm.accept_token(token)
    out["xgrammar"] = {"version": version("xgrammar"), "tokenizer_setup_s": round(xg_setup, 3),
                       "compile_ms": round(1000 * xg_compile, 2), "cached_compile_ms": round(1000 * xg_cached, 3),
                       "mask_ms_median": _ms(xmasks), "mask_ms_max": round(1000 * max(xmasks), 3),
                       "first_mask_ms": round(1000 * xmasks[0], 3)}
    return out


def overhead(pipe, new_tokens: int, runs: int) -> dict:
    """Decode tok/s, greedy, with and without the schema, at batch 1 and 8 (median of `runs`)."""
    grammars = Grammars(pipe.tokenizer, pipe.config.vocab_size, pipe.tokenizer.stop_ids)
    t = time.perf_counter()
    grammar = grammars.compile(Constraint.json_schema(SCHEMA))
    first_compile = time.perf_counter() - t
    prompt = pipe.tokenizer.encode(PROMPT, add_bos=True)
    out: dict = {"new_tokens": new_tokens, "first_compile_ms": round(1000 * first_compile, 1)}
    for batch in (1, 8):
        scheduler = Scheduler(pipe.engine, max_slots=batch, max_len=1024, prefix_cache_mb=0)
        speeds: dict[str, list[float]] = {"plain": [], "json_schema": []}
        for _ in range(runs + 1):  # the first round warms up
            for name in speeds:
                constraint = grammars.compile(Constraint.json_schema(SCHEMA)) if name != "plain" else None
                params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=name == "plain",
                                        constraint=constraint)
                requests = [Request(prompt, params) for _ in range(batch)]
                tokens, first = 0, None
                for event in scheduler.drive(requests):
                    first = first or time.perf_counter()
                    tokens += len(event.token_ids)
                speeds[name].append((tokens - batch) / (time.perf_counter() - first))
        plain, constrained = (statistics.median(s[1:]) for s in speeds.values())
        out[f"batch_{batch}"] = {"plain_tok_s": round(plain, 1), "json_schema_tok_s": round(constrained, 1),
                                 "ratio": round(constrained / plain, 3)}
    out["cache"] = {"hits": grammars.hits, "misses": grammars.misses}
    del grammar
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "structured.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pipe = medgem.load()
    report = {"model": pipe.source, "threads": args.threads, "libraries": libraries(pipe)}
    if not args.skip_overhead:
        report["overhead"] = overhead(pipe, args.new_tokens, args.runs)
    print(json.dumps(report, indent=1))
    Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
