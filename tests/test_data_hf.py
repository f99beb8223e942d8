"""`--data` from a Hugging Face ``datasets`` folder and from Parquet files, with other
column names (``--columns``) and a ``ClassLabel`` answer: the same task, and the same
results.json, as the CSV files they were made from (fpb); and errors naming file, row and
field."""
from __future__ import annotations

import csv
import json

import pytest

from conftest import need
from semievol import RunConfig, load_backend
from semievol.data import load_task
from semievol.errors import DataError
from semievol.pipeline import run

CLASSES = ["negative", "neutral", "positive"]
COLUMNS = "question=text,answer=label,options=choices"
SIZES = {"labeled": 24, "unlabeled": 32, "test": 16}


@pytest.fixture(scope="module")
def fpb_three_ways(shared, tmp_path_factory):
    """A slice of fpb as CSV files, as a datasets folder and as Parquet files, the latter
    two under other column names, with the label as a ClassLabel integer."""
    datasets = need("datasets")
    root = tmp_path_factory.mktemp("fpb")
    (root / "csv").mkdir()
    (root / "parquet").mkdir()
    features = datasets.Features({"text": datasets.Value("string"),
                                  "choices": datasets.Sequence(datasets.Value("string")),
                                  "label": datasets.ClassLabel(names=CLASSES),
                                  "gt": datasets.Value("string")})
    parts = {}
    for split, n in SIZES.items():
        with open(shared / "data" / "fpb" / f"{split}.csv", newline="") as f:
            rows = [row for _, row in zip(range(n), csv.DictReader(f))]
        with open(root / "csv" / f"{split}.csv", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        parts[split] = datasets.Dataset.from_dict(
            {"text": [r["question"] for r in rows],
             "choices": [json.loads(r["options"]) for r in rows],
             "label": [json.loads(r["options"]).index(
                 json.loads(r["options"])["ABC".index(r["answer"])]) if r["options"] else 0
                 for r in rows],
             "gt": [r["gt"] for r in rows]}, features=features)
        parts[split].to_parquet(str(root / "parquet" / f"{split}.parquet"), batch_size=10)
    datasets.DatasetDict(parts).save_to_disk(str(root / "hf"))
    return root


def test_the_same_task_three_ways(fpb_three_ways):
    root = fpb_three_ways
    tasks = [load_task(root / "csv"), load_task(root / "hf", columns=COLUMNS),
             load_task(root / "parquet", columns=COLUMNS)]
    for split in ("labeled", "unlabeled", "test"):
        rows = [[(ex.id, ex.question, ex.options, ex.answer, ex.meta) for ex in getattr(t, split)]
                for t in tasks]
        assert rows[0] == rows[1] == rows[2] and len(rows[0]) == SIZES[split]
    assert tasks[0].hidden == tasks[1].hidden == tasks[2].hidden and tasks[0].hidden


def test_the_same_results_three_ways(fpb_three_ways, tmp_path):
    results = []
    for name, columns in (("csv", None), ("hf", COLUMNS), ("parquet", COLUMNS)):
        config = RunConfig(data=str(fpb_three_ways / name), backend="fake", columns=columns)
        results.append(run(config, load_backend("fake"), tmp_path / name, quiet=True))
    keep = ("eval", "unlabeled", "sizes", "usage", "final", "rounds")

    def comparable(r):
        out = {k: r[k] for k in keep}
        out["rounds"] = [{k: v for k, v in x.items() if k != "model"} for x in r["rounds"]]
        return out

    assert comparable(results[0]) == comparable(results[1]) == comparable(results[2])


def test_errors_name_file_row_and_field(fpb_three_ways, tmp_path):
    pq = need("pyarrow.parquet")
    import pyarrow as pa

    bad = tmp_path / "bad"
    bad.mkdir()
    for split in SIZES:
        (bad / f"{split}.parquet").write_bytes((fpb_three_ways / "parquet" / f"{split}.parquet").read_bytes())
    original = pq.read_table(bad / "test.parquet")
    rows = original.to_pylist()
    rows[12]["text"] = "  "  # the 13th row, in the third row group of 5
    pq.write_table(pa.Table.from_pylist(rows, schema=original.schema), bad / "test.parquet",
                   row_group_size=5)
    with pytest.raises(DataError, match=r"test\.parquet:13: field 'question'"):
        load_task(bad, columns=COLUMNS)
    with pytest.raises(DataError, match=r"labeled\.parquet:1: field 'question': missing field"):
        load_task(fpb_three_ways / "parquet")  # without the mapping: its own column names
