"""Gemma tokenizer and chat format, on `sentencepiece` (GGUF vocabularies, tokenizer.model) or the
`tokenizers` library (tokenizer.json).

A GGUF stores the pieces and types of Gemma's SentencePiece-BPE model but not the model file. It is
rebuilt as a SentencePiece model whose merge priority is token order, which is how Gemma's vocabulary
was ranked. sentencepiece holds the 262k-piece vocabulary in about 60 MB, against about 300 MB for the
equivalent `tokenizers` BPE (which `tokenizer_from_gguf_fields` still builds, for tokenizer.json
exports). The rebuilt model is cached by GGUF file key so later loads skip parsing the vocabulary.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from medgem import cache
from medgem.errors import CheckpointError, InputError

if TYPE_CHECKING:
    from medgem.weights.gguf_reader import GGUFIndex

BOS, EOS, PAD, UNK = "<bos>", "<eos>", "<pad>", "<unk>"
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
START_OF_IMAGE, END_OF_IMAGE, IMAGE_SOFT_TOKEN = "<start_of_image>", "<end_of_image>", "<image_soft_token>"
IMAGE_SOFT_TOKEN_ID = 262_144  # multimodal Gemma 3 appends it after the 262,144-piece vocabulary

# GGUF token types (llama.cpp): 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED = 1, 2, 3, 4
_BYTE_PIECE = re.compile(r"<0x[0-9A-Fa-f]{2}>")


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


def sentencepiece_model_from_gguf_fields(tokens: list[str], types: list[int], special: dict[str, int],
                                         unk_id: int) -> bytes:
    """A serialized SentencePiece BPE ModelProto equal to the one the GGUF vocabulary came from.

    Gemma's normalizer is the identity with spaces escaped as U+2581 and no dummy prefix; digits are
    split; pieces of whitespace only are allowed. A normal piece's score is minus its index, so earlier
    pieces merge first.
    """
    from sentencepiece import sentencepiece_model_pb2 as sp_pb

    model = sp_pb.ModelProto()
    trainer = model.trainer_spec
    trainer.model_type = sp_pb.TrainerSpec.BPE
    trainer.vocab_size = len(tokens)
    trainer.byte_fallback = trainer.split_digits = trainer.allow_whitespace_only_pieces = True
    trainer.split_by_whitespace = False
    trainer.bos_id, trainer.eos_id, trainer.pad_id = special["bos_id"], special["eos_id"], special["pad_id"]
    trainer.unk_id = unk_id
    norm = model.normalizer_spec
    norm.name, norm.add_dummy_prefix, norm.remove_extra_whitespaces, norm.escape_whitespaces = "identity", False, False, True
    types = list(types) or [_NORMAL] * len(tokens)
    for index, (token, kind) in enumerate(zip(tokens, types, strict=True)):
        piece = model.pieces.add()
        # llama.cpp spells whitespace-run pieces with real spaces; the model matches them as "▁▁...".
        piece.piece = "\u2581" * len(token) if token and not token.strip(" ") else token
        piece.type = _UNKNOWN if index == unk_id else kind  # llama.cpp marks <unk> as a control piece
        piece.score = -float(index) if kind == _NORMAL else 0.0
    return model.SerializeToString()


def _special_ids(get) -> dict[str, int]:
    """bos/eos/pad ids from GGUF metadata (`get(key, default)`)."""
    return dict(
        bos_id=int(get("tokenizer.ggml.bos_token_id", 2)),
        eos_id=int(get("tokenizer.ggml.eos_token_id", 1)),
        pad_id=int(get("tokenizer.ggml.padding_token_id", 0)),
    )


class _SentencePieceBackend:
    """Adapts sentencepiece to the subset of the `tokenizers` API we use; special tokens split out first."""

    def __init__(self, model: Path | bytes):
        """`model`: a tokenizer.model path, or a serialized ModelProto."""
        import sentencepiece as spm

        if isinstance(model, bytes):
            self.sp = spm.SentencePieceProcessor(model_proto=model)
        else:
            self.sp = spm.SentencePieceProcessor(model_file=str(model))
        specials = [self.sp.id_to_piece(i) for i in range(self.sp.get_piece_size())
                    if self.sp.is_control(i) or self.sp.is_unknown(i)]
        specials = [s for s in specials if s]
        self._split = re.compile("(" + "|".join(map(re.escape, sorted(specials, key=len, reverse=True))) + ")")
        self._special_ids = {self.sp.piece_to_id(s) for s in specials}

    def encode_ids(self, text: str) -> list[int]:
        ids: list[int] = []
        for part in self._split.split(text):
            if not part:
                continue
            sid = self.sp.piece_to_id(part)
            special = sid in self._special_ids and self.sp.id_to_piece(sid) == part
            ids.extend([sid] if special else self.sp.encode(part))
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

    def pieces(self) -> list[tuple[str, bool]]:
        """(piece, special) per id: control, unknown and unused pieces are special."""
        sp = self.sp
        return [(sp.id_to_piece(i), sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i))
                for i in range(sp.get_piece_size())]


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

    def pieces(self) -> list[tuple[str, bool]]:
        special = {i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}
        return [(self.tok.id_to_token(i) or "", i in special) for i in range(self.tok.get_vocab_size())]


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
    def from_gguf(cls, index: GGUFIndex, cache_dir: Path | None = None) -> Tokenizer:
        """From a `weights.gguf_reader.GGUFIndex`, whose cached SentencePiece model is found by file key
        without parsing the vocabulary again."""
        cached = cache_dir / f"sp-v1-{index.key}.model" if cache_dir is not None else None
        hit = cache.read(cached) if cached is not None else None
        if hit is not None:
            return cls(_SentencePieceBackend(hit), **_special_ids(index.metadata.get))
        field = index.fields.get
        if field("tokenizer.ggml.tokens") is None:
            raise CheckpointError("GGUF file has no tokenizer vocabulary (tokenizer.ggml.tokens)")
        model_kind = field("tokenizer.ggml.model", "llama")
        if model_kind != "llama":
            raise CheckpointError(f"GGUF tokenizer model {model_kind!r} is not a Gemma SentencePiece vocabulary")

        proto = sentencepiece_model_from_gguf_fields(
            field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type", []), _special_ids(field),
            int(field("tokenizer.ggml.unknown_token_id", 3)),
        )
        if cached is not None:
            cache.write(cached, proto)
        return cls(_SentencePieceBackend(proto), **_special_ids(field))

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

    def token_bytes(self) -> list[tuple[bytes, bool]]:
        """(UTF-8 bytes the token decodes to, special) per id, for grammar engines that match bytes.

        Gemma's pieces spell a space as U+2581 and a byte-fallback piece as `<0xAB>`. A special piece
        (control, unknown, unused) keeps its name: it never decodes to text.
        """
        out = []
        for piece, special in self._backend.pieces():
            if special:
                out.append((piece.encode(), True))
            elif _BYTE_PIECE.fullmatch(piece):
                out.append((bytes([int(piece[3:5], 16)]), False))
            else:
                out.append((piece.replace("\u2581", " ").encode(), False))
        return out

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
