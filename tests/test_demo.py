"""The demo's synthetic task: every ticket reads differently (so no validation or test
question is also a training question) and every split is balanced."""
from __future__ import annotations

from collections import Counter

from semievol.data import load_task
from semievol.demo import SIZES, make_task


def test_tickets_are_unique_and_splits_balanced(tmp_path):
    task = load_task(make_task(tmp_path / "data"))
    splits = {"labeled": task.labeled, "unlabeled": task.unlabeled, "test": task.test}
    assert {name: len(items) for name, items in splits.items()} == SIZES
    questions = [ex.question for items in splits.values() for ex in items]
    assert len(set(questions)) == len(questions)
    for answers in (Counter(ex.answer for ex in task.labeled + task.test),
                    Counter(task.hidden.values())):
        assert max(answers.values()) - min(answers.values()) <= 2
