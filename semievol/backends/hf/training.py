"""Training data for LoRA fine-tunes: examples tokenized as generation reads them, the loss
on the answer only, and saved adapters published whole."""
from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import ProgressCallback

from ...errors import FinetuneFailed
from ...types import ChatExample

RECORD = "semievol.json"
"""The file beside a saved adapter that names its base model (and how it was trained)."""


class TrainingBar(ProgressCallback):
    """Trainer's progress bar, named like the pipeline's other bars, with the running loss
    on it rather than a dict of metrics printed under it every ``logging_steps``."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def on_train_begin(self, args, state, control, **kwargs):
        super().on_train_begin(args, state, control, **kwargs)
        if self.training_bar is not None:
            self.training_bar.set_description(self.name)
            self.training_bar.unit = "step"

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.training_bar is not None and "loss" in (logs or {}):
            self.training_bar.set_postfix(loss=f"{float(logs['loss']):.3g}")


@contextmanager
def peft_wrapping():
    """Around peft wrapping a model: peft reads transformers' deprecated
    ``is_gradient_checkpointing`` every time, a warning about two libraries' versions on
    every fine-tune that is not the user's business."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated",
                                FutureWarning)
        yield


class AnswerCollator:
    """Pads training examples on the left (labels with -100, positions counted from each
    example's first real token, so padding changes nothing) and computes the output layer
    only for the positions that predict answer tokens.

    Left padding ends every example's answer at the last position, so the last
    ``logits_to_keep`` positions (the longest answer plus one) are enough for the loss; the
    labels are cut the same way, so the model's own shifted cross-entropy still lines up.
    With a 49k vocabulary and one-word answers this is a good part of the step time."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features: list[dict]) -> dict:
        width = max(len(f["input_ids"]) for f in features)

        def pad(key, value):
            return torch.tensor([[value] * (width - len(f[key])) + f[key] for f in features])

        labels = pad("labels", -100)
        mask = pad("attention_mask", 0)
        answer = max(len(f["labels"]) - next(i for i, x in enumerate(f["labels"]) if x != -100)
                     for f in features)
        keep = answer + 1
        return {"input_ids": pad("input_ids", self.pad_id), "attention_mask": mask,
                "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
                "labels": labels[:, -keep:], "logits_to_keep": keep}


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


def publish(saved: Path, final: Path, complete: str = RECORD) -> None:
    """Rename a complete directory (an adapter; the file ``complete`` is in every complete
    one) into place. Losing the race to another process (data-parallel ranks all save the
    same adapter) is fine: its copy is as good."""
    try:
        os.replace(saved, final)
    except OSError:
        if not (final / complete).is_file():
            raise
