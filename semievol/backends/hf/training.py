"""Training data for LoRA fine-tunes: examples tokenized as generation reads them, the loss
on the answer only, and saved adapters published whole."""
from __future__ import annotations

import os
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import ProgressCallback


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
    """Around peft adding an adapter: peft reads transformers' deprecated
    ``is_gradient_checkpointing`` every time, a warning about two libraries' versions on
    every fine-tune that is not the user's business. And a LoRA on SmolLM2's output layer
    (a Tinker LoRA with ``train_unembed``), whose weight is the input embeddings', makes peft
    warn that merging it is a complication: merged, it would change the input embeddings
    too. The backend never merges one (``HFBackend._on_tied_output``): nothing to act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated",
                                FutureWarning)
        warnings.filterwarnings("ignore", "Model has `tie_word_embeddings=True`", UserWarning)
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


def publish(saved: Path, final: Path, complete: str = RECORD) -> None:
    """Rename a complete directory (an adapter; the file ``complete`` is in every complete
    one) into place. Losing the race to another process (data-parallel ranks all save the
    same adapter) is fine: its copy is as good."""
    try:
        os.replace(saved, final)
    except OSError:
        if not (final / complete).is_file():
            raise
