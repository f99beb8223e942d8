"""Generation on a vLLM server, for the hf backend (``HFBackend(vllm_url=...)``): training
and embeddings stay local, every ``generate_with_logprobs`` goes to vLLM's
OpenAI-compatible chat endpoint.

What the server must be:

* serving the base model the hf backend trains on, the same weights (for the embedded
  model, the folder ``semievol export smollm2-135m DIR --dtype float32`` writes); its id is
  read from ``/v1/models``;
* started with ``--enable-lora --max-lora-rank R`` (R at least the adapters' rank) and
  ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True`` in its environment, so adapters can be added
  while it runs;
* able to read the adapter directories under the paths this process sees (same machine, or
  a filesystem shared at the same path): vLLM is sent the path, not the weights.

Each adapter directory is loaded once (``POST /v1/load_lora_adapter``) under a name made of
its folder name and a digest of its files, and re-used whenever ``/v1/models`` already lists
that name (a resumed run, a second process); an adapter retrained at the same path gets a
new name.

Requests go through the OpenAI backend's client (the SDK's retries, error translation,
usage accounting): one chat completion per prompt with its ``n`` samples and token
logprobs, many in flight at once so that vLLM batches them. At temperature 0 one sample is
asked for and repeated, as the local loop does. Sampling parameters that vLLM would
otherwise take from the model's ``generation_config.json`` (``top_p``, ``top_k``, penalties)
are sent neutral, so the samples come from the whole temperature-scaled distribution, as
locally. Log-probabilities are vLLM's default ``--logprobs-mode raw_logprobs``: taken from
the logits before temperature or any processor, the quantity the local loop reports (a
server started with a ``processed_*`` mode would break that). vLLM lists the end-of-turn
token among a stopped response's tokens (its text leaves it out); the local loop leaves it
out of both, so it is dropped here.

Errors::

    openai.OpenAIError while generating ──> BackendError (the OpenAI backend's messages)
    /v1/models or /v1/load_lora_adapter ──> BackendError (with what to fix on the server)
"""
from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import openai

from ..errors import BackendError
from ..types import Generation, Generations, Message
from .openai import OpenAIBackend

__all__ = ["VLLMServer", "served_name", "start_server"]

NEUTRAL_SAMPLING = {"top_p": 1.0, "top_k": 0, "min_p": 0.0, "repetition_penalty": 1.0,
                    "presence_penalty": 0.0, "frequency_penalty": 0.0}
"""Sent with every request, overriding what vLLM reads from the model's generation config
(Llama-3.1-Instruct's sets top_p 0.9)."""


class VLLMServer:
    """A running vLLM server that the hf backend generates on.

    ``url``: the server's address (``http://host:8000``, with or without ``/v1``).
    ``api_key``: the server's
    ``--api-key``, else ``$VLLM_API_KEY`` (never ``$OPENAI_API_KEY``). ``timeout``: seconds
    per request; ``max_concurrency``: requests in flight at once."""

    def __init__(self, url: str, *, api_key: str | None = None,
                 timeout: float = 600.0, max_concurrency: int = 64):
        base = url.rstrip("/")
        self.url = base if base.endswith("/v1") else base + "/v1"
        self.api = OpenAIBackend(base_url=self.url, timeout=timeout, max_retries=2,
                                 api_key=api_key or os.environ.get("VLLM_API_KEY") or "EMPTY",
                                 max_concurrency=max_concurrency, extra_body=NEUTRAL_SAMPLING,
                                 quiet=True)
        self._base: str | None = None
        self._names: dict[str, str] = {}
        """adapter directory -> its name on the server, once known to be loaded there."""

    def __repr__(self) -> str:
        return f"VLLMServer({self.url!r})"

    def generate(self, adapter: str | None, prompts: Sequence[list[Message]], *, n: int,
                 temperature: float, max_tokens: int,
                 seed: int | None) -> Generations:
        """n generations per prompt from the base model, or through ``adapter`` (a LoRA
        adapter directory), with raw token log-probabilities."""
        if not prompts:
            return Generations()
        samples = 1 if temperature == 0 else n
        out = self.api.generate_with_logprobs(
            self.model_id(adapter), prompts, n=samples, temperature=temperature,
            max_tokens=max_tokens, seed=seed)
        return Generations(([_without_stop_token(g) for g in gens] * (n // samples)
                            for gens in out), out.usage)

    def model_id(self, adapter: str | None = None) -> str:
        """The server's name for the base model, or for ``adapter`` (loaded if needed)."""
        if adapter is None:
            if self._base is None:
                bases = [m.id for m in self.models() if getattr(m, "parent", None) is None]
                if not bases:
                    raise BackendError(f"the vLLM server at {self.url} lists no base model")
                self._base = bases[0]
            return self._base
        adapter = str(Path(adapter).resolve())
        if adapter not in self._names:
            name = served_name(adapter)
            if name not in {m.id for m in self.models()}:
                self._load(name, adapter)
            self._names[adapter] = name
        return self._names[adapter]

    def _load(self, name: str, adapter: str) -> None:
        try:
            with self._errors(f"loading adapter {adapter}"):
                self.api.client.post("/load_lora_adapter", cast_to=str,
                                     body={"lora_name": name, "lora_path": adapter})
        except BackendError:
            if name not in {m.id for m in self.models()}:  # not loaded meanwhile by another
                raise

    def models(self) -> list:
        """What the server holds (``/v1/models``): the base model (``parent`` None) and the
        loaded adapters, each with its ``id`` and ``root`` (the path it was loaded from)."""
        with self._errors("listing models"):
            return list(self.api.client.models.list())

    @contextmanager
    def _errors(self, what: str):
        """The server's own errors, with what to fix where we know it."""
        try:
            yield
        except openai.APIStatusError as e:
            hint = {404: ": start vLLM with --enable-lora and "
                         "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True",
                    400: " (is the adapter's directory readable by the server, under this "
                         "path, and its rank within --max-lora-rank?)"}.get(e.status_code, "")
            raise BackendError(f"{what} on the vLLM server at {self.url}: HTTP "
                               f"{e.status_code}: {e.message}{hint}") from None
        except openai.OpenAIError as e:
            raise BackendError(f"{what}: could not reach the vLLM server at {self.url}: "
                               f"{e}") from None


def start_server(model: str | Path, *, python: str | Path = sys.executable,
                 args: Sequence[str] = (), env: dict[str, str] | None = None,
                 log: str | Path | None = None,
                 timeout: float = 300.0) -> tuple[subprocess.Popen, str]:
    """Start vLLM's OpenAI-compatible server for ``model`` (an HF folder) on a free loopback
    port, the way semievol's tests and benchmarks run it: runtime LoRA loading on, LoRA
    rank up to 16, 2048-token context, no chunked prefill (vLLM 0.32 on CPU kills its
    engine on a seeded request whose prompt is split over steps: "CPU Generator does not
    use offset"), plus ``args`` (e.g. ``["--dtype", "float32"]``) and
    ``env``. ``python`` is the interpreter that has vLLM (its own venv). Waits until
    ``/health`` answers; returns the process (terminate it when done) and the URL. Output
    goes to ``log`` (default: discarded). Users run their own server their own way."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    command = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model),
               "--host", "127.0.0.1", "--port", str(port), "--enable-lora",
               "--max-lora-rank", "16", "--max-model-len", "2048",
               "--no-enable-chunked-prefill", *args]
    environment = {**os.environ, "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
                   "VLLM_NO_USAGE_STATS": "1", **(env or {})}
    with open(log or os.devnull, "w") as out:
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                  env=environment)
    deadline = time.monotonic() + timeout
    while server.poll() is None and time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return server, url
        except OSError:
            time.sleep(1)
    server.kill()
    server.wait()
    tail = Path(log).read_text()[-3000:] if log else ""
    raise BackendError(f"the vLLM server for {model} did not start within {timeout:g} s "
                       f"(exit code {server.returncode}):\n{tail}")


def served_name(adapter: str | Path) -> str:
    """The name an adapter directory is loaded under: its folder name and a digest of its
    files, so equal adapters share it and a retrained one gets another."""
    digest = hashlib.sha256()
    for path in sorted(Path(adapter).iterdir()):
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return f"{Path(adapter).name}-{digest.hexdigest()[:12]}"


def _without_stop_token(g: Generation) -> Generation:
    if g.finish_reason != "stop" or not g.tokens:
        return g
    return Generation(text=g.text, tokens=g.tokens[:-1], logprobs=g.logprobs[:-1],
                      finish_reason=g.finish_reason)
