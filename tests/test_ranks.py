"""Which run directory each data-parallel rank works in (no torch, no model)."""
from __future__ import annotations

import json

from semievol import ranks


def test_one_process_is_rank_zero_and_works_in_the_run_directory(monkeypatch, tmp_path):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert ranks.rank() == 0 and ranks.world_size() == 1
    with ranks.run_dir(tmp_path / "run") as here:
        assert here == tmp_path / "run"


def test_other_ranks_work_in_a_private_copy_that_is_removed(monkeypatch, tmp_path):
    out = tmp_path / "run"
    (out / "backend" / "adapters" / "warm").mkdir(parents=True)
    (out / "manifest.json").write_text(json.dumps({"stages": {"warmup": {"status": "done"}}}))
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    with ranks.run_dir(out) as here:
        assert here != out and here.name == out.name and not here.exists()
        ranks.mirror(out, here)
        assert json.loads((here / "manifest.json").read_text())["stages"]["warmup"]
        assert (here / "backend" / "adapters" / "warm").is_dir()
        (here / "results.json").write_text("{}")
    assert not (out / "results.json").exists()  # rank 0's directory is never written
    assert list((tmp_path / "tmp").iterdir()) == []


def test_a_fresh_run_gives_other_ranks_an_empty_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("RANK", "3")
    with ranks.run_dir(tmp_path / "new") as here:
        ranks.mirror(tmp_path / "new", here)
        assert not here.exists()


def test_a_data_parallel_launch_needs_the_hf_backend(monkeypatch, shared, tmp_path, capsys):
    from semievol.cli import main

    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    code = main(["run", "--data", str(shared / "data" / "fpb"), "--backend", "fake",
                 "--out", str(tmp_path / "run"), "--limit-labeled", "4"])
    assert code == 2 and "needs --backend hf" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
