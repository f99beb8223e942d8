"""The command line on the fake backend: run, report, compare, help, and bad input."""
from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from semievol import ConfigError, RunConfig
from semievol.cli import main
from semievol.demo import make_task
from conftest import need, require  # noqa: E402


def semievol(*args, cwd=None, read_only: Path | None = None):
    """The command line in a process of its own; ``read_only``: with that folder read-only
    (a read-only bind mount for root, whom file modes do not stop; else file modes)."""
    command = [sys.executable, "-m", "semievol", *args]
    if read_only is None:
        return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=120)
    if os.geteuid() == 0:
        require(shutil.which("unshare") is not None, "needs unshare to mount a folder read-only")
        command = ["unshare", "-m", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"',
                   str(read_only), *command]
        return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=120)
    with _without_write_permission(read_only):
        return subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=120)


@contextlib.contextmanager
def _without_write_permission(folder: Path):
    modes = {p: p.stat().st_mode for p in [folder, *folder.rglob("*")]}
    for p, mode in modes.items():
        p.chmod(mode & ~0o222)
    try:
        yield
    finally:
        for p, mode in modes.items():
            p.chmod(mode)


@pytest.mark.parametrize("command", ["run", "eval", "report", "compare", "serve", "demo"])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as e:
        main([command, "--help"])
    assert e.value.code == 0
    assert "usage: semievol " + command in capsys.readouterr().out


def test_run_report_compare(tmp_path, capsys):
    data = make_task(tmp_path / "data")
    for name in ("a", "b"):
        assert main(["run", "--data", str(data), "--backend", "fake", "--out", str(tmp_path / name),
                     "--limit-unlabeled", "20", "--limit-test", "10", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "SemiEvol" in out and "Vanilla" in out and "pseudo-label accuracy" in out
    assert "guard: kept SemiEvol" in out or "guard: returned SFT" in out
    assert main(["report", str(tmp_path / "a")]) == 0
    report = (tmp_path / "a" / "report.md").read_text()
    assert "accuracy.png" in report and "entropy.png" in report
    for png in ("accuracy.png", "entropy.png", "pseudo_accuracy.png"):
        assert (tmp_path / "a" / png).read_bytes()[:4] == b"\x89PNG"
    assert main(["compare", str(tmp_path / "a"), str(tmp_path / "b"),
                 "--figure", str(tmp_path / "cmp.png")]) == 0
    assert "a " in capsys.readouterr().out and (tmp_path / "cmp.png").exists()


def test_bad_row_exits_nonzero_naming_file_line_field(tmp_path):
    data = make_task(tmp_path / "data")
    lines = (data / "labeled.jsonl").read_text().splitlines()
    row = json.loads(lines[6])
    row["answer"] = "F"  # outside the three options
    lines[6] = json.dumps(row)
    (data / "labeled.jsonl").write_text("\n".join(lines) + "\n")
    result = semievol("run", "--data", str(data), "--backend", "fake", "--out", str(tmp_path / "run"))
    assert result.returncode != 0
    assert "labeled.jsonl:7" in result.stderr and "answer" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "results.json").exists()


def test_missing_split_exits_nonzero(tmp_path):
    data = make_task(tmp_path / "data")
    (data / "test.jsonl").unlink()
    result = semievol("run", "--data", str(data), "--backend", "fake", "--out", str(tmp_path / "run"))
    assert result.returncode != 0 and "test" in result.stderr and str(data) in result.stderr
    assert not (tmp_path / "run" / "results.json").exists()


def test_bad_option_value_is_a_clear_error(tmp_path):
    data = make_task(tmp_path / "data")
    result = semievol("run", "--data", str(data), "--backend", "fake", "--theta", "2")
    assert result.returncode != 0 and "theta" in result.stderr and "Traceback" not in result.stderr


def test_import_needs_neither_torch_nor_a_model():
    code = ("import sys, semievol, semievol.pipeline, semievol.cli; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules")
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


@pytest.mark.parametrize("argv, expected", [
    ([], {"icp": False, "prompt_style": "text", "justify": "vote", "per_class": True,
          "epochs": 4, "evolve_epochs": 2}),
    (["--recipe", "paper"], {"icp": True, "prompt_style": "letter", "justify": "model",
                             "per_class": False, "epochs": 2, "evolve_epochs": 2}),
    (["--recipe", "paper", "--epochs", "3"], {"epochs": 3, "evolve_epochs": 3}),
    (["--icp", "--views", "mixed", "--no-replay-labeled"],
     {"icp": True, "views": "mixed", "replay_labeled": False}),
    (["--recipe", "paper", "--no-icp", "--evolve-epochs", "1"], {"icp": False, "evolve_epochs": 1}),
    ([], {"validation": None}),
    (["--validation", "0"], {"validation": 0}),
])
def test_recipes_set_defaults_that_flags_override(argv, expected):
    from semievol.cli import _parser, _run_config

    config = _run_config(_parser().parse_args(["run", "--data", "d", "--backend", "fake", *argv]))
    seen = {**{k: getattr(config, k) for k in expected if hasattr(config, k)},
            "epochs": config.finetune.epochs, "evolve_epochs": config.evolve_ft.epochs}
    assert {k: seen[k] for k in expected} == expected


@pytest.mark.parametrize("backend, recipe", [("hf", "small"), ("openai", "paper"),
                                             ("together", "paper")])
def test_the_python_recipe_is_the_one_semievol_run_uses(backend, recipe):
    from semievol.cli import _parser, _run_config

    cli = _run_config(_parser().parse_args(["run", "--data", "d", "--backend", backend]))
    assert cli == RunConfig.recipe(recipe, data="d", backend=backend)
    assert RunConfig.recipe("small", data="d", icp=True).icp is True  # fields go over it
    assert RunConfig.recipe("small", data="d", validation=20).validation == 20
    with pytest.raises(ConfigError, match="recipe"):
        RunConfig.recipe("huge", data="d")


RUN_FLAGS = """--data --backend --model --base-url --api-key --timeout --price --openai-batch
--together-endpoint --vllm-url --dtype --out --n --samples --k --theta --rounds --recipe --epochs --lr
--evolve-lr --evolve-epochs --lr-multiplier --batch-size --generation-batch --temperature
--max-tokens --prompt-style --justify --selection --views --replay-labeled --no-replay-labeled
--icp --no-icp --no-iwp --no-cl --no-as --columns --limit-labeled --limit-unlabeled --limit-test
--validation --refit --seed --max-cost-usd --dry-run --quiet --report-to -h --help""".split()


def _options(parser) -> set[str]:
    return {o for action in parser._actions for o in action.option_strings}


def _subparser(name: str):
    from semievol.cli import _parser

    return next(a for a in _parser()._actions if a.dest == "command").choices[name]


def test_the_run_flags_read_from_the_config_are_the_ones_users_type():
    """Issue 28: the run parser is generated from RunConfig's fields; the flags stay."""
    assert _options(_subparser("run")) == set(RUN_FLAGS)


def test_a_choice_field_is_a_literal_that_the_config_checks_and_the_flag_offers(capsys):
    with pytest.raises(ConfigError, match="justify must be one of 'model', 'vote'"):
        RunConfig(data="d", justify="majority")
    with pytest.raises(SystemExit):
        main(["run", "--data", "d", "--views", "all"])
    assert "choose from 'shared', 'mixed', 'diverse'" in capsys.readouterr().err


def test_a_recipe_takes_fine_tuning_fields_as_a_dict_over_its_own():
    config = RunConfig.recipe("small", data="d", finetune={"batch_size": 4, "seed": 3},
                              evolve_finetune={"learning_rate": 1e-5})
    assert (config.finetune.epochs, config.finetune.learning_rate, config.finetune.batch_size,
            config.finetune.seed) == (4, 4e-4, 4, 3)
    assert (config.evolve_ft.epochs, config.evolve_ft.learning_rate,
            config.evolve_ft.batch_size) == (2, 1e-5, 4)
    assert RunConfig.recipe("paper", data="d", finetune={"epochs": 3}).evolve_finetune is None


def test_python_m_semievol_server_takes_the_flags_of_semievol_serve(monkeypatch):
    """Issue 28: `python -m semievol.server` repeated serve's flags, less --dtype and
    --vllm-url; it now has serve's parser."""
    import argparse
    import semievol.server
    from semievol.cli import serve_arguments
    from semievol.server.__main__ import main as server_main

    alone = argparse.ArgumentParser()
    serve_arguments(alone)
    assert _options(alone) == _options(_subparser("serve"))
    calls = []
    monkeypatch.setattr(semievol.server, "serve", lambda **kw: calls.append(kw))
    assert server_main(["--backend", "fake", "--dtype", "float32", "--port", "0",
                        "--vllm-url", "http://127.0.0.1:9/v1"]) == 0
    assert calls[0]["dtype"] == "float32" and calls[0]["vllm_url"] == "http://127.0.0.1:9/v1"
    assert calls[0]["backend"] == "fake" and calls[0]["port"] == 0


def test_entropy_bins_go_log_spaced_when_entropies_span_decades():
    from semievol.report import _bins

    edges, log = _bins([0.0, 0.001, 0.01, 0.5, 2.0])
    assert log and len(edges) == 21 and edges[0] == pytest.approx(0.001) and edges[-1] == pytest.approx(2.0)
    edges, log = _bins([0.1, 0.2, 0.5])
    assert not log and edges[0] == 0.1 and edges[-1] == 0.5


@pytest.mark.slow  # building the hf backend imports transformers and peft (6 s)
@pytest.mark.parametrize("flag, dtype", [([], "auto"), (["--dtype", "bfloat16"], "bfloat16"),
                                         (["--dtype", "float32"], "float32")])
def test_dtype_reaches_the_hf_backend(flag, dtype, tmp_path):
    torch = need("torch")
    from semievol.cli import _parser, make_backend

    if dtype == "auto":
        dtype = "bfloat16" if torch.cuda.is_available() else "float32"

    for command in (["run", "--data", "d"], ["eval", "--data", "d"]):
        args = _parser().parse_args([*command, *flag])
        backend = make_backend(args, tmp_path)  # builds the backend; loads no model yet
        assert backend.runtime()["dtype"] == dtype
    assert _parser().parse_args(["serve", *flag]).dtype == (flag[1] if flag else "auto")


@pytest.mark.parametrize("flag", ["--lr", "--temperature", "--max-cost-usd", "--epochs"])
def test_non_finite_numbers_are_refused(tmp_path, flag, capsys):
    """Issue 25, break 7: `--lr inf` passed `lr > 0` and config.json then held Infinity."""
    data = make_task(tmp_path / "data")
    for value in ("inf", "-inf", "nan"):
        assert main(["run", "--data", str(data), "--backend", "fake", "--out",
                     str(tmp_path / "r"), f"{flag}={value}", "--quiet"]) == 2
        assert "must be a finite number" in capsys.readouterr().err
    assert not (tmp_path / "r" / "config.json").exists()


def test_a_resume_on_data_changed_in_place_is_refused_naming_the_split(tmp_path, capsys):
    """Issue 25, break 1: a resume compared only the --data path, so a run on changed data
    reused stages made on the old data. The same data by another path is no change."""
    data = make_task(tmp_path / "data")
    out = tmp_path / "run"
    args = ["run", "--backend", "fake", "--out", str(out), "--limit-unlabeled", "20",
            "--limit-test", "10", "--quiet"]
    assert main([*args, "--data", str(data)]) == 0
    (tmp_path / "link").symlink_to(data)
    for same in (f"{data}/", str(tmp_path / "link")):
        (out / "results.json").unlink()
        assert main([*args, "--data", same]) == 0
    labeled = (data / "labeled.jsonl").read_text().splitlines()
    (data / "labeled.jsonl").write_text("\n".join(labeled[:10]) + "\n")
    rows = [json.loads(line) for line in (data / "test.jsonl").read_text().splitlines()]
    for row in rows:
        row["answer"] = "ABC"[("ABC".index(row["answer"]) + 1) % 3]
    (data / "test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (out / "results.json").unlink()
    capsys.readouterr()
    assert main([*args, "--data", str(data)]) == 2
    err = capsys.readouterr().err
    assert f"labeled ({len(labeled)} rows then, 10 now)" in err
    assert "test (10 rows then, 10 now, other content)" in err and "unlabeled" not in err
    assert not (out / "results.json").exists()


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in folder.rglob("*")}


def test_a_finished_run_resumes_and_reports_on_a_read_only_directory(tmp_path, capsys):
    """Issue 25, break 6: every resume rewrote config.json, so a read-only run directory
    failed with nothing left to do; `semievol report` failed the same way."""
    data, out = make_task(tmp_path / "data"), tmp_path / "run"
    args = ["run", "--data", str(data), "--backend", "fake", "--out", str(out),
            "--limit-unlabeled", "20", "--limit-test", "10", "--quiet"]
    assert main(args) == 0
    before = _files(out)
    result = semievol(*args, read_only=out)
    assert result.returncode == 0, result.stderr
    assert "SemiEvol" in result.stdout and _files(out) == before
    result = semievol("report", str(out), read_only=out)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert len(result.stderr.splitlines()) == 1 and "--out" in result.stderr
    assert str(out) in result.stderr
    result = semievol("report", str(out), "--out", str(tmp_path / "report"), read_only=out)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "report" / "report.md").exists() and _files(out) == before


def test_a_full_disk_is_one_line_that_says_where_and_that_running_again_resumes(
        tmp_path, capsys, monkeypatch):
    """Issue 25, break 5: a full disk ended in a chained traceback."""
    from semievol import rundir

    data, out = make_task(tmp_path / "data"), tmp_path / "run"
    args = ["run", "--data", str(data), "--backend", "fake", "--out", str(out),
            "--limit-unlabeled", "20", "--limit-test", "10", "--quiet"]
    fsync, calls = os.fsync, []

    def full(fd):
        calls.append(fd)
        if len(calls) > 12:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        fsync(fd)

    monkeypatch.setattr(rundir.os, "fsync", full)
    assert main(args) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "No space left on device" in err[0] and str(out) in err[0]
    assert "run the same command again" in err[0]
    monkeypatch.setattr(rundir.os, "fsync", fsync)
    assert main(args) == 0 and (out / "results.json").exists()


def test_a_run_killed_and_resumed_on_the_fake_backend_gives_the_same_results(tmp_path):
    """Issue 25, break 8: the fake backend forgot its fine-tunes when its process died, so
    a kill and resume through the command line gave other results."""
    data = make_task(tmp_path / "data")

    def args(out):
        return ["run", "--data", str(data), "--backend", "fake", "--out", str(tmp_path / out),
                "--generation-batch", "1", "--quiet"]

    assert semievol(*args("whole")).returncode == 0
    killed = subprocess.Popen([sys.executable, "-m", "semievol", *args("killed")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    mined = tmp_path / "killed" / "collaborate_r1.jsonl"
    while killed.poll() is None and not (mined.exists() and mined.stat().st_size > 0):
        pass
    killed.kill()
    killed.wait()
    assert not (tmp_path / "killed" / "results.json").exists()  # it stopped part-way
    assert semievol(*args("killed")).returncode == 0
    whole, resumed = (json.loads((tmp_path / out / "results.json").read_text())
                      for out in ("whole", "killed"))
    for run in (whole, resumed):  # model references carry the run's id
        for r in run["rounds"]:
            del r["model"]
    for key in ("eval", "unlabeled", "rounds", "validation", "final"):
        assert resumed[key] == whole[key], key
    for name, spent in whole["usage"].items():  # a batch cut by the kill is made again
        assert (resumed["usage"][name] or 0) >= (spent or 0), name


def test_a_budget_on_a_model_without_a_price_is_refused_and_a_price_can_be_given(tmp_path):
    """Issue 25: --max-cost-usd on a model the price list lacks was silently not kept."""
    from semievol.cli import _parser, make_backend

    def backend(*flags):
        args = _parser().parse_args(["run", "--data", "d", "--backend", "openai", "--model",
                                     "my-model", "--base-url", "http://127.0.0.1:9/v1", *flags])
        return make_backend(args, tmp_path, max_cost_usd=1.0)

    with pytest.raises(ConfigError, match="my-model's price.*--price MODEL=INPUT,OUTPUT,TRAINING"):
        backend()
    with pytest.raises(ConfigError, match="my-model's training price"):
        backend("--price", "my-model=0.1,0.2")
    assert backend("--price", "my-model=0.1,0.2,3").budget.limit_usd == 1.0
    for bad in ("my-model=cheap", "my-model=1,2,3,4", "=1", "my-model=-1", "my-model=inf"):
        with pytest.raises(ConfigError, match="--price"):
            backend("--price", bad)



def test_fractional_and_odd_epochs_run_on_the_fake_backend(tmp_path, capsys):
    data = make_task(tmp_path / "data")
    for epochs in ("3", "1.5"):
        out = tmp_path / f"run-{epochs}"
        assert main(["run", "--data", str(data), "--backend", "fake", "--epochs", epochs,
                     "--out", str(out), "--limit-unlabeled", "20", "--limit-test", "10",
                     "--quiet"]) == 0
        assert (out / "results.json").is_file()


def test_when_a_run_fails_and_closing_its_backend_fails_too_the_runs_error_is_the_one_said(
        tmp_path, monkeypatch, capsys, caplog):
    from semievol import cli
    from semievol.errors import BackendError

    made = cli.make_backend

    def failing(*args, **kwargs):
        backend = made(*args, **kwargs)

        def generate(*a, **k):
            raise BackendError("the model went away")

        def close():
            raise BackendError("deleting dedicated endpoint ep-1 failed")
        backend.generate_with_logprobs, backend.close = generate, close
        return backend
    monkeypatch.setattr(cli, "make_backend", failing)
    data = make_task(tmp_path / "data")
    args = ["run", "--data", str(data), "--backend", "fake", "--out", str(tmp_path / "run"),
            "--limit-unlabeled", "20", "--limit-test", "10", "--quiet"]
    assert main(args) == 2
    said = capsys.readouterr().err
    assert "the model went away" in said and "ep-1" not in said
    assert "ep-1" in caplog.text  # logged beside it: the endpoint to delete by hand


@pytest.mark.parametrize("backend", ["openai", "together"])
@pytest.mark.parametrize("quiet", [True, False])
def test_quiet_reaches_a_hosted_backends_progress_bars_and_notes(backend, quiet, tmp_path):
    from semievol.cli import _parser, make_backend

    need(backend)
    argv = ["run", "--data", "d", "--backend", backend, "--api-key", "sk-test"]
    hosted = make_backend(_parser().parse_args(argv + ["--quiet"] * quiet), tmp_path)
    assert hosted.quiet is quiet
