"""The prompts each task kind sends, zero-shot and completion-style.

Completion-style text ("...\\nAnswer:") works for base and instruction-tuned models alike; with
`chat=True` the runner wraps the same text in a user turn. Image tasks are always messages, since
only messages carry images. EHR-QA prompts come from `medgem.ehr.qa`, so `medgem ehr ask` and the
evaluation ask the same way. `PROMPT_VERSION` goes into each run's settings, so a resumed run never
mixes predictions made under two prompt wordings.
"""

from __future__ import annotations

from typing import Any

from medgem.eval.tasks import Item

PROMPT_VERSION = "2"
MCQ_STOP = ["\n\n", "\nQuestion:"]


def mcq_prompt(item: Item) -> str:
    """Question, lettered options, then 'Answer:' (for generation; the reply names a letter or an option)."""
    head = "The following is a multiple-choice question about medicine. Answer with the letter of the correct option."
    context = f"Context: {item.context}\n\n" if item.context else ""
    options = "\n".join(f"{k}. {v}" for k, v in item.options.items())
    return f"{head}\n\n{context}Question: {item.question}\n{options}\nAnswer:"


def cloze_prompt(item: Item) -> str:
    """The log-likelihood prompt: the question without its options ("cloze" form), so that which option
    is listed first cannot matter; each option's text is then scored as the continuation."""
    context = f"Context: {item.context}\n\n" if item.context else ""
    return f"The following is a question about medicine.\n\n{context}Question: {item.question}\nAnswer:"


def mcq_continuations(item: Item) -> dict[str, str]:
    """What log-likelihood scores after the cloze prompt: each option's text, not its bare letter, so
    the model is judged on the content; the mean per token corrects for option length."""
    return {k: f" {v}" for k, v in item.options.items()}


def _image_turn(image: str | None, text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": text}]}]


def vqa_messages(item: Item) -> list[dict[str, Any]]:
    hint = "Answer with a single word or phrase." if item.answer_type == "open" else "Answer yes or no if possible."
    return _image_turn(item.image, f"{item.question}\n{hint}")


def classify_messages(item: Item, labels: list[str], multi_label: bool) -> list[dict[str, Any]]:
    listing = "\n".join(f"- {label}" for label in labels)
    ask = ("Which of these findings does this image show? Name every one that is present." if multi_label
           else "Which one of these best describes this image? Answer with its name.")
    return _image_turn(item.image, f"{ask}\n{listing}\nAnswer:")


def label_question(item: Item, label: str) -> list[dict[str, Any]]:
    """One yes/no question per label, for multi-label log-likelihood scoring."""
    return _image_turn(item.image, f"Does this image show {label}? Answer yes or no.\nAnswer:")


def report_messages(item: Item) -> list[dict[str, Any]]:
    return _image_turn(item.image, "Write the findings section of the radiology report for this image.")
