"""Loaders build models on the meta device and then assign the checkpoint's tensors. Random init there
would be wasted work, and `normal_` on a meta tensor imports torch._dynamo (70 MB of RSS, half a second
of loading), so a plain (uncompiled) load must never import it."""

from __future__ import annotations

import subprocess
import sys

import pytest

BUILD = """
import sys, torch
from medgem.config import MultimodalConfig, tiny_text_config, tiny_vision_config
from medgem.nn.medgemma import Gemma3Multimodal
from medgem.nn.siglip import SiglipConfig, SiglipModel, SiglipTextConfig
from medgem.nn.text import Gemma3Text
with torch.device("meta"):
    {build}
print("torch._dynamo" in sys.modules, next(model.parameters()).is_meta)
"""


@pytest.mark.parametrize("build", [
    "model = Gemma3Text(tiny_text_config())",
    "model = Gemma3Multimodal(MultimodalConfig(text=tiny_text_config(), vision=tiny_vision_config(), mm_tokens_per_image=4))",
    "model = SiglipModel(SiglipConfig(text=SiglipTextConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2), vision=tiny_vision_config(vision_use_head=True)))",
])
def test_building_on_meta_skips_random_init(build):
    done = subprocess.run([sys.executable, "-c", BUILD.format(build=build)], capture_output=True, text=True,
                          timeout=120, check=True)
    assert done.stdout.split() == ["False", "True"]


def test_loading_the_embedded_model_never_imports_dynamo():
    code = "import sys, medgem; medgem.load(); print('torch._dynamo' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    assert done.stdout.split()[-1] == "False"


def test_embeddings_built_off_meta_are_still_initialised():
    from medgem.nn import Embedding

    table = Embedding(100, 8)
    assert table.weight.std() > 0.5  # normal_(0, 1), not left empty
