"""Gemma tokenizer and chat format, on the `tokenizers` library (or `sentencepiece` for tokenizer.model).

Sources: an HF `tokenizer.json`, a SentencePiece `tokenizer.model`, or the vocabulary inside a GGUF.
A GGUF stores tokens, scores and types but no merges; Gemma's BPE merges are recovered from the
vocabulary, ranked by token order (Gemma's scores do not follow merge order). The built tokenizer is
cached as tokenizer.json next to the model cache so later loads take milliseconds.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

from medgem.errors import CheckpointError, InputError

BOS, EOS, PAD, UNK = "<bos>", "<eos>", "<pad>", "<unk>"
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
START_OF_IMAGE, END_OF_IMAGE, IMAGE_SOFT_TOKEN = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
IMAGE_SOFT_TOKEN_ID = 262_144  # multimodal Gemma 3 appends it after the 262,144-piece vocabulary

# GGUF token types (llama.cpp): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
_CONTROL, _USER_DEFINED = 3, 4


def _bpe_merges(tokens: list[str]) -> list[tuple[str, str]]:
    """Merges implied by a SentencePiece-BPE vocabulary: every split of a token into two known pieces,
    ranked by the token's position (earlier = merged first), longer left piece first on ties."""
    index = {tok: i for i, tok in enumerate(tokens)}
    merges: list[tuple[int, int, int, str, str]] = []
    for rank, tok in enumerate(tokens):
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            li, ri = index.get(left), index.get(right)
            if li is not None and ri is not None:
                merges.append((rank, -len(left), -len(right), left, right))
    merges.sort(key=lambda m: m[:3])
    return [(m[3], m[4]) for m in merges]


def tokenizer_from_gguf_fields(tokens: list[str], types: list[int], unk_id: int):
    """A `tokenizers.Tokenizer` equivalent to the Gemma SentencePiece model the GGUF was made from."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE

    # llama.cpp spells whitespace-run pieces with real spaces; the model matches them as "▁▁...".
    tokens = ["\u2581" * len(t) if t and not t.strip(" ") else t for t in tokens]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    model = BPE(
        vocab=vocab, merges=_bpe_merges(tokens), unk_token=tokens[unk_id], fuse_unk=True, byte_fallback=True
    )
    tok = Tokenizer(model)
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(
        [AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types) if ty == _CONTROL]
    )
    tok.add_tokens(
        [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types) if ty == _USER_DEFINED]
    )
    return tok


def _special_ids(get) -> dict[str, int]:
    """bos/eos/pad ids from GGUF metadata (`get(key, default)`)."""
    return dict(
        bos_id=int(get("tokenizer.ggml.bos_token_id", 2)),
        eos_id=int(get("tokenizer.ggml.eos_token_id", 1)),
        pad_id=int(get("tokenizer.ggml.padding_token_id", 0)),
    )


class _SentencePieceBackend:
    """Adapts sentencepiece to the subset of the `tokenizers` API we use; special tokens split out first."""

    def __init__(self, path: Path):
        import sentencepiece as spm

        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        specials = [self.sp.id_to_piece(i) for i in range(self.sp.get_piece_size()) if self.sp.is_control(i)]
        specials = [s for s in specials if s]
        self._split = re.compile("(" + "|".join(map(re.escape, sorted(specials, key=len, reverse=True))) + ")")
        self._special_ids = {self.sp.piece_to_id(s) for s in specials}

    def encode_ids(self, text: str) -> list[int]:
        ids: list[int] = []
        for part in self._split.split(text):
            if not part:
                continue
            sid = self.sp.piece_to_id(part)
            ids.extend([sid] if sid in self._special_ids else self.sp.encode(part))
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_ids]
        out, run = [], []
        for i in ids:  # sentencepiece drops control pieces when decoding; keep them visible
            if i in self._special_ids:
                out.append(self.sp.decode(run))
                out.append(self.sp.id_to_piece(i))
                run = []
            else:
                run.append(i)
        out.append(self.sp.decode(run))
        return "".join(out)

    def token_to_id(self, token: str) -> int | None:
        i = self.sp.piece_to_id(token)
        return None if i == self.sp.unk_id() and token != self.sp.id_to_piece(i) else i

    def get_vocab_size(self) -> int:
        return self.sp.get_piece_size()


class _TokenizersBackend:
    def __init__(self, tok):
        self.tok = tok

    def encode_ids(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)

    def get_vocab_size(self) -> int:
        return self.tok.get_vocab_size()


class Tokenizer:
    """Gemma tokenizer: encode/decode, special-token ids and the chat template."""

    def __init__(self, backend, bos_id: int = 2, eos_id: int = 1, pad_id: int = 0):
        self._backend = backend
        self.bos_id, self.eos_id, self.pad_id = bos_id, eos_id, pad_id
        tid = backend.token_to_id
        self.start_of_turn_id = tid(START_OF_TURN)
        self.end_of_turn_id = tid(END_OF_TURN)
        self.start_of_image_id = tid(START_OF_IMAGE)
        self.end_of_image_id = tid(END_OF_IMAGE)
        self.image_soft_token_id = tid(IMAGE_SOFT_TOKEN) or IMAGE_SOFT_TOKEN_ID
        self.stop_ids = tuple(i for i in (self.eos_id, self.end_of_turn_id) if i is not None)

    # -- construction -------------------------------------------------------------------------------
    @classmethod
    def from_gguf(cls, source, cache_dir: Path | None = None) -> Tokenizer:
        """From a `gguf.GGUFReader`, or a `weights.gguf_reader.GGUFIndex` (whose cached tokenizer is found
        by file key without parsing the vocabulary again)."""
        from tokenizers import Tokenizer as HFTokenizer

        index_key = getattr(source, "key", None)
        cached = cache_dir / f"tokenizer-{index_key}.json" if cache_dir is not None and index_key else None
        if cached is not None and cached.is_file():
            meta = source.metadata
            return cls(_TokenizersBackend(HFTokenizer.from_file(str(cached))), **_special_ids(meta.get))
        fields = source.reader.fields if index_key else source.fields
        if "tokenizer.ggml.tokens" not in fields:
            raise CheckpointError("GGUF file has no tokenizer vocabulary (tokenizer.ggml.tokens)")
        model_kind = fields["tokenizer.ggml.model"].contents() if "tokenizer.ggml.model" in fields else "llama"
        if model_kind != "llama":
            raise CheckpointError(f"GGUF tokenizer model {model_kind!r} is not a Gemma SentencePiece vocabulary")

        def field(key: str, default: Any = None) -> Any:
            return fields[key].contents() if key in fields else default

        tokens = field("tokenizer.ggml.tokens")
        types = field("tokenizer.ggml.token_type", [])
        if cached is None and cache_dir is not None:
            digest = hashlib.sha256(json.dumps([tokens, types]).encode()).hexdigest()[:16]
            cached = cache_dir / f"tokenizer-{digest}.json"
        if cached is not None and cached.is_file():
            return cls(_TokenizersBackend(HFTokenizer.from_file(str(cached))), **_special_ids(field))
        tok = tokenizer_from_gguf_fields(tokens, types, int(field("tokenizer.ggml.unknown_token_id", 3)))
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            partial = cached.with_suffix(".partial")
            tok.save(str(partial))
            partial.replace(cached)
        return cls(_TokenizersBackend(tok), **_special_ids(field))

    @classmethod
    def from_folder(cls, folder: Path) -> Tokenizer:
        """From tokenizer.json (preferred) or tokenizer.model in an HF checkpoint folder."""
        from tokenizers import Tokenizer as HFTokenizer

        special: dict[str, Any] = {}
        cfg_path = folder / "tokenizer_config.json"
        if cfg_path.is_file():
            special = json.loads(cfg_path.read_text())
        if (folder / "tokenizer.json").is_file():
            backend: Any = _TokenizersBackend(HFTokenizer.from_file(str(folder / "tokenizer.json")))
        elif (folder / "tokenizer.model").is_file():
            backend = _SentencePieceBackend(folder / "tokenizer.model")
        else:
            raise CheckpointError(f"{folder} has no tokenizer.json or tokenizer.model")

        def token_id(name: str, default: str, fallback: int) -> int:
            value = special.get(name, default)
            text = value.get("content") if isinstance(value, dict) else value
            found = backend.token_to_id(text) if text else None
            return fallback if found is None else found

        return cls(
            backend,
            bos_id=token_id("bos_token", BOS, 2),
            eos_id=token_id("eos_token", EOS, 1),
            pad_id=token_id("pad_token", PAD, 0),
        )

    # -- encoding -----------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size()

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids; special tokens written in the text (e.g. <start_of_turn>) map to their ids."""
        if not isinstance(text, str):
            raise InputError(f"text to encode must be a string, got {type(text).__name__}")
        ids = self._backend.encode_ids(text)
        return [self.bos_id, *ids] if add_bos else ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._backend.decode(list(map(int, ids)), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    # -- chat format --------------------------------------------------------------------------------
    def apply_chat_template(
        self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, tokenize: bool = False
    ) -> str | list[int]:
        """Gemma's turn format. A system message is folded into the first user turn; `assistant` is
        written as `model`; an image part becomes `<start_of_image>` (the image processor expands it)."""
        text = render_chat(messages, add_generation_prompt)
        return self.encode(text, add_bos=False) if tokenize else text


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content.strip()
    if not isinstance(content, list):
        raise InputError(f"{where}: content must be a string or a list of parts")
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            parts.append(str(part.get("text", "")).strip())
        elif kind in ("image", "image_url"):
            parts.append(START_OF_IMAGE)
        else:
            raise InputError(f"{where}: unknown content part type {kind!r} (expected 'text' or 'image')")
    return "".join(parts)


def render_chat(messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
    """The Gemma 3 chat string, starting with <bos>."""
    if not isinstance(messages, list) or not messages:
        raise InputError("messages must be a non-empty list")
    out = [BOS]
    system = ""
    turns = list(messages)
    if isinstance(turns[0], dict) and turns[0].get("role") == "system":
        system = _content_text(turns.pop(0).get("content", ""), "system message") + "\n\n"
    expected = "user"
    for i, msg in enumerate(turns):
        if not isinstance(msg, dict) or "role" not in msg:
            raise InputError(f"message {i}: must be an object with 'role' and 'content'")
        role = {"assistant": "model"}.get(msg["role"], msg["role"])
        if role not in ("user", "model"):
            raise InputError(f"message {i}: role {msg['role']!r} is not user, assistant or system")
        if role != expected:
            raise InputError(f"message {i}: roles must alternate user/assistant (got {msg['role']!r})")
        expected = "model" if role == "user" else "user"
        body = _content_text(msg.get("content", ""), f"message {i}")
        prefix = system if i == 0 else ""
        out.append(f"{START_OF_TURN}{role}\n{prefix}{body}{END_OF_TURN}\n")
    if add_generation_prompt:
        out.append(f"{START_OF_TURN}model\n")
    return "".join(out)
