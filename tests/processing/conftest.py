"""Fixtures for the processing tests: medgem's tokenizer of the embedded vocabulary, and transformers'
Gemma3Processor built offline from the same vocabulary (plus `<image_soft_token>` as id 262144, as in
multimodal Gemma 3 checkpoints)."""

from __future__ import annotations

import pytest

from medgem.processing.tokenizer import Tokenizer
from medgem.weights import gguf_reader, medgem_home
from medgem.weights.export import write_tokenizer_files

SOFT = 262_144


def gemma3_processor(tokenizer_folder, size: int = 896, tokens_per_image: int = 256, chat_template=None):
    """transformers' Gemma3Processor (PIL image path) over a folder's tokenizer.json."""
    from transformers import Gemma3ImageProcessorPil, Gemma3Processor, GemmaTokenizerFast

    hf_tokenizer = GemmaTokenizerFast(
        tokenizer_file=str(tokenizer_folder / "tokenizer.json"),
        extra_special_tokens={"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                              "image_token": "<image_soft_token>"},
    )
    image_processor = Gemma3ImageProcessorPil(size={"height": size, "width": size})
    return Gemma3Processor(image_processor=image_processor, tokenizer=hf_tokenizer,
                           image_seq_length=tokens_per_image, chat_template=chat_template)


@pytest.fixture(scope="session")
def tokenizer(embedded_gguf):
    return Tokenizer.from_gguf(gguf_reader.GGUFIndex.load(embedded_gguf), medgem_home() / "tokenizers")


@pytest.fixture(scope="session")
def hf_tokenizer_folder(embedded_gguf, tmp_path_factory):
    from tokenizers import Tokenizer as RawTokenizer

    folder = tmp_path_factory.mktemp("hf_tok")
    write_tokenizer_files(embedded_gguf, folder, image_token=True)
    assert RawTokenizer.from_file(str(folder / "tokenizer.json")).token_to_id("<image_soft_token>") == SOFT
    return folder


@pytest.fixture(scope="session")
def hf_processor(hf_tokenizer_folder, gemma3_chat_template):
    return gemma3_processor(hf_tokenizer_folder, chat_template=gemma3_chat_template)


@pytest.fixture(scope="session")
def make_hf_processor():
    """gemma3_processor(tokenizer_folder, size, tokens_per_image, chat_template), for other model shapes."""
    return gemma3_processor
