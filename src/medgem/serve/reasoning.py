"""MedGemma 27B's thinking mode, as a per-request switch.

MedGemma 27B thinks when its system instruction starts with "SYSTEM INSTRUCTION: think silently if
needed." It then writes `<unused94>thought\\n ... <unused95>` before its answer. Those two markers
are control tokens, which ordinary decoding drops, so the server decodes with
`thought_keeping_decode` and `ThoughtSplitter` routes the text on either side of them:

- `reasoning: true` adds the instruction; the thought comes back in `reasoning_content` (a message
  field or a stream delta, as vLLM and DeepSeek name it) and the answer in `content`;
- `reasoning: false` or absent adds nothing, and a thought the model writes anyway is dropped.

Other models have no thinking mode: `reasoning: true` is refused with a 400, `false` is a no-op.
Which models think: `--thinking auto` (default) means the MedGemma 27B architecture; `on`/`off` force it.
"""

from __future__ import annotations

from collections.abc import Callable

from medgem.config import TEXT_PRESETS, TextConfig
from medgem.processing.tokenizer import Tokenizer

THINKING_INSTRUCTION = "SYSTEM INSTRUCTION: think silently if needed."
THOUGHT_START, THOUGHT_END = "<unused94>", "<unused95>"
THOUGHT_LABEL = "thought\n"  # the model's first words after THOUGHT_START


def model_thinks(config: TextConfig, setting: str) -> bool:
    """Whether the loaded model has a thinking mode: forced by `setting`, else the 27B shapes."""
    if setting != "auto":
        return setting == "on"
    big = TEXT_PRESETS["27b"]
    return (config.num_hidden_layers, config.hidden_size) == (big.num_hidden_layers, big.hidden_size)


def with_instruction(system: str | None) -> str:
    return f"{THINKING_INSTRUCTION} {system}" if system else THINKING_INSTRUCTION


def thought_keeping_decode(tokenizer: Tokenizer) -> Callable[[list[int]], str]:
    """Decode skipping special tokens, except the two thought markers, which stay as their text."""
    markers = {tokenizer.token_to_id(THOUGHT_START): THOUGHT_START, tokenizer.token_to_id(THOUGHT_END): THOUGHT_END}
    markers.pop(None, None)

    def decode(ids: list[int]) -> str:
        out, run = [], []
        for i in ids:
            if i in markers:
                out += [tokenizer.decode(run, skip_special_tokens=True), markers[i]]
                run = []
            else:
                run.append(i)
        out.append(tokenizer.decode(run, skip_special_tokens=True))
        return "".join(out)

    return decode


def _held(text: str, marker: str) -> int:
    """Length of the longest tail of text that is a proper prefix of marker (it may still complete)."""
    return next((k for k in range(min(len(marker) - 1, len(text)), 0, -1) if text.endswith(marker[:k])), 0)


class ThoughtSplitter:
    """Feeds of streamed text -> (thought, answer) pieces; markers and the thought label never leak."""

    def __init__(self) -> None:
        self.buffer = ""
        self.state = "answer"  # answer -> label -> thought -> answer

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        self.buffer += text
        thought, answer = [], []
        while True:
            if self.state == "answer":
                at = self.buffer.find(THOUGHT_START)
                if at < 0:
                    keep = 0 if final else _held(self.buffer, THOUGHT_START)
                    answer.append(self.buffer[:len(self.buffer) - keep])
                    self.buffer = self.buffer[len(self.buffer) - keep:]
                    break
                answer.append(self.buffer[:at])
                self.buffer, self.state = self.buffer[at + len(THOUGHT_START):], "label"
            elif self.state == "label":
                if THOUGHT_LABEL.startswith(self.buffer) and not final and len(self.buffer) < len(THOUGHT_LABEL):
                    break
                if self.buffer.startswith(THOUGHT_LABEL):
                    self.buffer = self.buffer[len(THOUGHT_LABEL):]
                self.state = "thought"
            else:
                at = self.buffer.find(THOUGHT_END)
                if at < 0:
                    keep = 0 if final else _held(self.buffer, THOUGHT_END)
                    thought.append(self.buffer[:len(self.buffer) - keep])
                    self.buffer = self.buffer[len(self.buffer) - keep:]
                    break
                thought.append(self.buffer[:at])
                self.buffer, self.state = self.buffer[at + len(THOUGHT_END):], "answer"
        return "".join(thought), "".join(answer)
