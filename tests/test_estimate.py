"""The dry-run estimate against what a real run spends: the openai backend through a real
`semievol serve` (over a scripted fake), for every recipe and every view, within 10%.

The estimate runs the pipeline itself on a counting backend, so it takes the same steps as
the run (replay of the labeled set, mixed and diverse views, self-justify or vote). The
scripted world behaves as the estimate assumes (inferences that disagree, answers in the
prompt's style, entropies spread out), and both count tokens as the fake does (words), so
what is left to differ is only which questions were selected and which examples retrieved."""
import hashlib
import re
import socket
import threading
import time
from contextlib import contextmanager

import pytest

from semievol import RunConfig, load_backend
from semievol.config import RECIPES, VIEWS
from semievol.data import load_task
from semievol.demo import TEAMS, make_task
from semievol.estimate import estimate_task
from semievol.pipeline import run
from semievol.types import Generation

KEY = "sk-estimate-test-key"


def _hash(*parts) -> int:
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def disagreeing(call) -> Generation:
    """A world as the estimate assumes it: samples of a question disagree, greedy answers
    and verdicts name an option, entropies are spread over questions."""
    ticket = call.user.split("Ticket:")[-1].split("\n")[0]
    h = _hash(ticket)
    pick = h if call.temperature == 0 else h + (call.seed or 0) + call.sample
    team = TEAMS[pick % 3]
    text = f"Answer: {'ABC'[TEAMS.index(team)]}" if "Answer: X" in call.user else team
    entropy = ((h + 7919 * call.sample) % 1000 + 1) / 1000
    return Generation(text, tuple(text.split()), (-entropy,) + (0.0,) * (len(text.split()) - 1))


def words(text: str) -> int:
    return len(re.findall(r"\w+", text.lower()))


@contextmanager
def serving(backend, state_dir):
    """`semievol serve`'s app over ``backend``, on a free loopback port, in this process."""
    import uvicorn

    from semievol.server import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(backend, state_dir, KEY), host="127.0.0.1",
                                           port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.mark.slow
@pytest.mark.parametrize(("recipe", "views"), list(zip(sorted(RECIPES), VIEWS)))
# each recipe once and each kind of views once: a recipe decides the stages (auto's trials),
# the views how a prompt's samples are drawn, and the estimate counts the two apart
def test_the_estimate_is_within_10_percent_of_a_real_run(recipe, views, tmp_path):
    data = make_task(tmp_path / "data")
    config = RunConfig.recipe(recipe, data=str(data), backend="openai", icp=True, views=views,
                              theta=0.6)
    with serving(load_backend("fake", rule=disagreeing), tmp_path / "state") as url:
        client = load_backend("openai", model="fake-base", base_url=url, api_key=KEY,
                              workdir=tmp_path / "run" / "backend", poll_interval=0.01,
                              quiet=True)
        real = run(config, client, tmp_path / "run", quiet=True)
    estimate = estimate_task(
        load_task(data), config, model="fake-base", embed_model="fake-base",
        min_finetune_examples=10,
        count_chat=lambda messages, model: sum(words(m["content"]) for m in messages),
        count_text=lambda text, model: words(text))
    assert real["unlabeled"]["selected"] >= 10          # the evolve step ran in both
    spent = real["usage"]
    counted = {"prompt_tokens": sum(s.input_tokens for s, _ in estimate.steps),
               "completion_tokens": sum(s.output_tokens for s, _ in estimate.steps),
               "trained_tokens": sum(s.trained_tokens for s, _ in estimate.steps)}
    for kind, value in counted.items():
        assert value == pytest.approx(spent[kind], rel=0.10), (kind, value, spent[kind])
    by_stage = {name: usage["prompt_tokens"] + usage["completion_tokens"]
                + usage["trained_tokens"] for name, usage in real["usage_by_stage"].items()}
    assert len(estimate.steps) == len(by_stage)           # the same steps, one per stage
