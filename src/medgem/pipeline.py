"""`medgem.load()`: a model, its tokenizer and the generation engine behind one object.

The faces (CLI, server, eval, EHR) all go through `Pipeline`, so prompt handling, limits and
accounting live in one place.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from medgem.config import TextConfig, is_multimodal_hf_config
from medgem.engine import blocks, ckernel
from medgem.engine.cache import KVCache
from medgem.engine.constraints import Constraint, Grammar, Grammars
from medgem.engine.generate import PREFILL_CHUNK, Completion, Generator, StreamEvent
from medgem.engine.quant import QUANT_MODES, load_quantized_text_model, quantize_text_model
from medgem.engine.sampling import SamplingParams
from medgem.engine.speculative import Drafter, PromptLookup
from medgem.errors import CapabilityError, ConfigError, ContextLengthError, InputError
from medgem.nn.medgemma import VISION_BATCH
from medgem.processing import recipes
from medgem.processing.boxes import Box, answer_boxes
from medgem.processing.multimodal import MultimodalProcessor
from medgem.processing.thinking import ThoughtSplitter, split_thought, thought_keeping_decode
from medgem.processing.tokenizer import Tokenizer, render_chat
from medgem.weights import (
    check_device,
    embedded_gguf,
    hf,
    load_text_model,
    local_checkpoint,
    medgem_home,
    open_text_checkpoint,
)
from medgem.weights.multimodal import load_multimodal_model

log = logging.getLogger(__name__)

Prompt = str | list[dict[str, Any]]
# Tokens around each image besides its soft tokens: "\n\n<start_of_image>", "<end_of_image>\n\n" and a
# label such as "SLICE 85" (counted high so the check never passes a prompt that cannot fit).
IMAGE_OVERHEAD_TOKENS = 8
MEMORY_LIMIT_ENV = "MEDGEM_MEMORY_LIMIT"  # e.g. "8G": the most this process may hold (a shared machine's share)
_GB = 1e9


@dataclass
class MemoryEstimate:
    """Bytes a multimodal prompt needs on top of the loaded weights, by stage (Pipeline.memory_estimate)."""

    weights: int  # already resident
    vision: int  # the vision tower's activations, VISION_BATCH images at a time, plus pixels and features
    kv_cache: int  # KVCache for the prompt and answer
    prefill: int  # the prompt's embeddings and one prefill chunk's attention scores and MLP

    @property
    def extra(self) -> int:
        return self.vision + self.kv_cache + self.prefill


def _size_bytes(text: str) -> int:
    """'8G', '512M', '1.5GiB' or plain bytes -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", text)
    if not match:
        raise ConfigError(f"{MEMORY_LIMIT_ENV}={text!r} is not a size such as 8G or 512M")
    return int(float(match[1]) * 1024 ** " KMGT".index(match[2].upper() or " "))


def available_memory() -> tuple[int, str]:
    """(bytes this process may still allocate, where that bound comes from): the machine's available
    memory, a cgroup v2 limit (containers), or MEDGEM_MEMORY_LIMIT, whichever is least."""
    import psutil

    bounds = [(psutil.virtual_memory().available, "available on this machine")]
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit.isdigit():
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            bounds.append((int(limit) - used, "left under this container's memory limit"))
    except (OSError, ValueError):
        pass
    if os.environ.get(MEMORY_LIMIT_ENV):
        held = psutil.Process().memory_info().rss
        bounds.append((_size_bytes(os.environ[MEMORY_LIMIT_ENV]) - held, f"left under {MEMORY_LIMIT_ENV}"))
    room, source = min(bounds)
    return max(0, room), source


@dataclass
class RecipeResult:
    """An answer to a recipe prompt: the text (never a thought), the thought, boxes for localize."""

    text: str
    reasoning: str
    boxes: list[Box] | None
    prompt: recipes.RecipePrompt
    completion: Completion


def _has_images(messages: list[dict[str, Any]]) -> bool:
    return any(
        isinstance(part, dict) and part.get("type") in ("image", "image_url")
        for msg in messages
        if isinstance(msg, dict) and isinstance(msg.get("content"), list)
        for part in msg["content"]
    )


def resolve_source(src: str | Path | None) -> Path:
    """A local path for a model source: None (embedded default), a folder, a .gguf, or a hub id."""
    if src is None:
        return embedded_gguf()
    return local_checkpoint(src, ["*.json", "*.safetensors", "tokenizer.model"])


SPECULATIVE_MAX_LEN = 8192  # tokens per request (prompt + answer) when a draft model is in use


class Pipeline:
    """A loaded model with `generate`, `generate_batch`, `stream`, `complete` and `score`."""

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, text_config: TextConfig, source: str,
                 load_seconds: float = 0.0, processor: MultimodalProcessor | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.processor = processor  # images -> soft tokens + pixels; None for text-only models
        self.config = text_config
        self.source = source
        self.load_seconds = load_seconds
        self.compiled = False  # set by compile()
        self.base_model = False  # a pretrained, not instruction-tuned, model: completion prompts suit it (load sets it)
        # Thought markers survive decoding so that complete/stream can split a thought off the answer
        # (processing/thinking.py); dropped as ordinary special tokens, the thought would read as answer.
        self.engine = Generator(model, text_config, thought_keeping_decode(tokenizer), tokenizer.stop_ids,
                                tokenizer.pad_id)
        self.draft: Callable[[], Drafter | PromptLookup] | None = None  # makes the drafter: use_draft/use_prompt_lookup
        self._speculative: Any = None  # the Scheduler that runs text prompts with the drafter
        self._grammars: Grammars | None = None

    def compile(self) -> None:
        """Generate through `torch.compile` (engine/compiled.py), for `generate`, `stream`, `complete` and
        the server's scheduler. The int8 270M then decodes about 1.5x faster on 2 CPU cores, but the first
        prompt and first decode step spend about 70 s compiling (12 s when PyTorch's inductor cache under
        /tmp already holds the graphs, as on a restart; benchmarks/decode.py), so it is off by
        default: worth it for long-running servers and batch jobs, not for one question."""
        from medgem.engine.compiled import compile_decoder

        compile_decoder(self.model)
        self.compiled = True

    def use_draft(self, draft: Pipeline, k: int = 4) -> None:
        """Speculative decoding: `draft`, a small model with this model's tokenizer (the embedded 270M for
        a bigger Gemma 3 / MedGemma), proposes `k` tokens a step and this model checks them in one
        forward. Greedy text is unchanged and sampling keeps this model's distribution; only speed differs.
        Text prompts then run through the continuous-batching engine; prompts with images do not use it.
        """
        probe = "Troponin 0.04 ng/mL; <start_of_turn>user\nHbA1c 7.2 %"
        if draft.tokenizer.vocab_size != self.tokenizer.vocab_size or \
                draft.tokenizer.encode(probe) != self.tokenizer.encode(probe):
            raise InputError(f"the draft model {draft.source} does not share this model's tokenizer "
                             f"({draft.tokenizer.vocab_size} vs {self.tokenizer.vocab_size} tokens)")
        Drafter(draft.model, k)  # validates k and the model kind now, not at the first request
        self.close()
        self.draft = lambda: Drafter(draft.model, k)

    def use_prompt_lookup(self, k: int = 8, max_ngram: int = 3, slow_start: bool = True) -> None:
        """Speculative decoding with no draft model: up to `k` tokens copied from where the text's last
        1..`max_ngram` tokens occurred before (engine/speculative.py `PromptLookup`). It pays where the
        answer repeats its prompt (summaries, extraction, report drafting). Output as with `use_draft`."""
        PromptLookup(k, max_ngram, slow_start)  # validates now, not at the first request
        self.close()
        self.draft = lambda: PromptLookup(k, max_ngram, slow_start)

    def close(self) -> None:
        """Free the speculative scheduler's KV cache, if `use_draft`/`use_prompt_lookup` made one."""
        self._speculative = None

    def _draft_scheduler(self):
        """The continuous-batching scheduler with the drafter, driven in the caller's thread (Scheduler.drive
        says why there is no model thread); like the generator, it serves one caller at a time."""
        if self._speculative is None:
            from medgem.engine.scheduler import Scheduler

            max_len = min(self.config.max_position_embeddings, SPECULATIVE_MAX_LEN)
            self._speculative = Scheduler(self.engine, max_slots=4, max_len=max_len, draft=self.draft())
        return self._speculative

    @property
    def supports_images(self) -> bool:
        return self.processor is not None

    # -- prompts --------------------------------------------------------------------------------------
    def prompt_ids(self, prompt: Prompt, raw: bool = False, system: str | None = None) -> list[int]:
        """Token ids for a plain string (chat-wrapped unless raw) or a list of chat messages."""
        if isinstance(prompt, str):
            if not prompt.strip():
                raise InputError("prompt is empty")
            if raw:
                if system:
                    raise InputError("--system needs the chat template; drop --raw")
                return self.tokenizer.encode(prompt, add_bos=True)
            messages: list[dict[str, Any]] = [{"role": "user", "content": prompt}]
            if system:
                messages.insert(0, {"role": "system", "content": system})
            return self.tokenizer.encode(render_chat(messages), add_bos=False)
        if isinstance(prompt, list):
            if _has_images(prompt) and not self.supports_images:
                raise CapabilityError(
                    f"model {self.source} has no vision tower, so it cannot read images; load a multimodal "
                    "MedGemma checkpoint (e.g. a google/medgemma-4b-it folder, or a GGUF with --mmproj)"
                )
            if system:
                prompt = [{"role": "system", "content": system}, *prompt]
            return self.tokenizer.encode(render_chat(prompt), add_bos=False)
        raise InputError(f"prompt must be a string or a list of messages, got {type(prompt).__name__}")

    def prompt_inputs(self, prompt: Prompt, raw: bool = False,
                      system: str | None = None) -> tuple[list[int], torch.Tensor | None]:
        """Token ids plus, for messages with images, their pixel values (processing/multimodal.py)."""
        if not (isinstance(prompt, list) and _has_images(prompt) and self.processor is not None):
            return self.prompt_ids(prompt, raw, system), None
        if system:
            prompt = [{"role": "system", "content": system}, *prompt]
        inputs = self.processor.apply_chat_template(prompt)
        return inputs.input_ids[0].tolist(), inputs.pixel_values

    def _batch_inputs(self, prompts: list[Prompt], raw: bool, system: str | None) -> tuple[list[list[int]], dict | None]:
        """Ids per prompt, and the images of all prompts in batch order (the model fills them row by row)."""
        ids, pixels = zip(*(self.prompt_inputs(p, raw, system) for p in prompts), strict=True)
        images = [p for p in pixels if p is not None]
        return list(ids), ({"pixel_values": torch.cat(images)} if images else None)

    # -- recipes (processing/recipes.py) ------------------------------------------------------------
    def check_budget(self, recipe: str, n_images: int, max_new_tokens: int, context: int | None = None) -> None:
        """Refuse, with the numbers, a recipe prompt that cannot fit, before any work: n images x tokens per
        image plus the answer against the model's context (or a smaller `context`, e.g. a server's prompt
        limit), then the memory that prompt needs (memory_estimate) against what is available."""
        if self.processor is None:
            raise CapabilityError(f"the {recipe} recipe sends images, and model {self.source} has no vision tower; "
                                  "load a multimodal MedGemma checkpoint")
        per = self.processor.tokens_per_image
        limit = min(self.config.max_position_embeddings, context or self.config.max_position_embeddings)
        need = n_images * (per + IMAGE_OVERHEAD_TOKENS) + max_new_tokens
        fewer = "send fewer patches (max_patches / --patches)" if recipe == "wsi" else \
            "send fewer slices (max_slices / --slices)"
        if need > limit:
            raise ContextLengthError(
                f"the {recipe} recipe needs {n_images} image(s) x {per} tokens = {n_images * per:,} image tokens "
                f"(about {need:,} with labels and {max_new_tokens} new tokens), more than the {limit:,} tokens "
                f"available; {fewer} or ask for fewer new tokens")
        est = self.memory_estimate(n_images, need)
        room, source = available_memory()
        if est.extra > room:
            raise InputError(
                f"the {recipe} recipe needs about {est.extra / _GB:.2f} GB of memory beyond the {est.weights / _GB:.2f} "
                f"GB of loaded weights (vision tower {est.vision / _GB:.2f} GB for {n_images} image(s), KV cache "
                f"{est.kv_cache / _GB:.2f} GB for {need:,} tokens, prefill {est.prefill / _GB:.2f} GB), more than the "
                f"{room / _GB:.2f} GB {source}; {fewer}, or load the model in bfloat16")

    def memory_estimate(self, n_images: int, tokens: int) -> MemoryEstimate:
        """What a prompt of `n_images` images and `tokens` tokens (answer included) needs, by stage.

        Vision: per image in flight, 3 x (hidden + intermediate) values a patch (an encoder layer's
        residual, normed copy and attention/MLP outputs; measured at So400m widths in float32: 436 MB
        peak for 8 images of 1,024 patches, this gives 536); the float32 pixels and the projected
        features of every image stay until prefill. KV cache: KVCache.bytes_needed.
        Prefill: the prompt's embeddings, plus one PREFILL_CHUNK's float32 attention scores over the
        whole prompt and its MLP activations.
        """
        tensors = itertools.chain(self.model.parameters(), self.model.buffers())
        weights = sum(t.numel() * t.element_size() for t in tensors)
        dtype = next(self.model.parameters()).dtype
        item = torch.empty((), dtype=dtype).element_size()
        text = self.config
        vision = 0
        if self.processor is not None and n_images:
            v = self.model.config.vision
            side = self.processor.image_processor.size
            patches = (side // v.patch_size) ** 2
            vision = (min(n_images, VISION_BATCH) * patches * 3 * (v.hidden_size + v.intermediate_size) * item
                      + n_images * (3 * side * side * 4 + self.processor.tokens_per_image * text.hidden_size * item))
        chunk = min(tokens, PREFILL_CHUNK)
        prefill = tokens * text.hidden_size * item + chunk * (text.num_attention_heads * tokens * 4
                                                             + 2 * text.intermediate_size * item)
        return MemoryEstimate(weights, vision, KVCache.bytes_needed(text, 1, tokens, dtype), prefill)

    def recipe_prompt(self, recipe: str, question: str | None = None, *, max_new_tokens: int = 256,
                      context: int | None = None, **sources: Any) -> recipes.RecipePrompt:
        """Messages for a recipe ("ct", "mri", "wsi", "longitudinal", "localize"), budget-checked before any pixel
        is decoded; `sources` are recipes.build's (source, prior, current, instruction, max_slices, series,
        tissue, procedure)."""
        return recipes.build(recipe, question, budget=lambda n: self.check_budget(recipe, n, max_new_tokens, context),
                             **sources)

    def ask(self, recipe: str, question: str | None = None, *, source: Any = None, prior: Any = None,
            current: Any = None, instruction: str | None = None, max_slices: int = recipes.MAX_SLICES,
            series: str | None = None, tissue: str | None = None, procedure: str | None = None,
            **sampling: Any) -> RecipeResult:
        """One answer to a recipe prompt, e.g. `pipe.ask("ct", "Any liver lesion?", source="series/")`,
        `pipe.ask("wsi", source="slide.svs", tissue="colon", procedure="biopsy")` or
        `pipe.ask("localize", "right clavicle", source="cxr.png").boxes` (pixels of the original image)."""
        if recipe == "wsi" and max_slices == recipes.MAX_SLICES:
            max_slices = recipes.RECIPES["wsi"].max_images
        prompt = self.recipe_prompt(recipe, question, max_new_tokens=sampling.get("max_new_tokens", 256),
                                    source=source, prior=prior, current=current, instruction=instruction,
                                    max_slices=max_slices, series=series, tissue=tissue, procedure=procedure)
        completion = self.complete([prompt.messages], **sampling)[0]
        boxes = answer_boxes(completion.text, prompt.padding) if prompt.padding is not None else None
        return RecipeResult(completion.text, completion.reasoning, boxes, prompt, completion)

    # -- structured outputs ---------------------------------------------------------------------------
    @property
    def grammars(self) -> Grammars:
        """This tokenizer's grammar compiler and cache (engine/constraints.py), built at first use."""
        if self._grammars is None:
            self._grammars = Grammars(self.tokenizer, self.config.vocab_size, self.tokenizer.stop_ids)
        return self._grammars

    def constraint(self, *, json_schema: dict[str, Any] | str | None = None, regex: str | None = None,
                   choice: list[str] | None = None, grammar: str | None = None) -> Grammar | None:
        """The compiled output constraint (at most one of them), or None; InputError when it is invalid.

        json_schema: a JSON Schema (dict or JSON text); regex: the whole output matches it; choice: the
        output is exactly one of the strings; grammar: a Lark or GBNF grammar (llguidance's syntax).
        """
        spec = Constraint.from_options(json_schema=json_schema, regex=regex, choice=choice, grammar=grammar)
        return None if spec is None else self.grammars.compile(spec)

    def sampling(self, **kwargs: Any) -> SamplingParams:
        """SamplingParams from generate()'s keyword arguments (an output constraint compiled here)."""
        stop = kwargs.pop("stop", None) or ()
        constrain = {k: kwargs.pop(k) for k in ("json_schema", "regex", "choice", "grammar") if k in kwargs}
        if "constraint" not in kwargs:
            kwargs["constraint"] = self.constraint(**constrain)
        elif constrain:
            raise InputError("give either constraint= or json_schema/regex/choice/grammar, not both")
        return SamplingParams(stop=tuple([stop] if isinstance(stop, str) else stop), **kwargs)

    # -- generation -----------------------------------------------------------------------------------
    def complete(self, prompts: list[Prompt], *, raw: bool = False, system: str | None = None,
                 **sampling: Any) -> list[Completion]:
        """Completions with token counts and timings, one per prompt, batched. A thought trace the model
        wrote is in `Completion.reasoning`, never in `.text`."""
        params = self.sampling(**sampling)
        ids, extra = self._batch_inputs(prompts, raw, system)
        if self.draft is not None and extra is None:
            from medgem.engine.scheduler import Request

            requests = [Request(p, params) for p in ids]  # queued together, batched by the scheduler
            done = {e.request_id: e.completion for e in self._draft_scheduler().drive(requests) if e.done}
            completions = [done[r.request_id] for r in requests]
        else:
            completions = self.engine.run(ids, [params] * len(ids), extra)
        for completion in completions:
            completion.reasoning, completion.text = split_thought(completion.text)
        return completions

    def generate(self, prompt: Prompt, **kwargs: Any) -> str:
        """The completion's text. kwargs: SamplingParams fields (max_new_tokens, temperature, top_p, seed,
        stop, logit_bias, ...), `raw`, `system`, and one output constraint: `json_schema=`, `regex=`,
        `choice=` or `grammar=` (see `constraint`)."""
        return self.complete([prompt], **kwargs)[0].text

    def generate_batch(self, prompts: list[Prompt], **kwargs: Any) -> list[str]:
        return [c.text for c in self.complete(prompts, **kwargs)]

    def stream(self, prompt: Prompt, *, raw: bool = False, system: str | None = None,
               **sampling: Any) -> Iterator[str]:
        """Answer pieces as they are generated (a thought trace is held back); `self.last_completion` holds
        the accounting afterwards, with the thought in `.reasoning`."""
        params = self.sampling(**sampling)
        ids, extra = self._batch_inputs([prompt], raw, system)
        splitter = ThoughtSplitter()
        for event in self.events(ids[0], params, extra):
            _, answer = splitter.feed(event.text, final=event.done)
            if answer:
                yield answer
            if event.done:
                completion = event.completion
                completion.reasoning, completion.text = split_thought(completion.text)
                self.last_completion = completion

    def events(self, ids: list[int], params: SamplingParams, extra: dict | None = None) -> Iterator[StreamEvent]:
        """Generation events for one prompt of token ids: through the speculative scheduler when `use_draft`
        or `use_prompt_lookup` set a drafter (text prompts), else the generator. `medgem bench` times these."""
        if self.draft is not None and extra is None:
            from medgem.engine.scheduler import Request

            return self._draft_scheduler().drive([Request(ids, params)])
        return self.engine.stream([ids], [params], extra)

    # -- scoring --------------------------------------------------------------------------------------
    @torch.inference_mode()
    def score(self, prompt: str, continuations: list[str]) -> list[float]:
        """Sum of log-probabilities of each continuation after a raw prompt (for multiple choice).

        All options run as one right-padded batch: attention is causal, so padding after an option
        never reaches its tokens, and the forward reads the weights once instead of once per option.
        """
        context = self.tokenizer.encode(prompt, add_bos=True)
        options = [self.tokenizer.encode(cont, add_bos=False) for cont in continuations]
        if not options or any(not ids for ids in options):
            raise InputError("an answer option is empty")
        rows = [context + ids for ids in options]
        width = max(map(len, rows))
        batch = torch.tensor([row + [self.tokenizer.pad_id] * (width - len(row)) for row in rows])
        logprobs = torch.log_softmax(self.model(batch).float(), dim=-1)
        scores = []
        for i, ids in enumerate(options):
            picked = logprobs[i, len(context) - 1:len(context) - 1 + len(ids)].gather(-1, torch.tensor(ids)[:, None])
            scores.append(float(picked.sum()))
        return scores


def load(src: str | Path | None = None, *, mmproj: str | Path | None = None, dtype: str | None = None,
         device: str = "cpu", quant: str | None = None) -> Pipeline:
    """Load a model: None for the embedded Gemma 3 270M, an HF folder, a .gguf file, or a hub id.

    A multimodal HF folder (config.json with a vision_config), or a .gguf with its llama.cpp `mmproj`
    file, loads the vision tower too, so prompts may carry images. `quant` ("int8", "int4") quantizes
    the text decoder's weights for faster CPU decoding (activations then run in bf16); "gguf" keeps a GGUF's
    quantized blocks as the file stores them. By default a CPU load with no dtype asked for uses gguf for a
    GGUF over 1 GiB and int8 otherwise (`default_quant`); asking for a dtype, or another device, keeps dense
    weights.
    """
    check_device(device)
    if quant is not None and quant not in QUANT_MODES:
        raise InputError(f"unknown quantization {quant!r}; choose one of {', '.join(QUANT_MODES)}")
    if quant not in (None, "none") and device != "cpu":
        raise InputError("int8/int4 weight-only kernels are CPU kernels; use --quant none on GPUs")
    start = time.perf_counter()
    path = resolve_source(src)
    if quant is None:
        quant = default_quant(path, device, dtype)
    multimodal = mmproj is not None or (path.is_dir() and is_multimodal_hf_config(hf.read_config(path)))
    if multimodal:
        model, info = load_multimodal_model(path, dtype, device, mmproj)
        text_config = model.text_config
        if quant != "none":
            quantize_text_model(model.language_model, quant)
        if quant != "none" and dtype is None and ckernel.native_bf16():
            # The quantized decoder reads bf16 activations anyway; an 896 px So400m image takes about half the
            # float32 time in bf16 on such a CPU, its projected features within a cosine of 0.9999
            # (benchmarks/encode.py, BENCHMARKS.md). Elsewhere bf16 is emulated and slower than float32.
            model.vision_tower.to(torch.bfloat16)
            model.multi_modal_projector.to(torch.bfloat16)
    elif quant != "none":  # straight from the file into int8/int4, a slice of rows at a time
        cfg, tensors, info = open_text_checkpoint(path)
        model = load_quantized_text_model(cfg, tensors, quant, path.name)
        text_config = model.config
    else:
        model, info = load_text_model(path, dtype, device)
        text_config = model.config
    if info["format"] == "gguf":
        tokenizer = Tokenizer.from_gguf(info["reader"], medgem_home() / "tokenizers")
    else:
        tokenizer = Tokenizer.from_folder(path)
    processor = None
    if multimodal:
        processor = MultimodalProcessor.for_model(tokenizer, model.config, info.get("preprocessor_config"))
    name = "embedded Gemma 3 270M (general, not medical)" if src is None else str(src)
    log.info("loaded %s in %.1f s", name, time.perf_counter() - start)
    pipe = Pipeline(model, tokenizer, text_config, name, time.perf_counter() - start, processor)
    pipe.base_model = is_base_model(path, info)
    return pipe


# A GGUF bigger than this keeps its own blocks by default (quant "gguf"): its weights stream from DRAM every
# token, so bytes read decide decode speed, and re-rounding a 4B's 2.5 GB of Q4_K to int8 took 65 s a start
# and read 1.7x the bytes a token. Smaller models sit in the CPU's cache, where int8 panels run fastest
# (the 270M: 85-89 tok/s int8 against 64-70 on its own blocks, AVX-512 VNNI, 2026-12-04).
FILE_BLOCKS_MIN_BYTES = 1 << 30


def default_quant(path: Path, device: str, dtype: str | None) -> str:
    """--quant's default: none off the CPU or when a dtype is asked for; else gguf for a big GGUF whose
    blocks the kernel reads, int8 otherwise."""
    if device != "cpu" or dtype is not None:
        return "none"
    big_gguf = path.suffix == ".gguf" and path.is_file() and path.stat().st_size > FILE_BLOCKS_MIN_BYTES
    return "gguf" if big_gguf and blocks.available() else "int8"


def is_base_model(path: Path, info: dict[str, Any]) -> bool:
    """Whether a checkpoint is pretrained only (chat prompts then give repetitive text), from what it says of
    itself: llama.cpp's converter writes `general.finetune` ("it", "instruct") for tuned models, and names of
    Google's checkpoints end in -it or -pt. Unknown folders count as tuned, so no one is told wrongly."""
    tuned, base = r"(^|[-_.])(it|instruct|chat)([-_.]|$)", r"(^|[-_.])(pt|base)([-_.]|$)"
    name = path.name.lower()
    finetune = str((info.get("metadata") or {}).get("general.finetune", "")).lower()
    if re.search(tuned, name) or re.search(tuned, f"-{finetune}-"):
        return False
    return info.get("format") == "gguf" and not finetune or bool(re.search(base, name))


DRAFT_TOKENS = {"lookup": 8, "model": 4}  # default tokens a step: copying is cheap, a draft model is not


def add_draft(pipe: Pipeline, draft: str, k: int | None = None, **load_options: Any) -> None:
    """The --draft flag: "lookup" (prompt lookup, no model), "embedded" (the embedded 270M) or a model
    source loaded with `load_options` (dtype, device, quant), for speculative decoding of `pipe`."""
    kind = "lookup" if draft == "lookup" else "model"
    k = DRAFT_TOKENS[kind] if k is None else k
    if kind == "lookup":
        pipe.use_prompt_lookup(k)
    else:
        pipe.use_draft(load(None if draft == "embedded" else draft, **load_options), k)


__all__ = ["Pipeline", "RecipeResult", "add_draft", "load", "resolve_source"]
