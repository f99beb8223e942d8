"""``--backend tinker``: the Tinker API (Thinking Machines), or any server that speaks it
(``semievol serve``, Baseten Loops, SkyRL tx...), through the official ``tinker`` SDK
(``pip install "semievol[tinker]"``).

Tinker has no fine-tuning jobs: it trains LoRA by primitives. So the fine-tune is a loop
here, and :class:`TinkerBackend` is the Backend protocol over that loop, built (like
:class:`~.hosted.HostedBackend` over a job API) with a small adapter, :class:`Tinker`, that
carries the provider's name, key variable and dated price list. Everything hosted backends
share comes from :mod:`.hosted` and beside it: the key (:func:`~.hosted.resolve_key`, never
on disk), the records (:class:`~.hosted.Records`), spending and the budget
(:mod:`.spending`), the error translation (:func:`~.api_errors.sdk_errors`), progress lines
and ``runtime``.

* **Fine-tune** (warm-up and evolve): ``forward_backward`` with the ``cross_entropy`` loss,
  weights on the final assistant message's tokens only (as on hf: the prompt tokenized
  exactly as generation tokenizes it), each batch's weights summing to one (the mean loss
  over its answer tokens, as hf's), then ``optim_step`` (Adam) at the FinetuneConfig's
  learning rate under its schedule (cosine with warm-up ratio); rank, epochs, batch size
  and seed from it too. The evolve step starts from the warm-up's saved state
  (``create_training_client_from_state``: its weights and rank, a fresh optimizer, as hf).
* **Never pay twice.** A step's final state is saved as ``save_state(<slug of key>)`` and
  its sampler weights as ``save_weights_for_sampler(<slug of key>)``: one training state
  per fine-tune step on the server. A rerun finds them in the record
  ``workdir/jobs/<slug>.json`` or else by name among the account's checkpoints (the REST
  client's ``list_user_checkpoints``), and trains nothing. The record is written the moment
  a training run exists. A kill mid-training leaves no state to resume from (Tinker's SDK
  cannot delete a checkpoint on every server, and an interim state would be a second one):
  the rerun trains that step again in a new run, so at most one step's training is paid
  twice, never a finished one.
* **Generation**: the sampling client of the model (a ``tinker://.../sampler_weights/...``
  path, or a base model name), ``n`` samples per prompt, a raw-logit logprob for every
  sampled token (the stop token dropped, as hf drops it, so entropy means the same). Chat
  templates come from the model's own tokenizer (transformers, as the SDK's
  ``get_tokenizer``), loaded from the local Hugging Face cache: nothing is fetched when
  ``HF_HUB_OFFLINE=1``; semievol's own aliases (``smollm2-135m``) resolve as on hf.
* **Embeddings**: Tinker has none. ``--icp`` (retrieval) is refused before anything runs,
  naming the way out: ``--no-icp`` (the ``small`` recipe, this backend's default, has it
  off). ``embed`` raises the same ConfigError for library users.
* **Cost**: :data:`PRICES` (prefill, sample, train per 1M tokens, dated, with its source);
  ``--dry-run`` prices a run offline; ``--max-cost-usd`` checks each fine-tune and each
  generation call before it runs.
* **Errors**: the SDK's (``tinker.APIStatusError``..., the same Stainless classes as
  openai's and together's) through :func:`~.api_errors.sdk_errors`; a failed request
  (``RequestFailedError``, the server's own error) is a BackendError that quotes it.
"""
from __future__ import annotations

import math
import random
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import cached_property
from pathlib import Path

import numpy as np
import tinker
from tqdm.auto import tqdm

from .. import cost
from ..chatfile import encode_example
from ..errors import BackendError, ConfigError, FinetuneFailed
from ..rundir import slug
from ..types import ChatExample, Embeddings, Generation, Generations, Message, ModelRef, Usage
from .api_errors import scrub, sdk_errors
from .hosted import Records, api_runtime, resolve_key, say, whole_epochs
from .spending import Spending, check_priced

PRICES_AS_OF = "2026-01-05"
PRICES = {
    # USD per 1M tokens: input = prefill, output = sample, training = train. Tinker's
    # published table (thinkingmachines.ai/tinker, read 2026-01-05 as transcribed by the
    # tinker-training-cost skill; the Qwen3-8B row matches ENVIRONMENT.md's second-hand
    # quote). Override with --price MODEL=PREFILL,SAMPLE,TRAIN.
    "Qwen/Qwen3-4B-Instruct-2507": cost.Price(input=0.07, output=0.22, training=0.22),
    "Qwen/Qwen3-8B": cost.Price(input=0.13, output=0.40, training=0.40),
}
PRICES |= {f"ft:{model}": price for model, price in PRICES.items()}
"""A LoRA on a model samples at the model's own rates (``ft:BASE``: how the dry run names
the models it trains)."""
PRICE_LIST = cost.PriceList("Tinker", PRICES_AS_OF, PRICES)
NO_EMBEDDINGS = ("Tinker has no embeddings API, so in-context propagation (--icp: retrieval "
                 "of labeled examples) cannot run on --backend tinker: run with --no-icp (the "
                 "default 'small' recipe has it off)")


class Tinker:
    """The Tinker API as the registry and the dry run see a hosted provider; its lifecycle
    (``backend``) is :class:`TinkerBackend`, not the job lifecycle."""

    name = "tinker"
    title = "Tinker"
    key_env = "TINKER_API_KEY"
    local_key = "tml-semievol-local"
    """The key for a loopback server without one (the SDK insists on ``tml-`` keys)."""
    sdk = tinker
    sdk_error = tinker.TinkerError
    default_model = "Qwen/Qwen3-8B"
    default_embed_model = default_model
    """None exists: the dry run embeds nothing, --icp being refused."""
    min_finetune_examples = 1
    prices = PRICE_LIST

    @property
    def backend(self):
        return TinkerBackend

    def check(self, config) -> None:
        """Refuse a run this API cannot do before anything is spent."""
        if config.icp and config.k > 0:
            raise ConfigError(NO_EMBEDDINGS)


class TinkerBackend:
    """The Backend protocol over the Tinker API (see the module docstring)."""

    def __init__(self, api: Tinker, model: str | None = None, *, base_url: str | None = None,
                 api_key: str | None = None, workdir: str | Path | None = None,
                 prices: dict | None = None, max_cost_usd: float | None = None,
                 spent_usd: float = 0.0, timeout: float = 60.0, batch_mode: bool = False,
                 max_concurrency: int = 8, quiet: bool = False,
                 report_to: tuple[str, ...] = ()):
        """``base_url``: the server root (the SDK's ``base_url``; None: Tinker's own).
        ``workdir``: where step records are kept. ``timeout`` is kept for the error
        messages only: the SDK times and retries its own requests. The other options are
        :class:`~.hosted.HostedBackend`'s (``report_to`` is taken and unused: the loss curve
        goes back with each fine-tune)."""
        if batch_mode:
            raise ConfigError("Tinker has no batch API: drop --openai-batch")
        self.api = api
        self.name = api.name
        self.min_finetune_examples = api.min_finetune_examples
        self.default_model = model or api.default_model
        self.records = Records(workdir)
        self.prices = cost.price_table(prices, api.prices.table)
        if max_cost_usd is not None:
            check_priced(self.prices, api.title, self.default_model, self.default_model)
        self.spending = Spending(max_cost_usd, spent_usd)
        self.budget = self.spending.budget
        self.max_concurrency = max_concurrency
        self.quiet = quiet
        self.timeout = timeout
        self.base_url = base_url or "the Tinker API"
        self._secret = resolve_key(api_key, api, base_url)
        self.service = tinker.ServiceClient(base_url=base_url, api_key=self._secret)
        """Connects on its first request (always inside :meth:`errors`)."""
        self._base = base_url
        self._tokenizers: dict = {}
        self._samplers: dict = {}

    def __repr__(self) -> str:
        return f"TinkerBackend(model={self.default_model!r}, base_url={self.base_url!r})"

    @cached_property
    def rest(self):
        """The REST client (checkpoints, training runs); it connects when made, so it is
        made on first use, inside :meth:`errors`."""
        return tinker.RestClient(base_url=self._base, api_key=self._secret)

    # -- fine-tuning --------------------------------------------------------------------
    def finetune(self, base: str, examples: Sequence[ChatExample], config, *,
                 key: str) -> ModelRef:
        """A LoRA loop on ``base`` (a base model, or a sampler path this backend returned, to
        continue from its state); returns the sampler path of the trained weights. Reuses
        the step's saved weights when they exist (see the module docstring)."""
        epochs = whole_epochs(config.epochs, self.api.title)
        name = slug(key)
        record = self.records.read("jobs", key) or {"key": key}
        if not record.get("model"):
            self._find_saved(record, name)
        if record.get("model"):
            self.say(f"fine-tune {key}: found its saved weights {record['model']}; not "
                     "training again")
            return ModelRef(record["model"], self.spending.add(Usage(
                trained_tokens=record["trained_tokens"], cost_usd=record.get("cost_usd"))),
                losses=record.get("losses"))
        root = self._root(base)
        tok = self.tokenizer(root)
        data = [encode_example(tok, ex, config.max_length) for ex in examples]
        data = [d for d in data if any(label != -100 for label in d["labels"])]
        if not data:
            raise FinetuneFailed("no training example has an answer token left after "
                                 f"truncation to max_length={config.max_length}")
        trained = sum(len(d["input_ids"]) for d in data) * epochs
        usd = cost.training_cost(root, trained, prices=self.prices)
        self.say(f"fine-tuning {base} on Tinker: {len(data)} examples x {epochs} epochs = "
                 f"{trained:,} trained tokens"
                 + (f", about {cost.format_usd(usd)}" if usd is not None else ""))
        self.budget.check(f"fine-tuning {base} on {len(data)} examples", usd)
        with self.errors(f"fine-tuning {key}"):
            training = self._training_client(base, root, config)
            record.update(run=training.model_id, base=base, root=root, name=name,
                          examples=len(data), trained_tokens=trained, cost_usd=usd,
                          runs=record.get("runs", []) + [training.model_id])
            self.records.write("jobs", key, record)
            record["losses"] = self._train(training, data, config, epochs, key)
            record["state"] = training.save_state(name).result().path
            self.records.write("jobs", key, record)
            record["model"] = training.save_weights_for_sampler(name).result().path
        self.records.write("jobs", key, record)
        self.say(f"fine-tune {key}: {record['model']}")
        return ModelRef(record["model"], self.spending.add(Usage(trained_tokens=trained,
                                                                 cost_usd=usd)),
                        losses=record["losses"])

    def _train(self, training, data: list[dict], config, epochs: int, key: str) -> list:
        """Epochs of shuffled batches: forward_backward then optim_step, the learning rate
        on the config's schedule. Returns the loss curve, ``[step, loss]`` (each batch's
        loss per answer token, as the weights sum to 1)."""
        rng = random.Random(config.seed)
        batches = []
        for _ in range(epochs):
            order = list(range(len(data)))
            rng.shuffle(order)
            batches += [order[i:i + config.batch_size]
                        for i in range(0, len(order), config.batch_size)]
        bar = tqdm(total=len(batches), desc=f"fine-tune {key}", unit="step",
                   disable=self.quiet, file=sys.stderr, leave=False)
        losses = []
        try:
            for step, batch in enumerate(batches):
                rows = [data[i] for i in batch]
                weight = 1.0 / sum(sum(label != -100 for label in d["labels"]) for d in rows)
                grads = training.forward_backward([datum(d, weight) for d in rows],
                                                  "cross_entropy")
                update = training.optim_step(tinker.types.AdamParams(
                    learning_rate=learning_rate(config, step, len(batches))))
                loss = grads.result().metrics.get("loss:sum")
                update.result()
                bar.update(1)
                if loss is not None:
                    losses.append([step + 1, loss])
                    bar.set_postfix_str(f"loss {loss:.3f}")
        finally:
            bar.close()
        return losses

    def _training_client(self, base: str, root: str, config):
        if base.startswith("tinker://"):
            return self.service.create_training_client_from_state(state_path(base)).result()
        return self.service.create_lora_training_client(
            base_model=base, rank=config.lora_rank, seed=config.seed).result()

    def _root(self, base: str) -> str:
        """The base model under ``base`` (a sampler path's training run's)."""
        if not base.startswith("tinker://"):
            return base
        made = next((r for r in self.records.all("jobs") if r.get("model") == base), None)
        if made:
            return made["root"]
        with self.errors(f"looking up {base}"):
            return self.rest.get_training_run_by_tinker_path(base).result().base_model

    def _find_saved(self, record: dict, name: str) -> None:
        """Fill ``record`` from the step's checkpoints on the server, if it saved them: its
        sampler weights (done), or only its state (then its sampler weights are saved
        from it: no training)."""
        found: dict = {}
        with self.errors("listing checkpoints"):
            offset = 0
            while True:
                page = self.rest.list_user_checkpoints(limit=100, offset=offset).result()
                for c in page.checkpoints:
                    if c.checkpoint_id.rsplit("/", 1)[-1] == name:
                        found.setdefault(c.checkpoint_type, c.tinker_path)
                if len(page.checkpoints) < 100:
                    break
                offset += 100
            if "sampler" not in found and "training" in found:
                training = self.service.create_training_client_from_state(found["training"]) \
                    .result()
                found["sampler"] = training.save_weights_for_sampler(name).result().path
        if "sampler" in found:
            record.update(model=found["sampler"], state=found.get("training"))
            record.setdefault("trained_tokens", 0)
            self.say(f"found checkpoint {found['sampler']} for this step on the server")
            self.records.write("jobs", record["key"], record)

    # -- generation ---------------------------------------------------------------------
    def generate_with_logprobs(self, model: str, prompts: Sequence[list[Message]], *,
                               n: int = 1, temperature: float = 0.0, max_tokens: int = 64,
                               seed: int | None = None) -> Generations:
        """``n`` samples per prompt from the sampling client, all prompts in flight at once
        (the SDK's futures); the prompt billed once as prefill, the samples as sampled."""
        root = self._root(model)
        tok = self.tokenizer(root)
        inputs = [tok.apply_chat_template(list(p), tokenize=False, add_generation_prompt=True)
                  for p in prompts]
        ids = [tok(text, add_special_tokens=False)["input_ids"] for text in inputs]
        if self.budget.limit_usd is not None:
            self.budget.check(f"generating {n} x {len(prompts)} responses with {model}",
                              cost.chat_cost(root, sum(map(len, ids)),
                                             len(prompts) * n * max_tokens, prices=self.prices))
        stop = sorted(stop_tokens(tok))
        params = tinker.types.SamplingParams(max_tokens=max_tokens, temperature=temperature,
                                             seed=seed, stop=stop)
        with self.errors(f"sampling from {model}"):
            sampler = self._sampler(model)

            def sample(prompt_ids: list[int]):
                with self.errors(f"sampling from {model}"):
                    return sampler.sample(tinker.types.ModelInput.from_ints(prompt_ids),
                                          num_samples=n, sampling_params=params).result()

            with ThreadPoolExecutor(self.max_concurrency) as pool:
                results = list(pool.map(sample, ids))
        out = Generations()
        for prompt_ids, result in zip(ids, results):
            gens = [generation(tok, s, stop) for s in result.sequences]
            if len(gens) != n:
                raise BackendError(f"asked {model} for {n} samples, got {len(gens)}")
            sampled = sum(len(s.tokens) for s in result.sequences)
            out.append(gens)
            out.usage.add(prompt=len(prompt_ids), completion=sampled,
                          cost=cost.chat_cost(root, len(prompt_ids), sampled,
                                              prices=self.prices))
        self.spending.add(out.usage)
        return out

    def _sampler(self, model: str):
        if model not in self._samplers:
            self._samplers[model] = (
                self.service.create_sampling_client(model_path=model)
                if model.startswith("tinker://")
                else self.service.create_sampling_client(base_model=model)).result()
        return self._samplers[model]

    def tokenizer(self, base: str):
        """``base``'s tokenizer from the local Hugging Face cache (or semievol's own alias,
        as hf finds it): never fetched here when offline."""
        if base not in self._tokenizers:
            from transformers import AutoTokenizer

            try:
                self._tokenizers[base] = AutoTokenizer.from_pretrained(base)
            except (OSError, ValueError) as e:
                try:
                    from .hf.weights import GGUF_MODELS, cached, locate
                except ImportError:
                    GGUF_MODELS = {}
                if base not in GGUF_MODELS:
                    raise ConfigError(f"cannot load {base}'s tokenizer (chat template) here: "
                                      f"{e}. Download it once (huggingface-cli download "
                                      f"{base} --include 'tokenizer*') or give --model a "
                                      "local folder") from None
                path, extra = locate(cached(base))
                self._tokenizers[base] = AutoTokenizer.from_pretrained(path, **extra)
        return self._tokenizers[base]

    # -- embeddings ---------------------------------------------------------------------
    def embed(self, texts: Sequence[str]) -> Embeddings:
        raise ConfigError(NO_EMBEDDINGS)

    def runtime(self) -> dict:
        return api_runtime()

    # -- plumbing -----------------------------------------------------------------------
    @contextmanager
    def errors(self, what: str):
        """The SDK's errors become semievol's (:func:`~.api_errors.sdk_errors`)."""
        with sdk_errors(tinker, what, where=self.base_url, retries="the SDK's",
                        timeout=self.timeout, secret=self._secret, key_env=self.api.key_env,
                        base=tinker.TinkerError):
            yield

    def say(self, message: str) -> None:
        say(message, quiet=self.quiet)

    def scrub(self, text: str) -> str:
        return scrub(text, self._secret)


def datum(row: dict, weight: float):
    """One encoded example as a Tinker datum: predict token t+1 from tokens up to t, the
    loss weighted on the answer's tokens only."""
    ids, labels = row["input_ids"], row["labels"]
    weights = [weight if label != -100 else 0.0 for label in labels[1:]]
    return tinker.types.Datum(
        model_input=tinker.types.ModelInput.from_ints(ids[:-1]),
        loss_fn_inputs={"target_tokens": np.asarray(ids[1:], dtype=np.int64),
                        "weights": np.asarray(weights, dtype=np.float32)})


def learning_rate(config, step: int, total: int) -> float:
    """The config's learning rate at ``step`` of ``total``: linear warm-up over
    ``warmup_ratio`` of the steps, then cosine to zero (or constant), as transformers'
    schedules that hf trains with."""
    warmup = math.ceil(config.warmup_ratio * total)
    if step < warmup:
        return config.learning_rate * (step + 1) / (warmup + 1)
    if config.lr_scheduler != "cosine":
        return config.learning_rate
    progress = (step - warmup) / max(1, total - warmup)
    return config.learning_rate * 0.5 * (1 + math.cos(math.pi * progress))


def state_path(sampler_path: str) -> str:
    """The training state saved beside a step's sampler weights (both under its name)."""
    return sampler_path.replace("/sampler_weights/", "/weights/")


def stop_tokens(tok) -> set[int]:
    """The ids that end a reply: the end-of-sequence token and the chat template's end of
    turn."""
    ids = {tok.eos_token_id}
    for text in ("<|im_end|>", "<|eot_id|>", "<|end|>"):
        token = tok.convert_tokens_to_ids(text)
        if isinstance(token, int) and token != tok.unk_token_id:
            ids.add(token)
    return {i for i in ids if i is not None}


def generation(tok, sequence, stop: Sequence[int]) -> Generation:
    """A sampled sequence as a Generation, the stop token dropped (hf's decode loop never
    counts it, so entropies agree)."""
    tokens, logprobs = list(sequence.tokens), list(sequence.logprobs or [])
    if len(logprobs) != len(tokens):
        raise BackendError(f"the server returned {len(tokens)} tokens but "
                             f"{len(logprobs)} logprobs")
    finish = "stop" if sequence.stop_reason == "stop" else "length"
    if tokens and tokens[-1] in stop:
        tokens, logprobs = tokens[:-1], logprobs[:-1]
    return Generation(text=tok.decode(tokens, skip_special_tokens=True),
                      tokens=tuple(tok.convert_ids_to_tokens(tokens)),
                      logprobs=tuple(float(x) for x in logprobs), finish_reason=finish)
