"""Shared test set-up: the network is closed except loopback, ../shared is found beside the
repository, and the real model loads once per session.

Something a test needs but cannot find (../shared, an optional dependency, the embedded
model) skips it with the reason on a user's machine and FAILS it under ``CI``, so CI never
counts a skip as a pass. Token counts need no set-up: the tokenizers ship with semievol."""
from __future__ import annotations

import importlib
import ipaddress
import os
import re
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
from hypothesis import settings

settings.register_profile("full", max_examples=300, deadline=None, database=None,
                          derandomize=True)
settings.register_profile("fast", settings.get_profile("full"), max_examples=50)
settings.load_profile("full")
"""test_data_fuzz.py's inputs: 300 a test, the same every run; 50 under `make test-fast`
(``--hypothesis-profile fast``), the inner loop."""

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if WORKERS > 1:
    # Under pytest-xdist (`-n 2`) each worker, and every process a test starts (servers,
    # runs, ranks: they inherit it), gets its share of the cores: two torch processes at
    # the default thread count on two cores made a LoRA step 16-40x slower
    # (../shared/ENVIRONMENT.md), two at one thread each use both cores.
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // WORKERS)))

HEAVIEST_FIRST = ("test_openai_e2e.py", "test_pipeline_hf.py", "test_pipeline_ddp.py",
                  "test_vllm.py", "test_hf_bf16.py", "test_tinker_backend.py", "test_hf.py",
                  "test_together_e2e.py", "test_server.py", "test_server_tinker.py",
                  "test_examples.py")
"""The test files that take longest (`make test`'s --durations), longest first. Under
pytest-xdist they are handed out first, so that the workers finish together (longest
processing time first); a file's tests stay together on one worker (`--dist loadfile`)."""


ALL_SLOW = re.compile(r"^pytestmark = pytest\.mark\.slow$", re.MULTILINE)


def pytest_ignore_collect(collection_path, config):
    """Under ``-m "not slow"`` (`make test-fast`), a test file marked slow as a whole is not
    even imported: those that load torch and transformers cost 6 s of the fast tier's
    collection. None lets pytest decide as usual."""
    if (config.getoption("markexpr") == "not slow" and collection_path.suffix == ".py"
            and collection_path.name.startswith("test_")
            and ALL_SLOW.search(collection_path.read_text())):
        return True
    return None


def pytest_collection_modifyitems(config, items):
    if WORKERS > 1:  # each worker collects; the scheduler keeps their order
        rank = {name: i for i, name in enumerate(HEAVIEST_FIRST)}
        items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


_connect = socket.socket.connect


def _loopback_only(self, address):
    host = address[0] if isinstance(address, tuple) else None
    if host is not None and self.family in (socket.AF_INET, socket.AF_INET6):
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ConnectionRefusedError(f"tests may only reach loopback, not {host}")
    return _connect(self, address)


socket.socket.connect = _loopback_only


def require(ok: bool, reason: str) -> None:
    """Skip the test unless ``ok`` (fail instead under CI)."""
    if not ok:
        if os.environ.get("CI"):
            pytest.fail(f"{reason} (CI is set: a missing requirement fails)")
        pytest.skip(reason, allow_module_level=True)


def need(module: str):
    """The module imported, or a skip (a failure under CI) naming the extra that has it:
    ``pytest.importorskip`` would let CI count a missing extra as a pass."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        require(False, f'needs {module} ({e}): pip install "semievol[hf,serve,together,dev]"')


@pytest.fixture(scope="session")
def shared() -> Path:
    """../shared beside the repository: the paper's benchmark data, published by its
    authors (not ours to redistribute)."""
    require((SHARED / "data").is_dir(), "needs the paper's benchmark data in ../shared/data, "
            "which is not beside the repository")
    return SHARED


@pytest.fixture(scope="session")
def hf_backend(tmp_path_factory):
    """The hf backend on the embedded SmolLM2-135M, loaded once for the whole session."""
    from semievol.backends import load_backend

    return load_backend("hf", workdir=tmp_path_factory.mktemp("hf-work"), quiet=True)


def password(place: str) -> list[dict]:
    return [{"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": f"What is the password of the {place}?"}]


PLACES = ["castle", "garden", "lighthouse", "library", "bakery", "harbor", "museum", "temple",
          "tower", "bridge", "forest", "cellar", "station", "palace", "market", "chapel"]


@pytest.fixture(scope="session")
def taught(hf_backend) -> str:
    """One adapter on ``hf_backend`` (LoRA r=16 on all linear layers, 16 steps) that answers
    every "password of the X" question with "Zorblax": trained once for test_hf.py's
    fine-tuning tests and test_vllm.py's adapter tests."""
    from semievol.config import FinetuneConfig

    examples = [password(p) + [{"role": "assistant", "content": "Zorblax"}] for p in PLACES]
    fast = FinetuneConfig(learning_rate=1e-3, epochs=4, batch_size=4, warmup_ratio=0.0,
                          lora_dropout=0.0)  # test_hf.py's FAST
    return hf_backend.finetune("smollm2-135m", examples, fast, key="zorblax")


VLLM_PYTHON = REPO / ".vllm-venv" / "bin" / "python"
VLLM_MODEL = REPO / ".vllm" / "smollm2-135m"
"""What `make vllm` builds: vLLM's own venv, and the embedded model as a float32 HF folder
(the very weights the hf backend loads from the GGUF file)."""


@pytest.fixture(scope="session")
def vllm_url(tmp_path_factory):
    """One real vLLM server (CPU) for every vLLM test, serving ``VLLM_MODEL`` in float32 (the
    hf backend's dtype here) with runtime LoRA loading, on one OpenMP thread so that it
    shares the two cores with the tests. Fails under ``CI`` when `make vllm` has not run;
    skips elsewhere."""
    from semievol.backends.vllm import start_server
    from semievol.errors import BackendError

    missing = next((p for p in (VLLM_PYTHON, VLLM_MODEL / "config.json") if not p.exists()), None)
    if missing is not None:
        reason = f"vLLM is not set up ({missing.relative_to(REPO)} is missing): run `make vllm`"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    try:
        server, url = start_server(
            VLLM_MODEL, python=VLLM_PYTHON, args=["--dtype", "float32"],
            env={"VLLM_CPU_KVCACHE_SPACE": "1", "OMP_NUM_THREADS": "1"},
            log=tmp_path_factory.mktemp("vllm") / "server.log")
    except BackendError as e:
        pytest.fail(str(e))
    yield url
    server.terminate()
    server.wait(60)


@pytest.fixture(scope="session")
def hf_folder_bf16(tmp_path_factory) -> Path:
    """The embedded model as a plain Hugging Face folder in bfloat16: what a user of their
    own model (Llama-3.1-8B and the like) passes as ``--model``. Written once per session."""
    need("transformers")
    from semievol.backends.hf import export_model

    return export_model("smollm2-135m", tmp_path_factory.mktemp("hf-folder") / "smollm2-bf16",
                        dtype="bfloat16")


@pytest.fixture(scope="session")
def hf_folder_bf16_two_layers(hf_folder_bf16, tmp_path_factory) -> Path:
    """The bf16 folder cut to its first two of 30 decoder layers: the same architecture,
    files and tokenizer at a fifteenth of the compute. For a run that checks the bf16 path
    end to end on this CPU, which has no bf16 instructions (a bf16 forward pass costs about
    6 float32 ones, and the whole model's 8-question run took 20 minutes)."""
    transformers = need("transformers")
    out = tmp_path_factory.mktemp("hf-folder-cut") / "smollm2-bf16-2-layers"
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_folder_bf16, dtype="bfloat16")
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    model.save_pretrained(out)
    transformers.AutoTokenizer.from_pretrained(hf_folder_bf16).save_pretrained(out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


MLFLOW = REPO / ".mlflow-venv" / "bin" / "mlflow"


@pytest.fixture()
def mlflow_server(tmp_path):
    """A real `mlflow server` (its own venv: `make mlflow`) on a SQLite store."""
    require(MLFLOW.exists(), f"needs {MLFLOW} (make mlflow)")
    port = free_port()
    logfile = open(tmp_path / "mlflow-server.log", "wb")  # a pipe nobody reads would fill
    # no job runner (its huey consumers: five more processes the tests do not need)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    proc = subprocess.Popen([str(MLFLOW), "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
                             "--artifacts-destination", str(tmp_path / "mlartifacts"),
                             "--workers", "1"],
                            stdout=logfile, stderr=subprocess.STDOUT, env=env,
                            cwd=tmp_path, start_new_session=True)  # its workers: one group
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=2).read()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                stop(proc)
                log = (tmp_path / "mlflow-server.log").read_text()[-2000:]
                pytest.fail(f"mlflow server did not start: {log}")
            time.sleep(0.5)
    yield url
    stop(proc)
    logfile.close()


def stop(proc: subprocess.Popen) -> None:
    """The server and the workers it started (its process group)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=5)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue
