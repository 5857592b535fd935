"""SFT data: JSONL lines -> token ids with labels on what the model should learn to write.

Each line is one of:
- `{"messages": [...]}` in the chat shape of DESIGN.md, images by path (PNG, JPEG or DICOM, relative
  to the JSONL file) or data: URL; the loss covers every assistant turn, its closing `<end_of_turn>`
  included, and nothing else;
- `{"prompt": "...", "completion": "..."}`: a raw completion without the chat template (`<bos>`, the
  prompt, the completion, `<eos>`; loss on the completion and `<eos>`), the way a base model is
  prompted.

Pieces are tokenised one by one and concatenated, so the prompt of a turn has exactly the ids it gets
at generation time. Padding, `<start_of_image>` and image soft tokens never carry a label (as in the
reference MedGemma recipe). Lines that do not parse or do not fit the shape are errors naming the
line number; text is never quoted in messages or logs.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from medgem.errors import CapabilityError, InputError, MedgemError
from medgem.inputs.text import jsonl_objects, read_text
from medgem.processing.multimodal import MultimodalProcessor, image_source, message_images, to_rgb_image
from medgem.processing.tokenizer import START_OF_IMAGE, Tokenizer, render_chat

log = logging.getLogger(__name__)

IGNORE = -100  # the label of a token that carries no loss (PyTorch's cross-entropy default)


@dataclass
class Example:
    """One tokenised training sequence; `images` are reprocessed into pixels when batched."""

    input_ids: list[int]
    labels: list[int]
    images: list[Any] = field(default_factory=list)
    line: int = 0

    @property
    def n_labels(self) -> int:
        return sum(label != IGNORE for label in self.labels[1:])  # the first token is never predicted

    def __len__(self) -> int:
        return len(self.input_ids)


# -- lines -> pieces ---------------------------------------------------------------------------------


def _resolve_images(messages: list[dict[str, Any]], root: Path) -> list[dict[str, Any]]:
    """Copies of the messages with relative image paths made absolute (relative to the JSONL file)."""
    out = []
    for msg in messages:
        content = msg.get("content") if isinstance(msg, dict) else None
        if not isinstance(content, list):
            out.append(msg)
            continue
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") in ("image", "image_url"):
                src = image_source(part)
                if isinstance(src, str) and not Path(src).is_absolute():
                    src = str(root / src)
                if isinstance(src, str) and not Path(src).is_file():
                    raise InputError(f"image file not found: {src}")
                part = {"type": "image", "image": src}
            parts.append(part)
        out.append({**msg, "content": parts})
    return out


def conversation_pieces(messages: list[dict[str, Any]]) -> list[tuple[str, bool]]:
    """(text, trained) pieces of a chat: each assistant turn's body and `<end_of_turn>` are trained.

    Each piece is what render_chat adds for one more message, so the template is written once (in
    processing/tokenizer.py) and the prompt before a turn is exactly its generation prompt.
    """
    pieces: list[tuple[str, bool]] = []
    done = ""
    for j, msg in enumerate(messages):
        if msg.get("role") != "assistant":
            continue
        prompt = render_chat(messages[:j], add_generation_prompt=True)
        full = render_chat(messages[: j + 1], add_generation_prompt=False)
        body = full[len(prompt):].removesuffix("\n")  # "<answer><end_of_turn>"; the newline is context
        pieces += [(prompt[len(done):], False), (body, True)]
        done = prompt + body
    if not pieces:
        raise InputError("the conversation has no assistant turn to learn")
    return pieces


class Encoder:
    """Turns parsed lines into Examples for one model's tokenizer (and image processor, if any)."""

    def __init__(self, tokenizer: Tokenizer, processor: MultimodalProcessor | None = None):
        self.tokenizer = tokenizer
        self.processor = processor
        self.no_label = {tokenizer.pad_id, tokenizer.start_of_image_id, tokenizer.image_soft_token_id}
        if processor is not None:
            self.no_label.add(processor.image_token_id)

    def encode_pieces(self, pieces: Sequence[tuple[str, bool]], images: list[Any]) -> Example:
        ids: list[int] = []
        labels: list[int] = []
        queue = list(images)
        for text, trained in pieces:
            n = text.count(START_OF_IMAGE)
            if n and self.processor is None:
                raise CapabilityError("the data has images but the model has no vision tower; load a "
                                      "multimodal checkpoint (an HF MedGemma folder, or a GGUF with --mmproj)")
            if n:
                # Pixels are dropped here and made again when the example is batched, to bound memory.
                piece = self.processor(text, queue[:n]).input_ids[0].tolist()
                queue = queue[n:]
            else:
                piece = self.tokenizer.encode(text, add_bos=False)
            ids += piece
            labels += [t if trained and t not in self.no_label else IGNORE for t in piece]
        return Example(ids, labels, list(images))

    def encode(self, record: dict[str, Any], root: Path) -> Example:
        """One parsed JSONL object -> Example (InputError if it has neither shape)."""
        if "messages" in record:
            messages = record["messages"]
            if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
                raise InputError("'messages' must be a non-empty list of objects")
            messages = _resolve_images(messages, root)
            return self.encode_pieces(conversation_pieces(messages), message_images(messages))
        prompt, completion = record.get("prompt"), record.get("completion")
        if isinstance(prompt, str) and isinstance(completion, str):
            if not completion:
                raise InputError("'completion' is empty")
            bos, eos = (self.tokenizer.decode([i]) for i in (self.tokenizer.bos_id, self.tokenizer.eos_id))
            return self.encode_pieces([(bos + prompt, False), (completion + eos, True)], [])
        raise InputError("a line needs 'messages', or 'prompt' and 'completion' strings")

    def pixel_values(self, examples: Sequence[Example]) -> torch.Tensor | None:
        """Pixels of every image of the examples, in reading order (the model fills soft tokens so)."""
        sources = [src for ex in examples for src in ex.images]
        if not sources:
            return None
        pixels, _ = self.processor.image_processor([to_rgb_image(src) for src in sources])
        return pixels


# -- files -------------------------------------------------------------------------------------------


def read_records(path: str | Path) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) for every line of a JSONL file: the size, UTF-8, depth and JSON checks, done
    before a model is loaded so a bad file fails in milliseconds."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"training data not found: {path}")
    return list(jsonl_objects(read_text(path), lambda n: f"{path.name} line {n}"))


def encode_records(path: str | Path, records: list[tuple[int, dict[str, Any]]], encoder: Encoder,
                   max_len: int) -> list[Example]:
    """The records of `path` (read_records) as Examples; a bad line raises InputError naming its number.

    Examples longer than `max_len` tokens are skipped with a warning (their answers would be cut).
    """
    path = Path(path)
    examples, too_long = [], 0
    for number, record in records:
        try:
            ex = encoder.encode(record, path.parent)
        except MedgemError as exc:
            raise type(exc)(f"{path.name} line {number}: {exc}") from None
        ex.line = number
        if len(ex) > max_len:
            too_long += 1
            continue
        examples.append(ex)
    if too_long:
        log.warning("%s: skipped %d example(s) longer than max_len=%d tokens", path.name, too_long, max_len)
    if not examples:
        raise InputError(f"{path.name} has no usable examples" + (f" ({too_long} exceed max_len={max_len})"
                                                                   if too_long else ""))
    return examples


def read_jsonl(path: str | Path, encoder: Encoder, max_len: int) -> list[Example]:
    """Every line of a JSONL file as an Example (read_records, then encode_records)."""
    return encode_records(path, read_records(path), encoder, max_len)


def split(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A seeded (train, eval) split; eval takes `fraction` of the examples, at least one."""
    if not 0.0 < fraction < 1.0:
        raise InputError(f"eval fraction must be between 0 and 1, got {fraction}")
    if len(examples) < 2:
        raise InputError("need at least two examples to hold some out for evaluation")
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = max(1, round(len(examples) * fraction))
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def pack(examples: list[Example], max_len: int) -> list[Example]:
    """Concatenate examples into rows of at most `max_len` tokens (first fit, in order).

    Positions run on across a row, so later examples attend to earlier ones, as in classic packed
    SFT: attention masks here come from positions, which cannot separate documents within a row.
    Each example starts with its own <bos>, and labels never cross a boundary.
    """
    rows: list[Example] = []
    for ex in examples:
        for row in rows:
            if len(row) + len(ex) <= max_len:
                break
        else:
            row = Example([], [], [], ex.line)
            rows.append(row)
        row.input_ids += ex.input_ids
        row.labels += ex.labels  # an example's first token is prompt, never labelled
        row.images += ex.images
    return rows


@dataclass
class Batch:
    """Right-padded tensors for one micro-batch: padding has position -1 and no label."""

    input_ids: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor
    pixel_values: torch.Tensor | None

    @property
    def n_labels(self) -> int:
        return int((self.labels[:, 1:] != IGNORE).sum())


def collate(examples: Sequence[Example], pad_id: int, encoder: Encoder | None = None) -> Batch:
    width = max(len(ex) for ex in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE)
    positions = torch.full_like(ids, -1)
    for row, ex in enumerate(examples):
        n = len(ex)
        ids[row, :n] = torch.tensor(ex.input_ids)
        labels[row, :n] = torch.tensor(ex.labels)
        positions[row, :n] = torch.arange(n)
    pixels = encoder.pixel_values(examples) if encoder is not None else None
    return Batch(ids, labels, positions, pixels)
