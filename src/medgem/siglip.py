"""MedSigLIP as a tool: `medgem.load_siglip(src)` -> embed images and texts, classify zero-shot.

`SiglipTokenizer` reproduces transformers' `SiglipTokenizer` on the checkpoint's `spiece.model`:
lower-case, strip punctuation, collapse whitespace, SentencePiece, append `</s>`, then pad with the
pad token to the model's full text length (64 for MedSigLIP) because the model pools the last
position and was trained on padded texts. One deliberate difference: special-token strings typed in
a text (`</s>`) are plain text here, never control tokens.

Images go through `medgem.inputs.images.load_image` (PNG, JPEG, DICOM) and the SigLIP processor
(square resize, bicubic unless preprocessor_config.json says otherwise, values scaled to [-1, 1]).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import string
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from medgem.errors import CheckpointError, InputError
from medgem.inputs.images import ImageSource, load_image
from medgem.nn.siglip import SiglipModel
from medgem.processing.images import ImageProcessor
from medgem.weights import check_device, local_checkpoint
from medgem.weights.multimodal import read_preprocessor_config
from medgem.weights.siglip import load_siglip_model

DEFAULT_TEMPLATE = "a {} medical image"
_PUNCTUATION = str.maketrans("", "", string.punctuation)


class SiglipTokenizer:
    """Texts -> [N, max_length] token ids exactly as SigLIP was trained on them (see module docstring)."""

    def __init__(self, spiece_model: str | os.PathLike[str], max_length: int, *, lowercase: bool = True,
                 eos_token: str = "</s>", pad_token: str = "</s>"):
        import sentencepiece as spm

        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(spiece_model))
        except (OSError, RuntimeError) as exc:
            raise CheckpointError(f"{Path(spiece_model).name} is not a readable SentencePiece model: {exc}") from exc
        self.max_length, self.lowercase = max_length, lowercase
        self.eos_id, self.pad_id = self._id(eos_token), self._id(pad_token)

    def _id(self, piece: str) -> int:
        i = self.sp.piece_to_id(piece)
        if self.sp.id_to_piece(i) != piece:
            raise CheckpointError(f"the SentencePiece model has no {piece!r} token")
        return i

    @classmethod
    def from_folder(cls, folder: Path, max_length: int) -> SiglipTokenizer:
        """From spiece.model and (when present) tokenizer_config.json's lowercase/eos/pad settings."""
        model = folder / "spiece.model"
        if not model.is_file():
            raise CheckpointError(f"{folder.name} has no spiece.model (the SigLIP SentencePiece tokenizer)")
        settings: dict = {}
        config = folder / "tokenizer_config.json"
        if config.is_file():
            try:
                settings = json.loads(config.read_text())
            except json.JSONDecodeError as exc:
                raise CheckpointError(f"{config.name} is not valid JSON: {exc}") from exc

        def token(name: str) -> str:
            value = settings.get(name) or "</s>"
            return value["content"] if isinstance(value, dict) else str(value)

        return cls(model, max_length, lowercase=bool(settings.get("do_lower_case", True)),
                   eos_token=token("eos_token"), pad_token=token("pad_token"))

    def canonicalize(self, text: str) -> str:
        """big_vision's prompt canonicalisation: lower case, no punctuation, single spaces."""
        text = text.lower() if self.lowercase else text
        return re.sub(r"\s+", " ", text.translate(_PUNCTUATION)).strip()

    def encode(self, text: str) -> list[int]:
        """Ids of one text with its `</s>`, cut to max_length (the end token always kept)."""
        if not isinstance(text, str):
            raise InputError(f"a text must be a string, got {type(text).__name__}")
        return self.sp.encode(self.canonicalize(text))[: self.max_length - 1] + [self.eos_id]

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        rows = [self.encode(t) for t in texts]
        return torch.tensor([r + [self.pad_id] * (self.max_length - len(r)) for r in rows], dtype=torch.long)


def _chunks(items: Sequence, size: int) -> Iterable[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


class SiglipEncoder:
    """A loaded dual encoder with its tokenizer and image processor. Outputs are float32 numpy arrays."""

    def __init__(self, model: SiglipModel, tokenizer: SiglipTokenizer, processor: ImageProcessor, source: str):
        self.model, self.tokenizer, self.processor, self.source = model, tokenizer, processor, source

    @property
    def dim(self) -> int:
        return self.model.config.embed_dim

    @property
    def device(self) -> torch.device:
        return self.model.logit_scale.device

    @property
    def fingerprint(self) -> str:
        """Identifies the weights (config plus a hash of a few tensors): an index refuses another model's vectors."""
        digest = hashlib.sha256(json.dumps(self.model.config.to_dict(), sort_keys=True, default=str).encode())
        for tensor in (self.model.vision_model.head.probe, self.model.text_model.head.bias,
                       self.model.logit_scale, self.model.logit_bias):
            digest.update(tensor.detach().float().cpu().numpy().tobytes())
        return digest.hexdigest()[:16]

    def pixels(self, images: Sequence[ImageSource | Image.Image]) -> torch.Tensor:
        """[N, 3, S, S] model inputs from paths (PNG/JPEG/DICOM), bytes or PIL images."""
        return self.processor([load_image(image) for image in images])[0]

    @torch.inference_mode()
    def embed_pixels(self, pixel_values: torch.Tensor) -> np.ndarray:
        dtype = self.model.logit_scale.dtype
        return self.model.embed_images(pixel_values.to(self.device, dtype)).float().cpu().numpy()

    def embed_images(self, images: Sequence[ImageSource | Image.Image], *, batch_size: int = 8,
                     progress: bool = False) -> np.ndarray:
        """Unit-length image embeddings [N, D]."""
        if isinstance(images, str | bytes | os.PathLike | Image.Image):
            images = [images]
        out = [np.zeros((0, self.dim), np.float32)]
        bar = tqdm(total=len(images), unit="img", desc="embedding", disable=not progress)
        for batch in _chunks(list(images), batch_size):
            out.append(self.embed_pixels(self.pixels(batch)))
            bar.update(len(batch))
        bar.close()
        return np.concatenate(out)

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str], *, batch_size: int = 64) -> np.ndarray:
        """Unit-length text embeddings [N, D]."""
        if isinstance(texts, str):
            texts = [texts]
        out = [np.zeros((0, self.dim), np.float32)]
        for batch in _chunks(list(texts), batch_size):
            ids = self.tokenizer(batch).to(self.device)
            out.append(self.model.embed_texts(ids).float().cpu().numpy())
        return np.concatenate(out)

    @torch.inference_mode()
    def zero_shot(self, images: Sequence[ImageSource | Image.Image], labels: Sequence[str],
                  template: str = DEFAULT_TEMPLATE, *, multilabel: bool = False, batch_size: int = 8) -> np.ndarray:
        """Probabilities [images, labels]. Each label is put into `template` ('{}' marks the spot).

        Default: softmax over the labels (one answer per image, as MedSigLIP's model card does);
        multilabel=True: each label's own sigmoid, P(label text matches the image), independently.
        """
        labels = [str(label).strip() for label in labels]
        if len(labels) < (1 if multilabel else 2) or not all(labels):
            raise InputError("zero-shot classification needs at least two non-empty labels (or multilabel=True)")
        if "{}" not in template:
            raise InputError(f"the template must contain '{{}}' where the label goes, got {template!r}")
        texts = torch.from_numpy(self.embed_texts([template.format(label) for label in labels]))
        images_ = torch.from_numpy(self.embed_images(images, batch_size=batch_size))
        scale, bias = self.model.logit_scale.float().cpu(), self.model.logit_bias.float().cpu()
        logits = images_ @ texts.T * scale.exp() + bias
        probs = torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=-1)
        return probs.numpy()


def _resolve(src: str | os.PathLike[str] | None) -> Path:
    """A local folder for `src`: the path itself, or a hub download when `src` looks like 'org/name'."""
    if src is None:
        raise CheckpointError("no SigLIP model given: pass a MedSigLIP folder (e.g. a download of google/medsiglip-448)")
    return local_checkpoint(src, ["*.json", "*.safetensors", "spiece.model"], kind="SigLIP model")


def load_siglip(src: str | os.PathLike[str], *, dtype: str | None = None, device: str = "cpu") -> SiglipEncoder:
    """A SigLIP / MedSigLIP dual encoder from an HF folder (config.json, *.safetensors, spiece.model,
    optionally preprocessor_config.json and tokenizer_config.json), or a hub id where a hub is reachable."""
    check_device(device)
    folder = _resolve(src)
    model, _ = load_siglip_model(folder, dtype=dtype, device=device)
    size = model.config.vision.image_size
    tokenizer = SiglipTokenizer.from_folder(folder, model.config.text.max_position_embeddings)
    # SiglipImageProcessor resizes bicubically; a preprocessor_config.json may say otherwise.
    processor = ImageProcessor.from_preprocessor_config(
        {"resample": Image.Resampling.BICUBIC, **(read_preprocessor_config(folder) or {})}, size
    )
    return SiglipEncoder(model, tokenizer, processor, folder.name)
