"""The `semievol` command line: run, eval, report, compare, serve, demo."""
from __future__ import annotations

import argparse
import errno
import itertools
import json
import logging
import sys
from pathlib import Path

from . import ranks, track
from .backends import registry
from .annotation import FORMATS
from .arguments import add_arguments, read_arguments
from .config import RECIPES, RunConfig
from .errors import BackendUnavailable, ConfigError, SemievolError
from .suggest import DEFAULT_STRATEGY, STRATEGIES


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args) or 0
    except SemievolError as e:
        print(f"semievol: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("semievol: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except OSError as e:
        if e.errno not in DISK_ERRORS:
            raise
        print(f"semievol: error: {_disk_error(e, args)}", file=sys.stderr)
        return 1


log = logging.getLogger("semievol")

DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
"""What a full, read-only or forbidden disk raises: said in one line, not a traceback."""


def _disk_error(e: OSError, args) -> str:
    """What failed, on which path, and what to do next."""
    where = e.filename or getattr(args, "out", None) or getattr(args, "run_dir", None)
    what = f"{e.strerror or e}: {where}" if where else str(e.strerror or e)
    if args.command == "run":
        return (f"{what}. Make room (or make it writable) and run the same command again: "
                "the run resumes where it stopped")
    if args.command == "report":
        return f"{what}. Give --out DIR to write the report in a folder you can write to"
    return what


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="semievol", description=
                                "Evolve an LLM with a little labeled and a lot of unlabeled data (SemiEvol).")
    p.add_argument("-v", "--verbose", action="store_true", help="log each stage")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (_run_command, _eval_command, _report_command, _compare_command,
                    _serve_command, _export_command, _suggest_command, _import_command,
                    _demo_command):
        command(sub)
    return p


RUN_FIELDS = ("data", "backend", "model", "base_url")
"""The RunConfig fields whose flags are not in field order: those other commands share."""


def _run_command(sub) -> None:
    """``semievol run``: RunConfig's flags (semievol.arguments), and what is not the run's
    configuration but how to do it."""
    run = sub.add_parser("run", help="run (or resume) SemiEvol on a task directory",
                         description="Run SemiEvol: warm-up fine-tune, in-context retrieval, "
                         "collaborative pseudo-labelling, entropy selection, evolve, evaluate. "
                         "Running again on the same --out resumes.")
    add_arguments(run, RunConfig, only=("data",))
    _backend_args(run)
    run.add_argument("--out", help="run directory (default: runs/<task>-<backend>)")
    on = {r: ", ".join(e.name for e in registry.BACKENDS.values() if e.recipe == r)
          for r in RECIPES}
    run.add_argument("--recipe", choices=sorted(RECIPES), help="fine-tuning and prompt defaults, "
                     "each listed in its flag's help: 'small' (answers in the option's words; "
                     f"the default on {on['small']}), 'paper' (the paper's, 'Answer: X'; the "
                     f"default on {on['paper']}) or 'auto' (small's fine-tuning; retrieval, "
                     "vote or self-justify, selection and labeled replay chosen on the "
                     "validation slice)")
    add_arguments(run, RunConfig, skip=RUN_FIELDS, recipes=RECIPES)
    run.add_argument("--dry-run", action="store_true", help="print the estimated cost and stop")
    run.add_argument("--quiet", action="store_true", help="no progress bars")
    run.add_argument("--report-to", default="none", metavar="TRACKERS",
                     help="also log to these experiment trackers, comma-separated: "
                     "mlflow, tensorboard, trackio, wandb (none); each is configured by its "
                     "own environment variables (MLFLOW_TRACKING_URI, WANDB_MODE...) and "
                     'installed with its extra: pip install "semievol[mlflow]"')
    run.set_defaults(func=_cmd_run)


def _eval_command(sub) -> None:
    ev = sub.add_parser("eval", help="evaluate one model on a split",
                        description="Evaluate a model reference on a split of a task directory.")
    ev.add_argument("--data", required=True)
    _backend_args(ev)
    ev.add_argument("--split", default="test", choices=["labeled", "unlabeled", "test"])
    ev.add_argument("--limit", type=int, metavar="N", help="only the first N items")
    add_arguments(ev, RunConfig, only=("prompt_style", "max_tokens"))
    ev.set_defaults(func=_cmd_eval)


def _report_command(sub) -> None:
    rep = sub.add_parser("report", help="write report.md and figures for a run",
                         description="Write RUN_DIR/report.md with PNG figures.")
    rep.add_argument("run_dir")
    rep.add_argument("--out", help="where to write the report (default: RUN_DIR; give "
                     "another folder when RUN_DIR is read-only)")
    rep.set_defaults(func=_cmd_report)


def _compare_command(sub) -> None:
    cmp_ = sub.add_parser("compare", help="several runs side by side",
                          description="Print a table comparing runs and write a figure.")
    cmp_.add_argument("run_dirs", nargs="+")
    cmp_.add_argument("--figure", default="compare.png", help="where to write the figure")
    cmp_.set_defaults(func=_cmd_compare)


SERVE_DESCRIPTION = ("OpenAI-compatible fine-tuning, chat (with logprobs) and embeddings API "
                     "over a local backend; Together's dialect (/v1/files/upload, "
                     "/v1/fine-tunes, integer logprobs) and, on the hf backend, the Tinker API "
                     "(/api/v1/..., for the tinker SDK) on the same port.")


def _serve_command(sub) -> None:
    serve_arguments(sub.add_parser("serve", help="serve an OpenAI-, Together- and "
                                   "Tinker-compatible API over a local backend",
                                   description=SERVE_DESCRIPTION))


def serve_arguments(srv: argparse.ArgumentParser) -> None:
    """``semievol serve``'s flags, which ``python -m semievol.server`` takes too."""
    srv.add_argument("--backend", default="hf", choices=registry.names(hosted=False))
    srv.add_argument("--model", help="base model (default: the embedded smollm2-135m)")
    _dtype_arg(srv)
    srv.add_argument("--host", default="127.0.0.1")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--state-dir", help="where files, jobs and adapters live (default: ./semievol-serve)")
    srv.add_argument("--api-key", help="require this bearer token (visible in `ps`: prefer "
                     "--api-key-file or $SEMIEVOL_API_KEY)")
    srv.add_argument("--api-key-file", help="require the bearer token this file holds")
    srv.add_argument("--max-upload-mb", type=int, default=512, help="largest accepted upload (512)")
    srv.add_argument("--vllm-url", help=VLLM_HELP)
    srv.add_argument("--dedicated-lora", action="store_true",
                     help="serve the fine-tunes of Together's dialect only on dedicated "
                     "endpoints (/v1/endpoints), as api.together.ai does for some models")
    srv.set_defaults(func=serve_command)


def _export_command(sub) -> None:
    exp = sub.add_parser("export", help="a run's model as an adapter (or merged) folder with "
                         "a model card; or a base model as a plain Hugging Face folder",
                         description="semievol export RUN_DIR --out DIR [--model final] "
                         "[--merge] [--push-to-hub REPO]: the run's model as a PEFT adapter "
                         "folder (or merged weights) with a model card (README.md); for a "
                         "hosted run, the card and the provider's model id. "
                         "semievol export MODEL DIR [--dtype D]: a base model (e.g. the "
                         "embedded smollm2-135m, read from its GGUF file) as a Hugging Face "
                         "folder that vLLM and other engines load.")
    exp.add_argument("source", metavar="RUN_DIR|MODEL",
                     help="a run directory, or a base model reference (smollm2-135m, a hub "
                     "id or a folder)")
    exp.add_argument("dest", nargs="?", metavar="DIR", help="the folder to write (or --out)")
    exp.add_argument("--out", help="the folder to write")
    exp.add_argument("--model", default="final", choices=["final", "semievol", "sft"],
                     help="which of the run's models (final: the one the guard chose)")
    exp.add_argument("--merge", action="store_true",
                     help="merge the adapter into the base model's weights")
    exp.add_argument("--push-to-hub", metavar="REPO",
                     help="then upload the folder to this Hugging Face Hub repository")
    exp.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"],
                     help="number type of written weights (bfloat16 for a base model, "
                     "float32 for --merge)")
    exp.set_defaults(func=_cmd_export)


def _suggest_command(sub) -> None:
    sug = sub.add_parser("suggest", help="which unlabeled items to label next",
                         description="Rank a run's unlabeled items by how much a human label "
                         "would help, and write them with the run's pseudo-label as a "
                         "pre-annotation for Label Studio, Argilla or a spreadsheet.")
    sug.add_argument("run_dir")
    sug.add_argument("-k", type=int, required=True, help="how many items")
    sug.add_argument("--strategy", choices=STRATEGIES, default=DEFAULT_STRATEGY,
                     help=f"how to rank them ({DEFAULT_STRATEGY}; see semievol.suggest)")
    sug.add_argument("--format", choices=FORMATS, default="label-studio")
    sug.add_argument("--out", help="the file to write (default: RUN_DIR/suggested.<ext>)")
    sug.add_argument("--data", help="the task directory (default: the run's); items labeled "
                     "since the run are skipped")
    sug.add_argument("--seed", type=int, default=0, help="the random strategy's seed")
    _backend_args(sug)
    sug.set_defaults(func=_cmd_suggest, backend=None)


def _import_command(sub) -> None:
    imp = sub.add_parser("import-labels", help="human labels from an annotation tool into a "
                         "task directory",
                         description="Read a Label Studio JSON export, an Argilla export or "
                         "the suggestion CSV, and move the answered items from the unlabeled "
                         "split to the labeled one (checked first, both splits replaced "
                         "together, the old ones kept in DIR/.backup/).")
    imp.add_argument("export")
    imp.add_argument("--data", required=True, help="the task directory to change")
    imp.set_defaults(func=_cmd_import_labels)


def _demo_command(sub) -> None:
    demo = sub.add_parser("demo", help="the embedded default end to end on a synthetic task",
                          description="Generate a small synthetic task and run SemiEvol on the "
                          "embedded SmolLM2-135M (CPU, a few minutes).")
    demo.add_argument("--out", default="runs/demo", help="run directory (runs/demo)")
    demo.add_argument("--quiet", action="store_true")
    demo.set_defaults(func=_cmd_demo)


def _backend_args(p: argparse.ArgumentParser) -> None:
    add_arguments(p, RunConfig, only=("backend", "model", "base_url"))
    p.add_argument("--api-key", help="API key (default: the provider's variable, "
                   "$OPENAI_API_KEY, $TOGETHER_API_KEY...); never written anywhere")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds per API request (60; raise it for a slow local server)")
    p.add_argument("--price", action="append", metavar="MODEL=IN,OUT,TRAIN",
                   help="a hosted model's price in USD per 1M tokens (input, output, "
                   "training), over the built-in list; --max-cost-usd needs one for a model "
                   "the list lacks (repeatable)")
    p.add_argument("--openai-batch", action="store_true",
                   help="use the OpenAI Batch API for inference (half price, up to 24 h)")
    p.add_argument("--together-endpoint", metavar="HARDWARE",
                   help="together: serve a fine-tune Together will not serve serverless on a "
                   "dedicated endpoint on this hardware (e.g. 1x_nvidia_h100_80gb_sxm, or "
                   "auto: the cheapest listed), billed by the minute and deleted when the run "
                   "ends; without it the run stops there and lists the hardware and prices")
    p.add_argument("--vllm-url", help=VLLM_HELP)
    _dtype_arg(p)


VLLM_HELP = ("hf backend: generate on the vLLM server at this URL (serving the same base model "
             "with --enable-lora; adapters are trained here and loaded into it by path)")


def _dtype_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="hf backend: the number type of the model's weights (auto: bfloat16 "
                   "on a GPU, float32 on the CPU)")


def _dtype(args) -> str | None:
    return None if args.dtype == "auto" else args.dtype


def make_backend(args, workdir: Path | None, max_cost_usd: float | None = None,
                 spent_usd: float = 0.0):
    """The backend the flags name. ``max_cost_usd`` is the whole run's budget, of which a
    resumed run has spent ``spent_usd`` already."""
    if args.vllm_url and args.backend != "hf":
        raise ConfigError("--vllm-url works with --backend hf")
    entry = registry.entry(args.backend)
    budget = {"max_cost_usd": max_cost_usd, "spent_usd": spent_usd} if entry.hosted else {}
    return entry.load(workdir=workdir, **entry.options(args), **budget)


def _run_config(args) -> RunConfig:
    """The run the flags ask for: their recipe (by default the backend's) with the flags
    given over it, in one place, ``RunConfig.recipe``."""
    fields = read_arguments(args, RunConfig)
    fields.setdefault("finetune", {})["seed"] = args.seed  # --seed seeds the fine-tunes too
    return RunConfig.recipe(args.recipe or registry.entry(args.backend).recipe, **fields)


def _cmd_run(args) -> int:
    from . import pipeline, report
    from .data import load_task

    config = _run_config(args)
    registry.entry(args.backend).check(config)
    trackers = track.parse(args.report_to)
    if args.openai_batch:  # one Batch API job per stage, not one per generation call
        config = config.replace(generation_batch=1_000_000)
    task = load_task(config.data, limits=pipeline.limits(config), columns=config.columns)
    if args.dry_run:
        return _dry_run(args, task, config)
    out = Path(args.out) if args.out else default_out(task, args.backend)
    if ranks.world_size() > 1 and args.backend != "hf":
        raise ConfigError(f"a data-parallel launch (WORLD_SIZE={ranks.world_size()}) needs "
                          "--backend hf")
    with ranks.run_dir(out) as here:  # rank 0 writes out; the others a private copy
        backend = make_backend(args, here / "backend", args.max_cost_usd,
                               pipeline.spent_usd(here))
        if ranks.world_size() > 1:
            ranks.mirror(out, here)
            backend.barrier()  # every copy is taken before rank 0 writes
        try:
            results = pipeline.run(config, backend, here, task=task,
                                   quiet=args.quiet or ranks.rank() > 0,
                                   report_to=trackers if ranks.rank() == 0 else ())
        except BaseException:
            _close(backend, failed=True)
            raise
        _close(backend)
    if ranks.rank() == 0:
        print(report.summary(results))
        print(f"\nrun directory: {out}   (semievol report {out})")
    return 0


def _close(backend, failed: bool = False) -> None:
    """Release what a hosted backend holds (Together's dedicated endpoints). After a failed
    run the run's own error is the one raised: a failure to close is logged beside it."""
    if not hasattr(backend, "close"):
        return
    try:
        backend.close()
    except Exception as e:
        if not failed:
            raise
        log.error("after the run failed, closing the backend failed too: %s", e)


def default_out(task, backend: str) -> Path:
    """``runs/<task>-<backend>``, or the first ``...-2``, ``-3``... that is new or was made
    on this very data: a run on data grown since (``semievol import-labels``) starts a new
    run directory rather than being refused by the earlier one, which stays as it was."""
    from .data import fingerprint

    data, base = fingerprint(task), Path("runs") / f"{task.name}-{backend}"
    for n in itertools.count(1):
        out = base if n == 1 else base.with_name(f"{base.name}-{n}")
        manifest = out / "manifest.json"
        if not manifest.exists() or json.loads(manifest.read_text()).get("data") in (None, data):
            if n > 1:
                print(f"{base} was made on other data: this run goes to {out}", file=sys.stderr)
            return out
    raise AssertionError("unreachable")


def _dry_run(args, task, config) -> int:
    """Print what the run would cost at its backend's list prices (and the provider's own
    quote, where it gives one)."""
    from .estimate import print_estimate

    entry = registry.entry(args.backend)
    if not entry.hosted:
        hosted = ", ".join(registry.names(hosted=True))
        raise ConfigError(f"--dry-run prices a hosted backend ({hosted}); {args.backend} "
                          "runs here and has no price list")
    api = entry.provider()
    model = config.model or api.default_model
    print_estimate(task, config, provider=entry.name, model=model, batch=args.openai_batch,
                   embed_model=model if args.base_url else api.default_embed_model,
                   min_finetune_examples=api.min_finetune_examples)
    if hasattr(api, "quote"):
        print(api.quote(task, config, base_url=args.base_url, api_key=args.api_key))
    return 0


def _cmd_eval(args) -> int:
    from . import evaluate
    from .data import load_split, find_split

    items = load_split(find_split(Path(args.data), args.split), split=args.split)[: args.limit]
    backend = make_backend(args, Path("semievol-work"))
    records: list[evaluate.Prediction] = []
    evaluate.predict(backend, args.model or backend.default_model, items,
                     style=args.prompt_style, max_tokens=args.max_tokens, batch_size=16,
                     on_records=lambda batch, usage: records.extend(batch))
    scores = evaluate.metrics(records, items)
    if ranks.rank() == 0:
        print(json.dumps({"model": args.model or backend.default_model, "split": args.split,
                          **scores}, allow_nan=False))
    return 0


def _cmd_report(args) -> int:
    from . import report

    path = report.write_report(Path(args.run_dir), Path(args.out) if args.out else None)
    print(f"wrote {path}")
    return 0


def _cmd_compare(args) -> int:
    from . import report

    print(report.compare([Path(d) for d in args.run_dirs], Path(args.figure)))
    return 0


def serve_command(args) -> int:
    """``semievol serve`` (and ``python -m semievol.server``) with its parsed flags."""
    from .server import serve

    serve(backend=args.backend, model=args.model, host=args.host, port=args.port,
          state_dir=args.state_dir, api_key=args.api_key, api_key_file=args.api_key_file,
          max_upload_mb=args.max_upload_mb, vllm_url=args.vllm_url, dtype=_dtype(args),
          dedicated_lora=args.dedicated_lora)
    return 0


def _cmd_export(args) -> int:
    from . import export

    out = args.out or args.dest
    if not out:
        raise ConfigError("semievol export: give the folder to write (--out DIR)")
    if export.is_run_dir(args.source):
        path = export.export(args.source, out, model=args.model, merge=args.merge,
                             dtype=args.dtype or "float32")
        print(path)
        if args.push_to_hub:
            print(export.push_to_hub(path, args.push_to_hub))
        return 0
    if args.merge or args.push_to_hub:
        raise ConfigError(f"{args.source} is not a run directory (no results.json): --merge "
                          "and --push-to-hub export a run's model")
    try:
        from .backends.hf import export_model
    except ImportError as e:
        raise BackendUnavailable(f"exporting a model needs torch, transformers and peft "
                                 f'({e.name} is missing): pip install "semievol[hf]"') from e
    print(export_model(args.source, Path(out), dtype=args.dtype or "bfloat16"))
    return 0


def _cmd_suggest(args) -> int:
    from . import annotation, suggest

    run_dir = Path(args.run_dir)
    backend = None
    if args.strategy == "combined":  # the questions' embeddings, from the run's backend
        config = RunConfig.load(run_dir / "config.json") if (run_dir / "config.json").exists() else None
        if config is not None:
            args.backend = args.backend or config.backend
            args.base_url = args.base_url or config.base_url
            args.model = args.model or config.model
        backend = make_backend(args, run_dir / "backend")
    chosen, run_id = suggest.suggest(run_dir, args.k, args.strategy, backend=backend,
                                     data=args.data, seed=args.seed)
    ext = {"label-studio": "json", "argilla": "jsonl", "csv": "csv"}[args.format]
    out = Path(args.out or run_dir / f"suggested.{ext}")
    for path in annotation.write(chosen, run_id, args.format, out):
        print(f"wrote {path}")
    print(f"{len(chosen)} items ({args.strategy}); label them, export, then: "
          f"semievol import-labels EXPORT --data DIR")
    return 0


def _cmd_import_labels(args) -> int:
    from .labels import import_labels

    done = import_labels(args.export, args.data)
    print(f"added {len(done.added)} labeled items, {len(done.already)} were labeled already"
          + (f"; the old splits are in {done.backup}" if done.backup else "; nothing changed"))
    if done.added:
        print("the data changed: the next `semievol run` on it needs a new --out (a new run)")
    return 0


def _cmd_demo(args) -> int:
    from . import demo

    demo.main(Path(args.out), quiet=args.quiet)
    return 0
