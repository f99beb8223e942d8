"""Answer extraction and checking, and the prompts built from examples."""
from __future__ import annotations

import pytest

from semievol import prompts
from semievol.answers import extract, is_correct
from semievol.types import Example

FPB = Example("f1", "Please justify the sentiment:\nProfit rose 5 %.", ("negative", "neutral", "positive"), "C")
NOT = Example("n1", "Is it?", ("positive", "not positive"), "B")
NUM = Example("x1", "What is 2/3?", None, "0.6667")
TEXT = Example("t1", "Capital of France?", None, "Paris")


@pytest.mark.parametrize("reply, letter", [
    ("Answer: C", "C"), ("answer is B", "B"), ("C", "C"), ("(A)", "A"), ("B. neutral", "B"),
    ("positive", "C"), ("Positive.", "C"), ("The sentiment is negative.", "A"),
    ("I am not sure", None), ("", None), ("Answer: F", None),
    # a leading "A" that is the article loses to the option the reply states ...
    ("A positive outlook for the company", "C"), ("A neutral statement", "B"),
    # ... but not to nothing, and a marked letter is the answer
    ("A because sales fell", "A"), ("B) positive", "B"), ("(A) positive", "A"),
])
def test_choice_extraction(reply, letter):
    assert extract(reply, FPB) == letter


def test_longer_option_wins_over_the_option_it_contains():
    assert extract("not positive", NOT) == "B"
    assert extract("positive", NOT) == "A"


def test_numeric_tolerance_is_relative_one_percent():
    assert NUM.kind == "numeric"
    assert is_correct(extract("The answer is 0.667", NUM), NUM)
    assert is_correct(extract("so about 0.6650", NUM), NUM)
    assert not is_correct(extract("0.70", NUM), NUM)
    assert extract("no number here", NUM) is None


def test_fuzzy_text():
    assert TEXT.kind == "text"
    assert is_correct(extract("Answer: paris.", TEXT), TEXT)
    assert is_correct("The Pariss", TEXT)
    assert not is_correct("Lyon", TEXT)


def test_prompt_styles_and_targets():
    text = prompts.question_prompt(FPB)
    assert [m["role"] for m in text] == ["system", "user"]
    assert "negative, neutral, positive" in text[-1]["content"]
    assert prompts.target(FPB, "C") == "positive"
    letter = prompts.question_prompt(FPB, "letter")
    assert "C. positive" in letter[-1]["content"] and prompts.target(FPB, "C", "letter") == "Answer: C"
    assert extract(prompts.target(FPB, "B"), FPB) == "B"
    assert extract(prompts.target(FPB, "B", "letter"), FPB) == "B"


def test_shots_are_solved_turns_and_training_ends_with_the_answer():
    shot = Example("s", "Sales fell.", FPB.options, "A")
    messages = prompts.question_prompt(FPB, shots=[shot])
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[2]["content"] == "negative"
    example = prompts.training_example(FPB, "C")
    assert example[-1] == {"role": "assistant", "content": "positive"}


def test_justify_prompt_lists_the_candidates():
    content = prompts.justify_prompt(FPB, ["positive", "neutral"])[-1]["content"]
    assert "1. positive" in content and "2. neutral" in content and FPB.question.strip() in content
