"""``semievol export RUN_DIR``: a run's model where people look for one, with a model card.

A local (hf) run's model is a PEFT LoRA adapter inside ``RUN_DIR/backend``; export writes
it as a plain adapter folder (``PeftModel.from_pretrained(base, DIR)`` loads it) or, with
``merge``, as merged weights and tokenizer. A hosted run's model lives at its provider:
export writes the card and ``model.json`` naming the provider's model id. Either way the
folder gets a README.md model card (YAML metadata, then what the run did: data sizes,
recipe, the guard's decision and its evidence, vanilla / SFT / SemiEvol test scores,
pseudo-label statistics), is written beside ``out`` and renamed into place (nothing half
written), and is exactly what ``push_to_hub`` uploads.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from .errors import BackendError, BackendUnavailable, ConfigError
from .results import Results

WHICH = {"final": "final", "semievol": "evolved", "sft": "warm"}
"""``--model`` -> the results.json ``models`` entry it exports."""

HUB_IDS = {"smollm2-135m": "HuggingFaceTB/SmolLM2-135M-Instruct"}
"""Aliases of embedded models -> the Hub id of the model they hold (the card's
``base_model`` and the adapter's ``base_model_name_or_path``)."""

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / "results.json").is_file() or (Path(path) / "manifest.json").is_file()


def export(run_dir: str | Path, out: str | Path, *, model: str = "final", merge: bool = False,
           dtype: str = "float32") -> Path:
    """Write ``run_dir``'s ``model`` (final, semievol or sft) to ``out``; return ``out``."""
    run_dir, out = Path(run_dir), Path(out)
    results_path = run_dir / "results.json"
    if not results_path.is_file():
        raise ConfigError(f"{run_dir} has no results.json: finish the run (run it again "
                          "to resume) before exporting its model")
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"{out} exists and is not empty: choose a new --out")
    results = Results.read(run_dir)
    if model not in WHICH:
        raise ConfigError(f"--model {model!r}: choose from {', '.join(WHICH)}")
    ref = results.models.get(WHICH[model])  # "final": a run made before the guard has none
    if ref is None:
        raise ConfigError(f"{run_dir} has no {model} model (the run was made without it)")
    if ref == results.models["base"]:
        raise ConfigError(f"{run_dir}'s {model} model is the base model {ref} itself "
                          "(the guard kept it): there is no adapter to export")
    local = results.backend == "hf"  # a hosted (or the fake) model lives in its backend
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        if local:
            adapter = _adapter_dir(run_dir, ref)
            base = HUB_IDS.get(results.base_model, results.base_model)
            if merge:
                _merge(adapter, scratch, dtype)
            else:
                for name in ADAPTER_FILES:
                    shutil.copy2(adapter / name, scratch / name)
                config = json.loads((scratch / "adapter_config.json").read_text())
                config["base_model_name_or_path"] = base  # not this machine's cache path
                (scratch / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        else:
            if merge:
                raise ConfigError(f"--merge: the {results.backend} model lives at the "
                                  "provider; export writes its id and the card")
            base = results.base_model
            (scratch / "model.json").write_text(json.dumps(
                {"provider": results.backend, "model": ref, "base_model": base}, indent=2) + "\n")
        (scratch / "README.md").write_text(card(results, model, ref, base, local=local,
                                                merged=merge))
        if out.exists():
            out.rmdir()
        scratch.rename(out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return out


def _adapter_dir(run_dir: Path, ref: str) -> Path:
    """The adapter folder of a model reference: as recorded, or (a run directory moved,
    or recorded relative to another working directory) under ``RUN_DIR/backend``."""
    for path in (Path(ref), run_dir / ref, *run_dir.glob(f"**/adapters/{Path(ref).name}")):
        if (path / "adapter_config.json").is_file():
            return path
    raise ConfigError(f"the adapter {ref} is not in {run_dir}: was the run directory "
                      "copied without its backend/ folder?")


def _merge(adapter: Path, out: Path, dtype: str) -> None:
    try:
        from .backends.hf import merge_adapter
    except ImportError as e:
        raise BackendUnavailable(f"--merge needs torch, transformers and peft ({e.name} is "
                                 'missing): pip install "semievol[hf]"') from e
    merge_adapter(str(adapter), out, dtype=dtype)


def card(results: Results | dict, which: str, ref: str, base: str, *, local: bool,
         merged: bool) -> str:
    """The model card: YAML metadata the Hub reads, then what the run did."""
    r = Results.of(results)
    what = ("merged weights" if merged else "a PEFT LoRA adapter") if local \
        else f"a model hosted by {r.backend}: `{ref}`"
    lines = ["---", *_metadata(r, which, base, local=local, merged=merged), "---", "",
             f"# {r.task}: SemiEvol {which} model", "",
             f"This is {what} over `{base}`, made by semievol "
             "(SemiEvol: semi-supervised fine-tuning from a few labeled and many unlabeled "
             f"examples). Run `{r.run_id}`, backend `{r.backend}`.", ""]
    if local and not merged:
        lines += ["```python", "from peft import PeftModel",
                  "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f'base = AutoModelForCausalLM.from_pretrained("{base}")',
                  'model = PeftModel.from_pretrained(base, "THIS_FOLDER_OR_REPO")', "```", ""]
    lines += ["## Data", "", "| split | examples |", "|---|---|",
              *[f"| {k} | {r.sizes[k]} |" for k in ("labeled", "unlabeled", "test")], ""]
    lines += ["## Test scores", "", "| model | accuracy | macro-F1 | error reduction |",
              "|---|---|---|---|"]
    for label, name in (("vanilla", "vanilla (base)"), ("sft", "SFT (labeled only)"),
                        ("semievol", "SemiEvol"), ("final", "final (this export)" if which == "final" else "final")):
        if row := r.eval.get(label):  # "final": a run made before the guard has none
            lines.append(f"| {name} | {_num(row['accuracy'])} | {_num(row['macro_f1'])} "
                         f"| {_num(row['error_reduction'])} |")
    u = r.unlabeled
    lines += ["", "## Pseudo-labels", "",
              f"- unlabeled: {u['total']}; consistent: {u['consistent']}; self-justified: "
              f"{u['justified']}; selected: {u['selected']}",
              f"- accuracy (where the unlabeled split had hidden answers): all "
              f"{_num(u['pseudo_label_accuracy']['all'])}, selected "
              f"{_num(u['pseudo_label_accuracy']['selected'])}", ""]
    for row in r.rounds:
        lines.append(f"- round {row['round']}: mined {row['mined']}, selected {row['selected']}, "
                     f"entropy threshold {_num(row['threshold'])}")
    return "\n".join(lines + _decision(r) + _recipe(r.config))


def _metadata(r: Results, which: str, base: str, *, local: bool, merged: bool) -> list[str]:
    """The card's YAML: the base model, tags, and the model-index of its test scores."""
    tags = ["semievol", "semi-supervised", "lora"] + ([] if merged else ["peft"])
    scores = r.eval.get(which) or {}
    return [f"base_model: {base}", *(["library_name: peft"] if local and not merged else []),
            "tags:", *[f"- {t}" for t in tags], "model-index:", f"- name: {r.task}-{which}",
            "  results:", "  - task:", "      type: text-generation", "    dataset:",
            f"      name: {r.task}", f"      type: {r.task}", "    metrics:",
            *[f"    - type: {k}\n      value: {scores[k]:.4f}"
              for k in ("accuracy", "macro_f1") if isinstance(scores.get(k), (int, float))]]


def _decision(r: Results) -> list[str]:
    """The guard's decision and its evidence."""
    v = r.validation
    lines = ["", "## The guard's decision", ""]
    if not v["n"]:
        return lines + [f"Final model: **{r.final}** (no validation slice: the last round's "
                        "model)."]
    lines += [f"Final model: **{r.final}** (chosen on a validation slice of "
              f"{v['n']} labeled examples held out of training: `{v['chosen']}`).", "",
              "| model | validation accuracy | mean p(right) | Brier |", "|---|---|---|---|"]
    for label, s in v["scores"].items():  # p(right), Brier: the models the guard compared
        lines.append(f"| {label} | {_num(s['accuracy'])} | {_num(s.get('p_right'))} "
                     f"| {_num(s.get('brier'))} |")
    for c in v["comparisons"] or []:
        lines.append(f"\n{c['candidate']} vs {c['incumbent']}: difference "
                     f"{_num(c['difference'])}, interval {c['interval']}, "
                     f"P(harm) {_num(c['p_harm'])}: "
                     + ("harm, kept the incumbent" if c["harm"] else "no evidence of harm"))
    return lines


def _recipe(config: dict) -> list[str]:
    """The settings the run was made with, and its whole config.json."""
    ft = config["finetune"]
    return ["", "## Recipe", "",
            f"- LoRA rank {ft['lora_rank']}, alpha {ft['lora_alpha']}, "
            f"lr {ft['learning_rate']}, {ft['epochs']} epochs, batch {ft['batch_size']}",
            f"- n={config['n']} collaborating inferences, k={config['k']} retrieved "
            f"examples (ICP {'on' if config['icp'] else 'off'}), theta={config['theta']}, "
            f"rounds={config['rounds']}, justify={config['justify']}, "
            f"prompt style {config['prompt_style']}, seed {config['seed']}", "",
            "<details><summary>config.json</summary>", "", "```json",
            json.dumps(config, indent=2), "```", "", "</details>", ""]


def _num(x) -> str:
    return f"{x:.3f}" if isinstance(x, float) else ("-" if x is None else str(x))


def push_to_hub(folder: str | Path, repo: str, *, private: bool = False) -> str:
    """Upload the exported folder, as it is, to the Hub repository ``repo`` (the
    ``huggingface_hub`` token: ``HF_TOKEN`` or ``hf auth login``); its URL."""
    try:
        from huggingface_hub import HfApi
    except ImportError as e:
        raise BackendUnavailable('--push-to-hub needs huggingface_hub: pip install '
                                 '"semievol[hub]"') from e
    api = HfApi()
    try:
        api.create_repo(repo, private=private, exist_ok=True)
        return str(api.upload_folder(repo_id=repo, folder_path=str(folder),
                                     commit_message="semievol export"))
    except Exception as e:  # noqa: BLE001 - the Hub's errors, said once with the repo
        raise BackendError(f"uploading {folder} to the Hub repository {repo} failed: "
                           f"{type(e).__name__}: {e}") from e
