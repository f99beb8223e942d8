"""The chat fine-tuning format, in one home: reading a training file the way OpenAI checks it
before a job is queued (``semievol serve``), and checking in-memory examples before a hosted
backend uploads them.

The file is JSONL in OpenAI's chat format, one example per line::

    {"messages": [{"role": "system", "content": "..."}, {"role": "user", "content": "..."},
                  {"role": "assistant", "content": "..."}]}

A bad line fails the job with the line number, as the real API does, instead of failing
later inside training. What we accept: roles ``system``, ``developer`` (read as system),
``user`` and ``assistant``; keys ``role``, ``content``, ``name``, ``weight``; content as a
string or a list of text parts; at least one assistant message per example, and at least
:data:`MIN_EXAMPLES` examples (OpenAI's minimum). Tool calls, function messages, images and
the legacy prompt/completion format are refused. An example is cut after its last assistant
message, because a :data:`~semievol.types.ChatExample` ends with the answer.
"""
from __future__ import annotations

import json

from .errors import FinetuneFailed
from .types import ChatExample

MIN_EXAMPLES = 10
"""OpenAI refuses training files with fewer examples than this."""

ROLES = frozenset({"system", "developer", "user", "assistant"})
"""The roles semievol trains on (OpenAI's format also has tool and function messages)."""
MESSAGE_KEYS = frozenset({"role", "content", "name", "weight"})


class InvalidFile(ValueError):
    """A fine-tuning file that fails validation; ``line`` is 1-based (None: whole file)."""

    def __init__(self, message: str, line: int | None = None):
        self.line = line
        super().__init__(f"Line {line}: {message}" if line else message)


def read_chat_examples(data: bytes, *, min_examples: int = MIN_EXAMPLES) -> list[ChatExample]:
    """The examples of a chat-format JSONL file, or :class:`InvalidFile` at the first bad
    line. Blank lines are skipped."""
    examples = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidFile("not valid UTF-8 text", number) from None
        if text.strip():
            examples.append(_example(text, number))
    if len(examples) < min_examples:
        raise InvalidFile(f"Training file has {len(examples)} example(s), but must have at "
                          f"least {min_examples} examples")
    return examples


def _example(text: str, line: int) -> ChatExample:
    try:
        row = json.loads(text)
    except json.JSONDecodeError as e:
        raise InvalidFile(f"invalid JSON ({e.msg} at column {e.colno})", line) from None
    except RecursionError:
        raise InvalidFile("invalid JSON (nested too deeply)", line) from None
    if not isinstance(row, dict) or not isinstance(row.get("messages"), list):
        hint = (" (the legacy prompt/completion format is not supported: use chat format)"
                if isinstance(row, dict) and "prompt" in row else "")
        raise InvalidFile(f"each example must be a JSON object with a 'messages' list{hint}",
                          line)
    messages = [_message(m, i, line) for i, m in enumerate(row["messages"], start=1)]
    last_answer = max((i for i, m in enumerate(messages) if m["role"] == "assistant"),
                      default=None)
    if last_answer is None:
        raise InvalidFile("example has no message with role 'assistant'", line)
    return messages[:last_answer + 1]


def _message(message, index: int, line: int) -> dict[str, str]:
    where = f"message {index}"
    if not isinstance(message, dict):
        raise InvalidFile(f"{where} must be a JSON object", line)
    unknown = sorted(set(message) - MESSAGE_KEYS)
    if unknown:
        raise InvalidFile(f"{where} has unrecognized key(s) {unknown} (tool and function "
                          "calls are not supported)", line)
    role = message.get("role")
    if role not in ROLES:
        raise InvalidFile(f"{where} has unrecognized role {role!r}; expected one of "
                          f"{sorted(ROLES)}", line)
    if message.get("weight", 1) not in (0, 1):
        raise InvalidFile(f"{where}: 'weight' must be 0 or 1", line)
    content = message.get("content")
    if isinstance(content, list):
        parts = [p.get("text") if isinstance(p, dict) and p.get("type") == "text" else None
                 for p in content]
        if None in parts or not all(isinstance(p, str) for p in parts):
            raise InvalidFile(f"{where}: only text content parts are supported", line)
        content = "".join(parts)
    if not isinstance(content, str) or (role == "assistant" and not content.strip()):
        raise InvalidFile(f"{where} is missing its text 'content'", line)
    return {"role": "system" if role == "developer" else role, "content": content}


def example_problem(example, roles: frozenset[str] = ROLES,
                    keys: frozenset[str] = MESSAGE_KEYS) -> str | None:
    """What is wrong with one in-memory chat training example (None: nothing): not a list
    of message dicts with ``role`` and string ``content``, a role or key outside ``roles`` /
    ``keys`` (a provider's own, narrower, sets), a ``weight`` other than 0/1, or no
    assistant message."""
    if not isinstance(example, (list, tuple)) or not example:
        return "not a non-empty list of messages"
    for j, message in enumerate(example):
        if not isinstance(message, dict):
            return f"message {j} is not a dict"
        if "role" not in message or "content" not in message:
            return f"message {j} lacks 'role' or 'content'"
        if unknown := set(message) - keys:
            return f"message {j} has unknown keys {sorted(unknown)}"
        if message["role"] not in roles:
            return f"message {j} has unknown role {message['role']!r}"
        if not isinstance(message["content"], str):
            return f"message {j} content is not a string"
        if message.get("weight", 1) not in (0, 1):
            return f"message {j} weight must be 0 or 1"
    if not any(m["role"] == "assistant" for m in example):
        return "no assistant message"
    return None


def encode_example(tok, example: ChatExample, max_length: int) -> dict:
    """Token ids of a whole chat, labels only on the final assistant message.

    The prompt is tokenized exactly as generation tokenizes it (chat template with the
    generation prompt) and the answer's text after it, so training and inference see the
    same tokens. Cut on the right to ``max_length``."""
    if not example or example[-1].get("role") != "assistant":
        raise FinetuneFailed("a training example must end with an assistant message")
    prompt = tok.apply_chat_template(list(example[:-1]), tokenize=False,
                                     add_generation_prompt=True)
    full = tok.apply_chat_template(list(example), tokenize=False)
    if not full.startswith(prompt):
        raise FinetuneFailed("the chat template renders the prompt differently inside the "
                             "full conversation; cannot mask it")
    prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    answer_ids = tok(full[len(prompt):].rstrip("\n"), add_special_tokens=False)["input_ids"]
    ids = (prompt_ids + answer_ids)[:max_length]
    labels = ([-100] * len(prompt_ids) + answer_ids)[:max_length]
    return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}
