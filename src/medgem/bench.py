"""How fast a model prefills and decodes here, with the settings it will run with (`medgem bench`).

The definitions are benchmarks/decode.py's, which runs the same measurement next to llama.cpp and
transformers: prefill tok/s = prompt tokens / time to the first generated token, decode tok/s = (new
tokens - 1) / time of the rest, greedy with the end of text ignored, median of runs after a warm-up.
"""

from __future__ import annotations

import resource
import statistics
import time
from collections.abc import Callable

from medgem.engine import blocks, vnni
from medgem.engine.sampling import SamplingParams
from medgem.errors import InputError

# A synthetic discharge summary (no real patient): clinical wording, so the tokenizer sees the text
# medgem is for. Repeated until the prompt is long enough.
BENCH_TEXT = (
    "Discharge summary. The patient is a 67-year-old man with a history of hypertension, type 2 diabetes "
    "mellitus and chronic obstructive pulmonary disease who presented to the emergency department with "
    "three days of fever, productive cough and right-sided pleuritic chest pain. On arrival he was "
    "tachycardic and hypoxic, with oxygen saturation of 88 percent on room air. Chest radiography showed "
    "consolidation of the right lower lobe with a small parapneumonic effusion. Blood cultures were drawn "
    "and he was started on intravenous ceftriaxone and azithromycin. His creatinine was elevated at 1.8 "
    "mg/dL from a baseline of 1.1, which improved with intravenous fluids. Over the following days his "
    "fever resolved, his oxygen requirement decreased, and he was transitioned to oral antibiotics. "
)

Sample = tuple[float, float, int]  # (seconds to the first token, seconds of the rest, tokens generated)


def check_sizes(prompt_tokens: int, new_tokens: int, runs: int) -> None:
    """Refuse sizes that cannot be measured, before anything is loaded."""
    if prompt_tokens < 1:
        raise InputError(f"the prompt needs at least 1 token, not {prompt_tokens}")
    if new_tokens < 2:
        raise InputError(f"decode speed needs at least 2 new tokens, not {new_tokens}")
    if runs < 1:
        raise InputError(f"runs must be at least 1, not {runs}")


def bench_prompt(encode: Callable[[str], list[int]], tokens: int) -> list[int]:
    """The first `tokens` token ids of BENCH_TEXT repeated (encode adds the BOS)."""
    text = BENCH_TEXT
    while len(ids := encode(text)) < tokens:
        text += BENCH_TEXT
    return ids[:tokens]


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(once: Callable[[], Sample], load_s: float, prompt_tokens: int, runs: int) -> dict:
    """Run `once` after a warm-up `runs` times; medians of prefill and decode speed, and peak RSS."""
    once()  # warm-up
    samples = [once() for _ in range(runs)]
    prefill = [prompt_tokens / s[0] for s in samples]
    decode = [(s[2] - 1) / s[1] for s in samples if s[1] > 0]
    return {
        "load_s": round(load_s, 2),
        "prefill_tok_s": round(statistics.median(prefill), 1),
        "decode_tok_s": round(statistics.median(decode), 2) if decode else None,
        "decode_tok_s_runs": [round(d, 2) for d in decode],
        "new_tokens": samples[-1][2],
        "peak_rss_mb": round(peak_rss_mb(), 1),
    }


def timed_generation(pipe, ids: list[int], new_tokens: int) -> Callable[[], Sample]:
    """One greedy generation of exactly `new_tokens` tokens through the pipeline's own engine."""
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)

    def once() -> Sample:
        start, first, count = time.perf_counter(), None, 0
        for event in pipe.events(ids, params):
            if first is None:
                first = time.perf_counter()
            if event.done:
                count = event.completion.completion_tokens
        return first - start, time.perf_counter() - first, count

    return once


def quantized_kernel(model) -> str:
    """Which kernel a quantized model's matmuls run on here, for reports."""
    from medgem.engine.blocks import BlockLinear
    from medgem.engine.quant import Int8Linear

    if any(isinstance(m, BlockLinear) for m in model.modules()):
        return blocks.kernel_name()
    if any(isinstance(m, Int8Linear) and m.vnni for m in model.modules()):
        return vnni.kernel_name()
    return "PyTorch _weight_int8pack_mm / _weight_int4pack_mm"


def bench_pipeline(pipe, prompt_tokens: int = 128, new_tokens: int = 128, runs: int = 3) -> dict:
    """Prefill/decode speed, load time and peak RSS of a loaded pipeline (see the module docstring)."""
    check_sizes(prompt_tokens, new_tokens, runs)
    if prompt_tokens + new_tokens > pipe.config.max_position_embeddings:
        raise InputError(f"{prompt_tokens} + {new_tokens} tokens exceed the model's context "
                         f"({pipe.config.max_position_embeddings})")
    ids = bench_prompt(lambda text: pipe.tokenizer.encode(text, add_bos=True), prompt_tokens)
    once = timed_generation(pipe, ids, new_tokens)
    first = None
    if pipe.compiled:  # the first generation compiles: timed apart, not in the medians
        start = time.perf_counter()
        once()
        first = round(time.perf_counter() - start, 1)
    result = measure(once, pipe.load_seconds, len(ids), runs)
    text_model = getattr(pipe.model, "language_model", pipe.model)
    if getattr(text_model, "quantization", "none") != "none":
        result["kernel"] = quantized_kernel(text_model)
    if first is not None:
        result["first_run_with_compiling_s"] = first
    return {"prompt_tokens": len(ids), **result}
