"""MedGemma's thought traces: `<unused94>thought\\n ... <unused95>` before the answer.

MedGemma 27B writes one in thinking mode (serve/reasoning.py), and MedGemma 1.5 4B often writes one
unasked (google-health/medgemma, cxr_anatomy_localization_with_hugging_face.ipynb: "the model may
think even without being prompted to. Remove the thinking trace generated between special tokens
<unused94> and <unused95>"). The markers are control tokens, which ordinary decoding drops, and then
the thought would read as part of the answer. So every face decodes with `thought_keeping_decode` and
routes the text through `ThoughtSplitter`: the answer never holds the thought, which stays available
as reasoning content (`Completion.reasoning`, `reasoning_content` over HTTP).
"""

from __future__ import annotations

from collections.abc import Callable

from medgem.processing.tokenizer import Tokenizer

THOUGHT_START, THOUGHT_END = "<unused94>", "<unused95>"
THOUGHT_LABEL = "thought\n"  # the model's first words after THOUGHT_START


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
                if not self._take_until(THOUGHT_START, answer, final):
                    break
                self.state = "label"
            elif self.state == "label":
                if THOUGHT_LABEL.startswith(self.buffer) and not final and len(self.buffer) < len(THOUGHT_LABEL):
                    break
                if self.buffer.startswith(THOUGHT_LABEL):
                    self.buffer = self.buffer[len(THOUGHT_LABEL):]
                self.state = "thought"
            else:
                if not self._take_until(THOUGHT_END, thought, final):
                    break
                self.state = "answer"
        return "".join(thought), "".join(answer)

    def _take_until(self, marker: str, out: list[str], final: bool) -> bool:
        """Move the buffered text before `marker` to `out` and drop the marker: True when it was there.
        Otherwise move all but a tail that could still begin the marker (all of it when `final`)."""
        at = self.buffer.find(marker)
        if at < 0:
            keep = 0 if final else _held(self.buffer, marker)
            out.append(self.buffer[:len(self.buffer) - keep])
            self.buffer = self.buffer[len(self.buffer) - keep:]
            return False
        out.append(self.buffer[:at])
        self.buffer = self.buffer[at + len(marker):]
        return True


def split_thought(text: str) -> tuple[str, str]:
    """(thought, answer) of a whole decoded text."""
    return ThoughtSplitter().feed(text, final=True)
