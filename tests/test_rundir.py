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


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_json_is_written_strict(tmp_path, value):
    """Issue 25, break 7: NaN and Infinity are not JSON; writing one is refused, not done."""
    rd = RunDir(tmp_path)
    with pytest.raises(ValueError):
        rd.write_json("x.json", {"x": value})
    with pytest.raises(ValueError):
        rd.append("stage", [{"x": value}])
    assert not (tmp_path / "x.json").exists() and rd.records("stage") == []
