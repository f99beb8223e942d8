"""Extract an answer from a model's reply and check it against the gold answer.

Multi-choice replies are accepted as "Answer: B", a bare letter ("B", "(B)", "B."), or the
option's own text ("neutral"); all map to the option letter. Numeric answers are compared
with a relative tolerance of 1e-2 (as the paper's code). Short text answers are compared
after normalising case, punctuation and articles, with a small fuzzy margin.
"""
from __future__ import annotations

import math
import re
import string
from difflib import SequenceMatcher

from .types import LETTERS, Example

NUMERIC_TOLERANCE = 1e-2
FUZZY_RATIO = 0.9

_ANSWER_IS = re.compile(r"answer\s*(?:is)?\s*[:：]?\s*\(?([A-Z])\)?(?![A-Za-z])", re.IGNORECASE)
_BARE_LETTER = re.compile(r"^\s*(?:\(([A-Z])\)|([A-Z])\s*[.):]|([A-Z])\s*$|([A-Z])\s)")
"""A reply that opens with a letter: "(B)", "B.", "B)", "B:" or "B" alone mark it as the
answer; "A " followed by words may be the article (or "I" the pronoun), so then the
option's own text, if the reply states one, wins."""
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:[eE][-+]?\d+)?|-?\.\d+")


def extract(text: str, example: Example) -> str | None:
    """The answer the reply gives, in canonical form (an option letter, a number as a
    string, or the normalised text), or None when it gives none."""
    if example.options is not None:
        return _extract_choice(text, example.options)
    if example.kind == "numeric":
        return _extract_number(text)
    line = text.strip().splitlines()[0] if text.strip() else ""
    line = re.sub(r"^\s*answer\s*(?:is)?\s*[:：]\s*", "", line, flags=re.IGNORECASE)
    return line.strip() or None


def is_correct(predicted: str | None, example: Example, gold: str | None = None) -> bool:
    """Whether an extracted answer matches the gold answer (``example.answer`` unless given)."""
    gold = example.answer if gold is None else gold
    if predicted is None or gold is None:
        return False
    if example.options is not None:
        return predicted == gold
    if example.kind == "numeric":
        p, g = _to_float(predicted), _to_float(gold)
        if p is None or g is None:
            return False
        return math.isclose(p, g, rel_tol=NUMERIC_TOLERANCE, abs_tol=1e-9)
    return same_text(predicted, gold)


def same_text(a: str, b: str) -> bool:
    """Fuzzy equality of short answers: equal after normalising, or nearly so."""
    a, b = _normalise(a), _normalise(b)
    return a == b or SequenceMatcher(None, a, b).ratio() >= FUZZY_RATIO


def _extract_choice(text: str, options: tuple[str, ...]) -> str | None:
    valid = LETTERS[: len(options)]
    match = _ANSWER_IS.search(text)
    if match and match.group(1).upper() in valid:
        return match.group(1).upper()
    match = _BARE_LETTER.match(text)
    if match:
        letter = next(g for g in match.groups() if g).upper()
        if letter in valid and (match.group(4) is None or _option_in(text, options) is None):
            return letter
    return _option_in(text, options)


def _option_in(text: str, options: tuple[str, ...]) -> str | None:
    """The option whose text the reply states: an exact match first, else the one option
    found in the reply (the longest, when one option's text contains another's); the
    earliest mention wins a tie between unrelated options."""
    reply = _normalise(text)
    if not reply:
        return None
    normalised = [_normalise(o) for o in options]
    for i, option in enumerate(normalised):
        if option and reply == option:
            return LETTERS[i]
    found = []
    for i, option in enumerate(normalised):
        if option:
            at = re.search(r"(?<!\w)" + re.escape(option) + r"(?!\w)", reply)
            if at:
                found.append((at.start(), -len(option), i))
    if not found:
        return None
    # An option contained in a longer found option (e.g. "positive" in "not positive") yields.
    found = [f for f in found if not any(normalised[f[2]] != normalised[g[2]]
                                          and normalised[f[2]] in normalised[g[2]]
                                          for g in found)]
    return LETTERS[min(found)[2]]


def _extract_number(text: str) -> str | None:
    match = re.search(r"answer\s*(?:is)?\s*[:：]?\s*", text, re.IGNORECASE)
    tail = text[match.end():] if match else text
    numbers = _NUMBER.findall(tail) or _NUMBER.findall(text)
    if not numbers:
        return None
    value = _to_float(numbers[0] if match else numbers[-1])
    return None if value is None else repr(value)


def _to_float(text: str) -> float | None:
    try:
        value = float(text.replace(",", "").strip())
    except ValueError:
        return None
    return value if math.isfinite(value) else None


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation})


def _normalise(text: str) -> str:
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCT))
    return " ".join(text.split())
