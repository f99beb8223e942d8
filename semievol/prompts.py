"""The prompts: a question, a question with solved examples (in-context propagation), the
self-justify prompt, and the assistant's target answer for training.

Two styles. "text" (default): options are listed and the model answers with the option's
own words ("neutral"); small models learn this far better than letters. "letter": the
paper's format, options lettered and the answer written "Answer: B".
A short system message is always given, so chat templates that add a default system
prompt (SmolLM's) do not.
"""
from __future__ import annotations

from collections.abc import Sequence

from .types import LETTERS, ChatExample, Example, Message

SYSTEM = "Answer the question. Reply with the answer only."


def question_prompt(example: Example, style: str = "text",
                    shots: Sequence[Example] = ()) -> list[Message]:
    """Messages asking ``example``'s question, after ``shots`` as solved user/assistant
    turns (their own answers, or pseudo-labels, must be set)."""
    messages: list[Message] = [{"role": "system", "content": SYSTEM}]
    for shot in shots:
        messages.append({"role": "user", "content": _ask(shot, style)})
        messages.append({"role": "assistant", "content": target(shot, shot.answer, style)})
    messages.append({"role": "user", "content": _ask(example, style)})
    return messages


def justify_prompt(example: Example, responses: Sequence[str], style: str = "text") -> list[Message]:
    """Self-justify: the question, its options and the candidate responses of the
    collaborating inferences; the model gives the final answer in the usual format."""
    candidates = "\n".join(f"{i}. {r.strip() or '(no answer)'}"
                           for i, r in enumerate(responses, 1))
    content = (f"{_ask(example, style)}\n\nCandidate answers from several attempts:\n"
               f"{candidates}\n\nJudge which candidate is correct and give the final answer.")
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}]


def training_example(example: Example, answer: str, style: str = "text") -> ChatExample:
    """A fine-tuning example: the plain question prompt and the target answer."""
    return question_prompt(example, style) + [
        {"role": "assistant", "content": target(example, answer, style)}]


def target(example: Example, answer: str, style: str = "text") -> str:
    """The assistant's answer in the style's format; ``answer`` is a letter for
    multi-choice questions, the free answer otherwise."""
    if example.options is None:
        return answer
    if style == "letter":
        return f"Answer: {answer}"
    return example.option_of(answer)


def _ask(example: Example, style: str) -> str:
    if example.options is None:
        return f"{example.question.strip()}\nGive only the final answer."
    if style == "letter":
        listed = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(example.options))
        return (f"{example.question.strip()}\n{listed}\n"
                "Reply with 'Answer: X', where X is the letter of the correct option.")
    if all(len(o) <= 40 for o in example.options):
        listed = "Options: " + ", ".join(example.options)
    else:
        listed = "Options:\n" + "\n".join(f"- {o}" for o in example.options)
    return f"{example.question.strip()}\n{listed}\nAnswer with one of the options, word for word."
