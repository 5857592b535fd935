"""/v1/embeddings with a MedSigLIP encoder (random tiny weights saved by medgem, a SentencePiece model
trained here): texts through the `openai` client (its default base64 encoding), texts and a DICOM
image in one request, all equal to the encoder called directly, and a bad image as a 400."""

from __future__ import annotations

import random
import threading

import httpx
import numpy as np
import openai
import pytest
import torch

import medgem
from medgem.config import tiny_vision_config
from medgem.inputs.images import load_image
from medgem.nn.siglip import SiglipConfig, SiglipModel, SiglipTextConfig
from medgem.serve.settings import ServeSettings
from medgem.weights.siglip import save_siglip

TEXTS = ["Chest X-ray: left lower lobe consolidation.", "normal chest radiograph"]


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    import sentencepiece as spm

    folder = tmp_path_factory.mktemp("siglip") / "medsiglip-tiny"
    folder.mkdir()
    words = ["a", "the", "of", "left", "right", "lower", "lobe", "chest", "lung", "ct", "x", "ray", "normal", "nodule", "consolidation", "radiograph"]
    rng = random.Random(0)
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 10))) for _ in range(500)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(folder / "spiece"), vocab_size=60,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2, hard_vocab_limit=False)
    torch.manual_seed(0)
    text = SiglipTextConfig(vocab_size=60, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=16)
    save_siglip(SiglipModel(SiglipConfig(text=text, vision=tiny_vision_config(vision_use_head=True))), folder)
    return medgem.load_siglip(folder)


@pytest.fixture(scope="module")
def url(serve, tiny_pipe, encoder):
    with serve(tiny_pipe, ServeSettings(model_name="medgemma-tiny"), embedder=encoder) as base:
        yield base


def test_text_embeddings_through_the_openai_client(url, encoder):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list().data] == ["medgemma-tiny", "medsiglip-tiny"]
    reply = client.embeddings.create(model="medsiglip-tiny", input=TEXTS)
    got = np.array([d.embedding for d in reply.data], dtype=np.float32)
    np.testing.assert_allclose(got, encoder.embed_texts(TEXTS), atol=1e-6)
    assert np.allclose(np.linalg.norm(got, axis=1), 1, atol=1e-5)
    assert reply.usage.prompt_tokens == sum(len(encoder.tokenizer.encode(t)) for t in TEXTS)
    with pytest.raises(openai.BadRequestError, match="no embedding tower"):
        client.embeddings.create(model="medgemma-tiny", input="x")
    with pytest.raises(openai.BadRequestError, match="is an embedding model"):
        client.chat.completions.create(model="medsiglip-tiny", messages=[{"role": "user", "content": "x"}])


def test_texts_and_a_dicom_in_one_request(url, encoder, data_url, chest_dicom):
    image = {"type": "image_url", "image_url": {"url": data_url(chest_dicom, "application/dicom")}}
    reply = httpx.post(f"{url}/v1/embeddings", json={"model": "medsiglip-tiny", "input": [TEXTS[0], image, TEXTS[1]],
                                                     "encoding_format": "float"}, timeout=60)
    assert reply.status_code == 200 and reply.headers["x-medgem-notice"]
    data = reply.json()["data"]
    assert [d["index"] for d in data] == [0, 1, 2]
    np.testing.assert_allclose([data[0]["embedding"], data[2]["embedding"]], encoder.embed_texts(TEXTS), atol=1e-6)
    np.testing.assert_allclose(data[1]["embedding"], encoder.embed_images([load_image(chest_dicom)])[0], atol=1e-6)
    bad = httpx.post(f"{url}/v1/embeddings", json={"model": "medsiglip-tiny", "input": [
        {"type": "image_url", "image_url": {"url": "data:application/dicom;base64,AAAA"}}]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "input[0]"


def test_the_encoder_runs_in_threads_that_end(url, encoder, monkeypatch):
    """routes.run_in_own_thread: a pool thread that ran the encoder would keep an OpenMP team and slow
    the generation engine for the rest of the server's life (BENCHMARKS.md, prompt lookup)."""
    ran_in: list[threading.Thread] = []
    embed_texts = encoder.embed_texts

    def recording(texts):
        ran_in.append(threading.current_thread())
        return embed_texts(texts)

    monkeypatch.setattr(encoder, "embed_texts", recording)
    for _ in range(2):
        reply = httpx.post(f"{url}/v1/embeddings", json={"model": "medsiglip-tiny", "input": TEXTS}, timeout=60)
        assert reply.status_code == 200
    assert len(ran_in) == 2 and ran_in[0] is not ran_in[1]
    for thread in ran_in:
        thread.join(timeout=10)
        assert not thread.is_alive()
