"""semievol.data: the real benchmark splits load; every kind of bad input gives one
DataError that names the file, the line and the field."""
from __future__ import annotations

import json

import pytest

from semievol.data import load_split, load_task
from semievol.errors import ConfigError, DataError
from semievol.types import LETTERS

HEADER = "id,question,options,answer\n"
OPTS = '"[""red"", ""green"", ""blue""]"'


def write(path, content: str | bytes):
    if isinstance(content, str):
        content = content.encode("utf-8")
    path.write_bytes(content)
    return path


def jsonl(*records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def raises_at(path, line: int | None, field: str | None, **kwargs) -> DataError:
    """load_split(path) raises one DataError naming the file, the line and the field."""
    with pytest.raises(DataError) as info:
        load_split(path, **kwargs)
    error, message = info.value, str(info.value)
    assert path.name in message
    assert (error.line, error.field) == (line, field), message
    if line is not None:
        assert f"{path.name}:{line}:" in message
    if field is not None:
        assert f"'{field}'" in message
    return error


# --- the real benchmarks (../shared/data) ---------------------------------------------

SIZES = {"arc": (518, 1554, 518), "fpb": (452, 1359, 453), "mmlu": (2808, 8425, 2809)}


@pytest.fixture(scope="module", params=sorted(SIZES))
def real_task(request, shared):
    return request.param, load_task(shared / "data" / request.param)


def test_real_split_sizes(real_task):
    name, task = real_task
    assert task.name == name
    assert (len(task.labeled), len(task.unlabeled), len(task.test)) == SIZES[name]


def test_real_unlabeled_answers_are_hidden(real_task):
    _, task = real_task
    assert all(ex.answer is None for ex in task.unlabeled)
    assert set(task.hidden) == {ex.id for ex in task.unlabeled}
    assert all(ex.answer is not None for ex in task.labeled + task.test)


def test_real_answers_are_letters_within_options(real_task):
    _, task = real_task
    pairs = [(ex, ex.answer) for ex in task.labeled + task.test]
    pairs += [(ex, task.hidden[ex.id]) for ex in task.unlabeled]
    for ex, answer in pairs:
        assert 2 <= len(ex.options) <= 10 and all(isinstance(o, str) and o for o in ex.options)
        assert answer in LETTERS[:len(ex.options)], (ex.id, answer, ex.options)


def test_arc_numeric_labels_become_letters(shared):
    task = load_task(shared / "data" / "arc")
    # unlabeled.csv writes these two answers as '2' and '4'.
    assert task.hidden["NYSEDREGENTS_2015_8_3"] == "B"
    assert task.hidden["NYSEDREGENTS_2008_8_9"] == "D"
    assert set(task.hidden.values()) <= set("ABCDE")


def test_fpb_meta_keeps_gt_but_not_on_unlabeled(shared):
    task = load_task(shared / "data" / "fpb")
    for ex in task.labeled + task.test:
        assert ex.meta["gt"] == ex.option_of(ex.answer)
    assert task.labeled[0].id == "labeled-0" and "\n" in task.labeled[0].question
    # gt restates the answer, so the algorithm must not see it on the unlabeled split.
    assert all("gt" not in ex.meta for ex in task.unlabeled)


def test_mmlu_meta_and_nan_option(shared):
    examples = load_split(shared / "data" / "mmlu" / "labeled.csv")
    assert set(examples[0].meta) == {"Unnamed: 0", "Subject"}
    # pandas wrote the option "None" as NaN; it is read back as "None" (and is the answer).
    (ex,) = [ex for ex in examples if "None" in ex.options]
    assert ex.options[3] == "None" and ex.answer == "D"


# --- bad input: one DataError naming file, line and field ------------------------------


def test_missing_column_csv(tmp_path):
    path = write(tmp_path / "a.csv", "id,options,answer\nx,,yes\n")
    raises_at(path, 1, "question")
    path = write(tmp_path / "b.csv", "id,question\nx,What?\n")
    raises_at(path, 1, "answer")
    assert load_split(path, require_answer=False)[0].answer is None


def test_missing_field_jsonl(tmp_path):
    path = write(tmp_path / "a.jsonl", jsonl({"question": "Q1", "answer": "x"},
                                             {"question": "Q2"}))
    raises_at(path, 2, "answer")
    path = write(tmp_path / "b.jsonl", jsonl({"question": "Q1", "answer": "x"},
                                             {"answer": "y"}))
    raises_at(path, 2, "question")


def test_answer_outside_options_csv_counts_physical_lines(tmp_path):
    # Row 1 spans lines 2-4 (a quoted multi-line question), so row 2 starts on line 5.
    path = write(tmp_path / "split.csv",
                 HEADER + f'a,"Line one\nline two\nline three",{OPTS},A\n' + f"b,Q?,{OPTS},D\n")
    error = raises_at(path, 5, "answer")
    assert "'D'" in str(error)


def test_answer_outside_options_jsonl(tmp_path):
    path = write(tmp_path / "split.jsonl",
                 jsonl({"question": "Q", "options": ["a", "b"], "answer": "3"}))
    raises_at(path, 1, "answer")


@pytest.mark.parametrize("options", [
    "[red, green]",  # bad JSON
    '{"a": 1}',  # not a list
    '["only one"]',  # fewer than two
    '["red", 2]',  # not a string
    '["red", " "]',  # empty option
])
def test_unparsable_options_csv(tmp_path, options):
    cell = '"' + options.replace('"', '""') + '"'
    path = write(tmp_path / "split.csv", HEADER + f"a,Q?,{OPTS},A\nb,Q?,{cell},A\n")
    raises_at(path, 3, "options")


@pytest.mark.parametrize("options", ["not json", {"a": "b"}, ["one"], ["x", None]])
def test_unparsable_options_jsonl(tmp_path, options):
    path = write(tmp_path / "split.jsonl",
                 "\n" + jsonl({"question": "Q", "options": options, "answer": "A"}))
    raises_at(path, 2, "options")


def test_empty_split(tmp_path):
    raises_at(write(tmp_path / "header-only.csv", HEADER), 1, None)
    raises_at(write(tmp_path / "nothing.csv", ""), 1, None)
    raises_at(write(tmp_path / "blank.jsonl", "\n\n"), 1, None)


def test_duplicate_ids_csv(tmp_path):
    path = write(tmp_path / "split.csv",
                 HEADER + f"a,Q1,{OPTS},A\nb,Q2,{OPTS},B\na,Q3,{OPTS},C\n")
    error = raises_at(path, 4, "id")
    assert "'a'" in str(error) and "line 2" in str(error)


def test_duplicate_ids_jsonl(tmp_path):
    path = write(tmp_path / "split.jsonl", jsonl({"id": 7, "question": "Q1", "answer": "x"},
                                                 {"id": "7", "question": "Q2", "answer": "y"}))
    error = raises_at(path, 2, "id")
    assert "line 1" in str(error)


def test_non_utf8_csv(tmp_path):
    data = (HEADER + f'a,"Fine\nquestion",{OPTS},A\nb,"Also\nbad ').encode() + b"\xff" \
        + f' here",{OPTS},B\n'.encode()
    error = raises_at(write(tmp_path / "split.csv", data), 5, "question")
    assert "0xff" in str(error)


def test_non_utf8_jsonl(tmp_path):
    data = jsonl({"question": "Q1", "answer": "x"}).encode() \
        + b'{"question": "Q2", "answer": "caf\xe9"}\n'
    raises_at(write(tmp_path / "split.jsonl", data), 2, "answer")


def test_invalid_json_line(tmp_path):
    path = write(tmp_path / "split.jsonl",
                 jsonl({"question": "Q1", "answer": "x"}) + '{"question": "Q2", \n')
    error = raises_at(path, 2, None)
    assert "invalid JSON" in str(error)
    raises_at(write(tmp_path / "list.jsonl", '["question"]\n'), 1, None)


def test_empty_question(tmp_path):
    raises_at(write(tmp_path / "split.csv", HEADER + f'a,"  ",{OPTS},A\n'), 2, "question")
    raises_at(write(tmp_path / "split.jsonl", jsonl({"question": "", "answer": "x"})),
              1, "question")


def test_empty_answer_when_required(tmp_path):
    raises_at(write(tmp_path / "split.csv", HEADER + f"a,Q,{OPTS},\n"), 2, "answer")


def test_short_csv_row(tmp_path):
    raises_at(write(tmp_path / "split.csv", HEADER + "a,Q\n"), 2, "options")


def test_unknown_extension(tmp_path):
    raises_at(write(tmp_path / "split.tsv", "question\tanswer\n"), None, None)


# --- what loads -----------------------------------------------------------------------


def test_answer_forms_are_normalised(tmp_path):
    path = write(tmp_path / "split.csv", HEADER + f"a,Q,{OPTS},b\nb,Q,{OPTS},3\n"
                                                  f"c,Q,{OPTS}, green \n")
    assert [ex.answer for ex in load_split(path)] == ["B", "C", "B"]


def test_jsonl_list_options_and_generated_ids(tmp_path):
    path = write(tmp_path / "train.jsonl", jsonl(
        {"question": "2+2?", "options": ["3", "4"], "answer": "B", "source": "me"},
        {"question": "Sky?", "options": '["blue", "red"]', "answer": "blue"}))
    first, second = load_split(path)
    assert first == load_split(path)[0]
    assert (first.id, first.options, first.answer, first.meta) == \
        ("train-0", ("3", "4"), "B", {"source": "me"})
    assert (second.id, second.options, second.answer) == ("train-1", ("blue", "red"), "A")
    assert load_split(path, split="labeled")[1].id == "labeled-1"


def test_free_answer_rows(tmp_path):
    path = write(tmp_path / "split.csv", "\ufeffquestion,options,answer\n"
                                         "What is 6*7?,, 42 \nCapital of France?,[],Paris\n")
    numeric, text = load_split(path)
    assert (numeric.options, numeric.answer, numeric.kind) == (None, "42", "numeric")
    assert (text.options, text.answer, text.kind) == (None, "Paris", "text")
    path = write(tmp_path / "split.jsonl", jsonl({"question": "6*7?", "answer": 42}))
    assert load_split(path)[0].answer == "42"


def make_task(directory, n=5):
    directory.mkdir()
    for split in ("labeled", "unlabeled", "test"):
        rows = "".join(f"{split}{i},Q{i}?,{OPTS},{'ABC'[i % 3]}\n" for i in range(n))
        write(directory / f"{split}.csv", HEADER + rows)
    return directory


def test_load_task_hides_unlabeled_answers_and_limits(tmp_path):
    task = load_task(make_task(tmp_path / "toy"), limits={"labeled": 2, "unlabeled": 3})
    assert task.name == "toy"
    assert [len(task.labeled), len(task.unlabeled), len(task.test)] == [2, 3, 5]
    assert [ex.id for ex in task.labeled] == ["labeled0", "labeled1"]
    assert task.hidden == {"unlabeled0": "A", "unlabeled1": "B", "unlabeled2": "C"}
    assert all(ex.answer is None for ex in task.unlabeled)


def test_load_task_unlabeled_without_answers(tmp_path):
    directory = make_task(tmp_path / "toy")
    (directory / "unlabeled.csv").unlink()
    write(directory / "unlabeled.jsonl", jsonl({"question": "Q?", "options": ["a", "b"]}))
    task = load_task(directory)
    assert task.hidden == {} and task.unlabeled[0].id == "unlabeled-0"


def test_load_task_missing_or_ambiguous_split(tmp_path):
    directory = make_task(tmp_path / "toy")
    (directory / "test.csv").unlink()
    with pytest.raises(DataError, match=r"toy.*test"):
        load_task(directory)
    write(directory / "test.csv", HEADER + f"a,Q,{OPTS},A\n")
    write(directory / "labeled.jsonl", jsonl({"question": "Q", "answer": "x"}))
    with pytest.raises(DataError, match=r"toy.*labeled"):
        load_task(directory)


def test_load_task_bad_limits(tmp_path):
    directory = make_task(tmp_path / "toy")
    for limits in ({"train": 2}, {"test": 0}, {"test": "3"}):
        with pytest.raises(ConfigError):
            load_task(directory, limits=limits)


# --- hostile input: each gets a file:line:field error -----------------------------------


def test_deeply_nested_json_is_an_error_not_a_crash(tmp_path):
    deep = '{"question": "Q2", "answer": "x", "extra": ' + "[" * 100_000 + "]" * 100_000 + "}\n"
    path = write(tmp_path / "split.jsonl", jsonl({"question": "Q1", "answer": "x"}) + deep)
    assert "nested too deeply" in str(raises_at(path, 2, None))


def test_a_huge_csv_field_is_named(tmp_path):
    from semievol.data import MAX_FIELD_CHARS

    huge = "x" * (10 * 1024 * 1024)
    path = write(tmp_path / "split.csv", HEADER + f"a,Q1,{OPTS},A\nb,\"{huge}\",{OPTS},B\n")
    assert f"{MAX_FIELD_CHARS:,}" in str(raises_at(path, 3, "question"))
    # long but within the limit is read (the csv module alone stops at 131,072)
    fine = "y" * 200_000
    write(path, HEADER + f"a,\"{fine}\",{OPTS},A\n")
    assert load_split(path)[0].question == fine


@pytest.mark.parametrize("field", ["question", "answer", "options", "source"])
def test_a_nul_character_is_refused(tmp_path, field):
    row = {"question": "Q1", "answer": "red", "options": ["red", "green"], "source": "web"}
    row[field] = ["re\x00d", "green"] if field == "options" else row[field] + "\x00"
    path = write(tmp_path / "split.jsonl", jsonl({"question": "Q0", "answer": "x"}, row))
    assert "NUL" in str(raises_at(path, 2, field))
    csv_path = write(tmp_path / "split.csv", HEADER + f"a,\"Q\x00\",{OPTS},A\n")
    raises_at(csv_path, 2, "question")


def test_an_unlabeled_id_that_is_a_labeled_id_is_refused(tmp_path):
    directory = make_task(tmp_path / "toy")
    write(directory / "unlabeled.csv", HEADER + f"u0,Q?,{OPTS},A\nlabeled3,Q?,{OPTS},B\n")
    with pytest.raises(DataError) as info:
        load_task(directory)
    assert (info.value.line, info.value.field) == (3, "id")
    assert "unlabeled.csv:3" in str(info.value) and "labeled3" in str(info.value)
