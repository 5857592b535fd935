"""MedGemma 27B's thinking mode, as a per-request switch.

MedGemma 27B thinks when its system instruction starts with "SYSTEM INSTRUCTION: think silently if
needed." It then writes `<unused94>thought\\n ... <unused95>` before its answer. The decoding that
keeps those markers and the splitter that routes the text on either side of them live in
processing/thinking.py; every answer goes through them, so a thought never reaches `content`:

- `reasoning: true` adds the instruction; the thought comes back in `reasoning_content` (a message
  field or a stream delta, as vLLM and DeepSeek name it) and the answer in `content`;
- `reasoning: false` or absent adds nothing, and a thought the model writes anyway is dropped.

Other models have no thinking mode: `reasoning: true` is refused with a 400, `false` is a no-op, and
a thought such a model writes unasked (MedGemma 1.5 4B does) comes back in `reasoning_content`.
Which models think: `--thinking auto` (default) means the MedGemma 27B architecture; `on`/`off` force it.
"""

from __future__ import annotations

from medgem.config import TEXT_PRESETS, TextConfig
from medgem.processing.thinking import THOUGHT_END, THOUGHT_START, ThoughtSplitter, thought_keeping_decode

THINKING_INSTRUCTION = "SYSTEM INSTRUCTION: think silently if needed."
__all__ = ["THINKING_INSTRUCTION", "THOUGHT_END", "THOUGHT_START", "ThoughtSplitter", "model_thinks",
           "thought_keeping_decode", "with_instruction"]


def model_thinks(config: TextConfig, setting: str) -> bool:
    """Whether the loaded model has a thinking mode: forced by `setting`, else the 27B shapes."""
    if setting != "auto":
        return setting == "on"
    big = TEXT_PRESETS["27b"]
    return (config.num_hidden_layers, config.hidden_size) == (big.num_hidden_layers, big.hidden_size)


def with_instruction(system: str | None) -> str:
    return f"{THINKING_INSTRUCTION} {system}" if system else THINKING_INSTRUCTION
