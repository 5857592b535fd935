"""Fixtures for the evaluation tests: a scripted stand-in model and data files in published layouts.

The scripted model exists only to test the harness's arithmetic and its resume bookkeeping: its
replies are chosen by the test, so every metric has a known right answer, and it counts the prompts
it is asked. The real embedded model is exercised in test_real_model.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import pytest


class WordTokenizer:
    """Whitespace tokens: enough for token counts and chat rendering in the harness."""

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        return ([2] if add_bos else []) + [hash(w) % 1000 + 10 for w in text.split()]

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        body = "".join(f"<start_of_turn>{m['role']}\n{m['content']}<end_of_turn>\n" for m in messages)
        return f"<bos>{body}<start_of_turn>model\n"


class ScriptedModel:
    """`reply(prompt) -> text` and `loglik(prompt, continuation) -> float` decide every answer.

    `calls` counts generate_batch/score calls and `prompts` every prompt asked; with `fail_after=k`
    the model raises once it has answered k prompts, as a killed run would stop.
    """

    def __init__(self, reply: Callable[[object], str] | None = None,
                 loglik: Callable[[str, str], float] | None = None, fail_after: int | None = None):
        self.reply = reply or (lambda prompt: "A")
        self.loglik = loglik or (lambda prompt, cont: -float(len(cont)))
        self.fail_after = fail_after
        self.tokenizer = WordTokenizer()
        self.calls = 0
        self.prompts: list[object] = []
        self.kwargs: list[dict] = []

    def _count(self, n: int) -> None:
        if self.fail_after is not None and len(self.prompts) + n > self.fail_after:
            raise RuntimeError("scripted model stopped (simulated kill)")
        self.calls += 1

    def generate_batch(self, prompts, **kwargs) -> list[str]:
        self._count(len(prompts))
        self.prompts += list(prompts)
        self.kwargs.append(kwargs)
        return [self.reply(p) for p in prompts]

    def score(self, prompt: str | list[dict], continuations: list[str]) -> list[float]:
        self._count(1)
        self.prompts.append(prompt)
        return [self.loglik(prompt, c) for c in continuations]


def question_of(prompt) -> str:
    """The question line of a text prompt (or of the text part of a message list)."""
    if isinstance(prompt, list):
        prompt = " ".join(p.get("text", "") for m in prompt for p in (m["content"] if isinstance(m["content"], list)
                                                                        else [{"text": m["content"]}]))
    m = re.search(r"Question: (.*)", prompt)
    return (m.group(1) if m else prompt).strip()


@pytest.fixture
def handwritten() -> list[dict]:
    from medgem.eval.tasks import BUILTIN

    return [json.loads(line) for line in BUILTIN["handwritten"].read_text().splitlines()]


@pytest.fixture(scope="session")
def images(tmp_path_factory) -> dict[str, Path]:
    """Real images saved as files: a fundus photograph, an IHC slide and a CT slice from DICOM."""
    import numpy as np
    import pydicom
    from PIL import Image
    from pydicom.data import get_testdata_file
    from skimage import data

    folder = tmp_path_factory.mktemp("images")
    out = {}
    for name, array in (("retina", data.retina()), ("ihc", data.immunohistochemistry())):
        out[name] = folder / f"{name}.png"
        Image.fromarray(array).resize((64, 64)).save(out[name])
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm")).pixel_array.astype(float)
    ct = (255 * (ct - ct.min()) / (ct.max() - ct.min())).astype(np.uint8)
    out["ct"] = folder / "ct.png"
    Image.fromarray(ct).save(out["ct"])
    return out


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def scripted() -> type[ScriptedModel]:
    return ScriptedModel


@pytest.fixture
def ask() -> Callable[[object], str]:
    return question_of


@pytest.fixture
def jsonl() -> Callable[[Path, list[dict]], Path]:
    return write_jsonl
