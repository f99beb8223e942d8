"""LoRA training and sampling by primitives, on the hf backend's in-memory model: what a
Tinker-style API asks of a local model (``semievol serve`` speaks it, see
:mod:`semievol.server.tinker`).

- :meth:`Primitives.create` adds a fresh trainable LoRA adapter (by name) to the base model,
  with an AdamW optimizer over its weights.
- :meth:`Primitives.forward_backward` runs token sequences through it and returns each
  target token's log-probability; with ``backward`` it also adds the gradient of the
  weighted cross-entropy ``-sum(weights * logprobs)`` to the adapter's gradients, which
  accumulate over calls until :meth:`Primitives.optim_step` applies them (Adam with the
  step's own learning rate, betas, eps and decoupled weight decay) and clears them.
- :meth:`Primitives.save` writes the adapter as a directory the backend serves as a model
  (``adapter_config.json`` + ``semievol.json``), with the optimizer's state when asked;
  :meth:`Primitives.load` makes a trainable adapter from such a directory.
- :meth:`Primitives.sample` samples n continuations of a token prompt from a model
  reference (the base model or a saved adapter directory) with the backend's own decode
  loop, each sampled token with its raw log-probability.

Every call must hold the backend's lock (the server's): they share one model with the
backend's generation and fine-tuning.
"""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from ...errors import BackendError
from .decode import decode, input_device, left_pad, output_device, stop_ids, teacher_forced
from .training import RECORD, peft_wrapping

LORA_ALPHA = 32
"""Tinker fixes alpha at 32 whatever the rank (its docs); so do we."""
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
MLP = ["gate_proj", "up_proj", "down_proj"]
OPTIMIZER_FILE = "optimizer.pt"
MICRO_BATCH = 8
"""Sequences per forward pass in :meth:`Primitives.forward_backward` (their gradients add
up): the float32 logits of 8 x 512 tokens over SmolLM2's 49k vocabulary are 0.8 GB."""


@dataclass
class Run:
    """One trainable adapter and its optimizer."""

    adapter: str
    rank: int
    optimizer: torch.optim.AdamW
    targets: list[str]


@dataclass(frozen=True)
class Sample:
    tokens: list[int]
    logprobs: list[float]
    stop_reason: str
    """"stop" (a stop token or string ended it; it is the last token) or "length"."""


class Primitives:
    """Training runs (by name) on one :class:`~semievol.backends.hf.HFBackend`."""

    def __init__(self, backend):
        self.backend = backend
        self.runs: dict[str, Run] = {}

    # -- training -------------------------------------------------------------------------
    def create(self, name: str, *, rank: int, seed: int | None = None, train_mlp: bool = True,
               train_attn: bool = True, train_unembed: bool = True) -> None:
        """A fresh LoRA adapter ``name`` of ``rank`` on the base model (the same weights
        for the same ``seed``), with a new optimizer."""
        targets = (ATTENTION if train_attn else []) + (MLP if train_mlp else []) + \
            (["lm_head"] if train_unembed else [])
        if not targets:
            raise BackendError("a LoRA needs at least one of train_mlp, train_attn, "
                               "train_unembed")
        model = self.backend.bare_model()
        lora = LoraConfig(r=rank, lora_alpha=LORA_ALPHA, lora_dropout=0.0,
                          target_modules=targets, task_type="CAUSAL_LM")
        if seed is not None:
            torch.manual_seed(seed)
        with peft_wrapping():
            if isinstance(model, PeftModel):
                model.add_adapter(name, lora)
            else:
                self.backend.model = get_peft_model(model, lora, adapter_name=name)
        self._register(name, rank, targets)

    def load(self, name: str, directory: str | Path, *, optimizer: bool) -> None:
        """A trainable adapter ``name`` from a directory :meth:`save` wrote, with its
        optimizer's state when ``optimizer`` (else a new optimizer)."""
        directory = Path(directory)
        record = json.loads((directory / RECORD).read_text())
        model = self.backend.bare_model()
        with peft_wrapping():
            if isinstance(model, PeftModel):
                model.load_adapter(str(directory), adapter_name=name, is_trainable=True)
            else:
                self.backend.model = PeftModel.from_pretrained(
                    model, str(directory), adapter_name=name, is_trainable=True)
        run = self._register(name, record["rank"], record["targets"])
        if optimizer:
            if not (directory / OPTIMIZER_FILE).is_file():
                raise BackendError("this checkpoint holds no optimizer state (saved for "
                                   "sampling only)")
            run.optimizer.load_state_dict(torch.load(directory / OPTIMIZER_FILE,
                                                     weights_only=True))

    def forward_backward(self, name: str, data: list[tuple[list[int], np.ndarray, np.ndarray]],
                         *, backward: bool = True) -> tuple[list[np.ndarray], float]:
        """Per-datum log-probabilities of the target tokens, and the weighted loss.

        ``data``: (input tokens, target tokens, weights), targets and weights as long as
        the input; target ``i`` is the token predicted after input position ``i``. The
        loss is ``-sum(weights * logprobs)`` over every datum; with ``backward`` its
        gradient is added to the adapter's (accumulated until :meth:`optim_step`)."""
        model = self._train_mode(name)
        logprobs, loss = [], 0.0
        for start in range(0, len(data), MICRO_BATCH):
            rows, part = self._pass(model, data[start:start + MICRO_BATCH], backward)
            logprobs += rows
            loss += part
        return logprobs, loss

    def _pass(self, model, data, backward: bool) -> tuple[list[np.ndarray], float]:
        """One micro-batch of :meth:`forward_backward` (right-padded)."""
        tok = self.backend.tokenizer
        width = max(len(tokens) for tokens, _, _ in data)
        device = input_device(model)
        ids = torch.full((len(data), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(data), width), dtype=torch.long)
        targets = torch.zeros((len(data), width), dtype=torch.long)
        weights = torch.zeros((len(data), width), dtype=torch.float32)
        for row, (tokens, target, weight) in enumerate(data):
            n = len(tokens)
            ids[row, :n], mask[row, :n] = torch.tensor(tokens), 1
            targets[row, :n] = torch.from_numpy(np.asarray(target, dtype=np.int64))
            weights[row, :n] = torch.from_numpy(np.asarray(weight, dtype=np.float32))
        with torch.set_grad_enabled(backward):
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            logprobs = torch.log_softmax(logits.float(), -1).gather(
                2, targets.to(logits.device)[..., None])[..., 0]
            loss = -(logprobs * weights.to(logprobs.device)).sum()
            if backward:
                loss.backward()
        rows = logprobs.detach().cpu().numpy()
        return [rows[row, :len(tokens)].copy() for row, (tokens, _, _) in enumerate(data)], \
            float(loss.detach())

    def optim_step(self, name: str, *, learning_rate: float, beta1: float, beta2: float,
                   eps: float, weight_decay: float, grad_clip_norm: float = 0.0) -> dict:
        """Apply the accumulated gradients with Adam (decoupled weight decay), then clear
        them. ``grad_clip_norm`` > 0 clips the global gradient norm first."""
        run = self._run(name)
        params = [p for group in run.optimizer.param_groups for p in group["params"]]
        norm = torch.nn.utils.clip_grad_norm_(
            params, grad_clip_norm if grad_clip_norm > 0 else float("inf"))
        for group in run.optimizer.param_groups:
            group.update(lr=learning_rate, betas=(beta1, beta2), eps=eps,
                         weight_decay=weight_decay)
        run.optimizer.step()
        run.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm:mean": float(norm)}

    def save(self, name: str, directory: str | Path, *, optimizer: bool) -> int:
        """Write the adapter (and the optimizer's state when ``optimizer``) to the new
        directory ``directory``; its size in bytes."""
        run, model = self._run(name), self._train_mode(name)
        directory = Path(directory)
        model.save_pretrained(str(directory), selected_adapters=[name],
                              save_embedding_layers=False)
        saved = directory / name  # peft saves a non-"default" adapter in its own folder
        for item in saved.iterdir():
            item.rename(directory / item.name)
        saved.rmdir()
        if optimizer:
            torch.save(run.optimizer.state_dict(), directory / OPTIMIZER_FILE)
        record = {"base": self.backend.base_ref, "rank": run.rank, "targets": run.targets,
                  "lora_alpha": LORA_ALPHA}
        (directory / RECORD).write_text(json.dumps(record, indent=2) + "\n")
        return sum(f.stat().st_size for f in directory.iterdir())

    def drop(self, name: str) -> None:
        """Forget a training run and its adapter (the last adapter gone, the bare base
        model again: peft would keep naming the deleted one as active)."""
        if self.runs.pop(name, None) is None:
            return
        model = self.backend.bare_model()
        with warnings.catch_warnings():  # "was active ... now deleted": the next call sets one
            warnings.filterwarnings("ignore", "Adapter .* was active", UserWarning)
            model.delete_adapter(name)
        if not model.peft_config:
            self.backend.model = model.unload()

    # -- sampling -------------------------------------------------------------------------
    def sample(self, model: str, prompt: list[int], *, n: int, temperature: float,
               max_tokens: int, stop: list[int] | list[str] | None = None,
               seed: int | None = None, prompt_logprobs: bool = False
               ) -> tuple[list[Sample], list[float] | None]:
        """n samples after ``prompt`` from ``model`` (a base reference or an adapter
        directory), by the backend's decode loop: the prompt is read once and each token's
        log-probability is taken from the raw logits (not temperature-scaled). ``stop``:
        None stops at the model's end-of-turn tokens; token ids or strings replace them
        (``[]``: run to ``max_tokens``). The stop token, or the token that completes a stop
        string, is the last token returned. With ``prompt_logprobs``, also each prompt
        token's log-probability after the tokens before it (NaN for the first), by the
        backend's teacher-forced scorer."""
        backend = self.backend
        scored = None
        with backend.active(model) as lm:
            if prompt_logprobs:
                with torch.inference_mode():
                    scored = [float("nan")] + teacher_forced(
                        lm, backend.tokenizer.pad_token_id, [prompt[:1]], [prompt[1:]])[0]
            tok = backend.tokenizer
            strings = [s for s in stop or [] if isinstance(s, str)]
            ids = sorted(stop_ids(tok, lm)) if stop is None else \
                [s for s in stop if not isinstance(s, str)]
            device = output_device(lm)
            generator = torch.Generator(device)
            generator.seed() if seed is None else generator.manual_seed(seed)
            input_ids, mask = left_pad([prompt], tok.pad_token_id, input_device(lm))
            tokens, logprobs, lengths = decode(
                lm, input_ids, mask, n=n, temperature=temperature, max_tokens=max_tokens,
                stop=torch.tensor(ids, dtype=torch.long, device=device), generator=generator)
        out = []
        for row_ids, row_lps, length in zip(tokens.tolist(), logprobs.tolist(),
                                            lengths.tolist()):
            end = min(length + 1, max_tokens)  # the stop token too, with its logprob
            reason = "stop" if length < max_tokens else "length"
            cut = _stop_string(tok, row_ids[:end], strings)
            if cut is not None:
                end, reason = cut, "stop"
            out.append(Sample(row_ids[:end], row_lps[:end], reason))
        return out, scored

    # -- plumbing ------------------------------------------------------------------------
    def _register(self, name: str, rank: int, targets: list[str]) -> Run:
        model = self.backend.model
        params = [p for key, p in sorted(model.named_parameters()) if f".{name}." in key]
        for p in params:
            p.requires_grad_(True)
        run = Run(name, rank, torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95),
                                                eps=1e-12, weight_decay=0.0), targets)
        self.runs[name] = run
        model.set_adapter(name)
        model.eval()
        return run

    def _run(self, name: str) -> Run:
        try:
            return self.runs[name]
        except KeyError:
            raise BackendError(f"no training run {name!r} in this server process") from None

    def _train_mode(self, name: str):
        """The model with adapter ``name`` active and trainable (nothing folded in)."""
        self._run(name)
        model = self.backend.bare_model()
        model.set_adapter(name)
        for key, p in model.named_parameters():
            if f".{name}." in key:
                p.requires_grad_(True)
        return model


def _stop_string(tok, ids: list[int], strings: list[str]) -> int | None:
    """How many tokens to keep so that the text ends with the first stop string it
    reaches (None: it reaches none)."""
    if not strings:
        return None
    for end in range(1, len(ids) + 1):
        text = tok.decode(ids[:end])
        if any(s in text for s in strings):
            return end
    return None
