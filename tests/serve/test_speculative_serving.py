"""`medgem serve --draft lookup`: a real server whose engine drafts by prompt lookup answers with the
plain greedy text, and its /metrics count the drafted and accepted tokens."""

from __future__ import annotations

import re

import httpx
import pytest

from medgem.pipeline import Pipeline, add_draft

pytestmark = pytest.mark.slow

PROMPT = ("Report: the left lower lobe shows patchy consolidation with air bronchograms and a small pleural "
          "effusion. Summary: the left lower lobe shows")


def test_prompt_lookup_server_keeps_greedy_text(serve, real_pipe):
    plain = real_pipe.complete([PROMPT], raw=True, max_new_tokens=24, temperature=0)[0].text
    pipe = Pipeline(real_pipe.model, real_pipe.tokenizer, real_pipe.config, "lookup")  # not the shared one
    add_draft(pipe, "lookup")
    with serve(pipe) as url:
        body = {"model": "gemma-3-270m", "prompt": PROMPT, "max_tokens": 24, "temperature": 0}
        reply = httpx.post(f"{url}/v1/completions", json=body, timeout=120)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["text"] == plain
        counts = {name: float(value) for name, value in re.findall(
            r"^medgem_engine_(draft_tokens_\w+?)(?:_total)? ([0-9.e+]+)$", httpx.get(f"{url}/metrics").text,
            re.MULTILINE)}
    assert 0 < counts["draft_tokens_accepted"] <= counts["draft_tokens_proposed"]
