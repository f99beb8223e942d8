"""The run directory: appends are whole lines, a torn tail is cut once, records read back."""
from __future__ import annotations

import json

import pytest

from semievol.rundir import RunDir


@pytest.mark.parametrize("torn", ["", '{"id": "x', '{"id": "' + "y" * 200_000])
def test_a_torn_tail_of_any_length_is_cut_before_the_first_append(tmp_path, torn):
    rd = RunDir(tmp_path)
    rd.append("stage", [{"id": str(i)} for i in range(3)])
    with open(tmp_path / "stage.jsonl", "a") as f:
        f.write(torn)  # a kill mid-write
    resumed = RunDir(tmp_path)
    assert [r["id"] for r in resumed.records("stage")] == ["0", "1", "2"]
    resumed.append("stage", [{"id": "3"}])
    resumed.append("stage", [{"id": "4"}])
    lines = (tmp_path / "stage.jsonl").read_text().splitlines()
    assert [json.loads(line)["id"] for line in lines] == ["0", "1", "2", "3", "4"]


def test_a_file_that_is_all_torn_is_emptied(tmp_path):
    (tmp_path / "stage.jsonl").write_text('{"id": "0"' * 10_000)
    rd = RunDir(tmp_path)
    rd.append("stage", [{"id": "1"}])
    assert rd.records("stage") == [{"id": "1"}]
