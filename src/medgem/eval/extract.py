"""Reading answers out of free-form model text: MCQ letters, yes/no, normalized tokens.

Models answer "The answer is (B).", "**C**", "Answer: d", "I think it's option A, not B", or just
the option's text; base models also run on into a made-up next question. `extract_choice` tries
the most explicit reading first and falls back step by step:

1. the whole reply is one letter ("B", "(c)", "**D**");
2. explicit statements ("answer is B", "correct option: (d)", "C is correct", "I'd go with D"),
   the last one winning so a model that corrects itself is read by its final word (but a reply
   that states an answer and then runs on into "\nAnswer: ..." lines is read by its first);
3. a leading letter ("B) ...", "C. Insulin");
4. option mentions ("option A", "(C)") that are not negated ("not B", "rather than B");
5. the option text quoted first (a quote inside a longer quoted option does not count);
6. a lone capital letter, when only one option letter appears that way.

A lower-case letter counts only when it cannot be the article "a" ("answer is a benign ..." is not A).
"""

from __future__ import annotations

import re
import string
from collections import Counter

_MARKUP = re.compile(r"[*_`#]+")
_NEXT_QUESTION = re.compile(r"\n\s*(?:question|q)\s*\d*\s*[:.)]", re.IGNORECASE)
_RUN_ON = re.compile(r"\n\s*answer\s*:", re.IGNORECASE)
_NEGATION = re.compile(r"(?:\bnot|n't|\bno|\brather than|\binstead of|\bexcept|\bexclude|\brule out|\bnor)"
                       r"(?:\s+\w+)?\s*$", re.IGNORECASE)  # "not B", "not the B", "rather than B"
_L = r"[\(\[]?\s*(?P<l>[A-Ja-j])(?:\s*(?P<close>[\)\]]))?"  # a letter, maybe bracketed

_EXPLICIT = [re.compile(p, re.IGNORECASE) for p in (
    rf"\banswer\s*(?:is|would be|will be|[:=\-–])?\s*(?:[:\-]\s*)?(?:the\s+)?(?:option|choice|letter)?\s*[:\-]?\s*{_L}",
    rf"\bcorrect\s+(?:answer|option|choice|response|one)\s*(?:is|would be|[:=\-])?\s*(?:option|choice)?\s*{_L}",
    rf"\b(?:option|choice|answer)\s*{_L}\s+is\s+(?:the\s+)?(?:correct|right|best|better|most)",
    r"(?:^|[\s(])(?P<l>[A-J])(?P<close>\))?\s+is\s+(?:the\s+)?(?:correct|right|best|better|most)",
    rf"\bI(?:'d| would| will)?\s+(?:choose|pick|select|go with|say)\s+(?:option|choice)?\s*{_L}",
    rf"\bit(?:'s|\s+is|\s+must be|\s+would be)\s+(?:option|choice)?\s*{_L}",
)]
_LEADING = re.compile(rf"^\s*{_L}(?P<after>[.:\-–—]|\s*$)?")
_MENTION = re.compile(r"\b(?:option|choice)\s*[\(\[]?\s*(?P<l>[A-Ja-j])\b|[\(\[](?P<b>[A-Ja-j])[\)\]]", re.IGNORECASE)
_BARE = re.compile(r"(?:^|(?<=\s))(?P<l>[A-J])(?=[.!?,;)]|\s*$)")


def _ok(m: re.Match, text: str, letters: set[str]) -> str | None:
    """The matched letter if it is an option and, when lower case, cannot be the article 'a'."""
    letter = m.group("l")
    if letter.upper() not in letters:
        return None
    if letter.isupper() or m.groupdict().get("close"):
        rest = text[m.end():]
        return None if rest[:1].isalnum() else letter.upper()
    rest = text[m.end():]
    return letter.upper() if re.match(r"\s*(?:$|[.,;:!?)\]\n])", rest) else None


def _negated(text: str, start: int) -> bool:
    return bool(_NEGATION.search(text[max(0, start - 24):start]))


def _norm(s: str) -> str:
    """Lower case, words and clause marks (kept so a negation does not reach past a comma) as tokens."""
    s = re.sub(r"[^\w\s,;.!?:]", " ", s.lower())
    return " ".join(re.sub(r"([,;.!?:])", r" \1 ", s).split())


def clean(text: str) -> str:
    """Markdown stripped and a run-on made-up next question cut off."""
    text = _MARKUP.sub("", text)
    m = _NEXT_QUESTION.search(text)
    return (text[: m.start()] if m else text).strip()


def _stated(t: str, letters: set[str]) -> str | None:
    """Steps 1-3: a lone letter, the last explicit statement, or a leading letter."""
    lone = re.fullmatch(r"\W*([A-Ja-j])\W*", t)
    if lone and lone.group(1).upper() in letters:
        return lone.group(1).upper()
    explicit = [(m.start(), x) for p in _EXPLICIT for m in p.finditer(t) if (x := _ok(m, t, letters))]
    if explicit:
        return max(explicit)[1]
    lead = _LEADING.match(t)
    if lead and (lead.group("after") is not None or lead.group("close")):
        return _ok(lead, t, letters)
    return None


def extract_choice(text: str, options: dict[str, str]) -> str | None:
    """The option letter a reply chooses, or None when it cannot be read (scored as wrong)."""
    letters = set(options)
    t = clean(text)
    if not t:
        return None
    # A base model that answers and runs on ("A. ...\nAnswer: B. ...") meant its first answer.
    run_on = _RUN_ON.search(t)
    if run_on and run_on.start() > 0 and (x := _stated(t[: run_on.start()].strip(), letters)):
        return x
    if x := _stated(t, letters):
        return x

    mentions = [
        (m.group("l") or m.group("b")).upper() for m in _MENTION.finditer(t)
        if (m.group("l") or m.group("b")).upper() in letters and not _negated(t, m.start())
    ]
    if mentions:
        return mentions[0]

    quoted = mentioned(t, options)
    if quoted:
        return quoted[0]

    bare = {m.group("l") for m in _BARE.finditer(t) if m.group("l") in letters and not _negated(t, m.start())}
    return bare.pop() if len(bare) == 1 else None


def mentioned(text: str, options: dict[str, str]) -> list[str]:
    """Keys of the options whose text the reply quotes, in order of first appearance; a quote inside a
    longer quoted option ("embolism" in "pulmonary embolism") or after a negation does not count."""
    t = f" {_norm(text)} "
    spans = []
    for key, opt in options.items():
        o = _norm(opt)
        for m in re.finditer(re.escape(f" {o} "), t) if o else ():
            if not _negated(t, m.start() + 1):
                spans.append((m.start(), m.end(), key))
                break
    inside = {k for s0, e0, k in spans for s1, e1, k1 in spans if k1 != k and s1 <= s0 and e0 <= e1
              and (e1 - s1) > (e0 - s0)}
    return [k for _, _, k in sorted(spans) if k not in inside]


# ---- free-text answers (VQA, EHR-QA) ----

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """SQuAD-style normalization: lower case, no punctuation, no articles, single spaces."""
    s = "".join(ch if ch not in string.punctuation else " " for ch in s.lower())
    return " ".join(_ARTICLES.sub(" ", s).split())


def token_f1(prediction: str, reference: str) -> float:
    """Bag-of-tokens F1 after normalization (SQuAD's F1, the "tokenized F1" of the MedGemma report)."""
    pred, ref = normalize_answer(prediction).split(), normalize_answer(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def first_yes_no(text: str) -> str | None:
    m = re.search(r"\b(yes|no)\b", clean(text).lower())
    return m.group(1) if m else None


def closed_match(prediction: str, reference: str) -> bool:
    """A closed answer is right when the reply starts with the gold tokens (yes/no: its first yes/no)."""
    gold = normalize_answer(reference)
    if gold in ("yes", "no"):
        return first_yes_no(prediction) == gold
    pred = normalize_answer(clean(prediction)).split()
    return bool(gold) and pred[: len(gold.split())] == gold.split()
