"""Scripted worlds for the fake backend: rules that say what a model answers, given what
it was trained on, so the pipeline's tests (test_pipeline.py, test_guard.py) can make
evolving help, hurt, or change nothing, and check the run saw it."""
from __future__ import annotations

import hashlib

from semievol.demo import PROBLEMS, TEAMS
from semievol.types import Generation, Usage


def team_of(text: str) -> str:
    """The right answer to a demo ticket (the team whose phrases it uses)."""
    ticket = text.split("Ticket:")[-1].lower()
    return next(t for t, phrases in PROBLEMS.items() if any(p.lower() in ticket for p in phrases))


def unit(*parts) -> float:
    """A number in [0, 1) fixed by ``parts``: the world's dice."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def say(team: str, entropy: float) -> Generation:
    return Generation(team, (team,), (-entropy,))


def other(truth: str, k: int = 0) -> str:
    """A wrong team."""
    return [t for t in TEAMS if t != truth][k]


def ticket_rule(call):
    """A model that knows more the more it was trained on: right answers come with low
    entropy, wrong ones with high entropy; self-justify picks the right candidate."""
    if "Candidate answers" in call.user:
        truth, u = team_of(call.user), unit(call.user, "justify")
        if u < 0.7:
            return Generation(truth, (truth,), (-0.2 - 0.3 * u,))
        return say(other(truth), 1.5)
    truth = team_of(call.user)
    skill = min(0.95, 0.35 + 0.01 * len(call.trained))
    u = unit(call.user, call.sample, call.seed) if call.temperature > 0 else unit(call.user)
    if u < skill:
        return Generation(truth, (truth,), (-0.05 - 0.1 * u,))
    return say(other(truth, int(u * 100) % 2), 1.0 + u)


def steady(call):
    """A model that training does not change: right 70% of the time, sure or not at random
    (the same for every model: the slice cannot tell them apart, as fpb's 13 questions
    could not tell SFT from SemiEvol)."""
    truth, u = team_of(call.user), unit(call.user, call.sample, call.seed)
    if "Candidate answers" in call.user or u < 0.7:
        return Generation(truth, (truth,), (-0.1 - u,))
    return say(other(truth, int(u * 100) % 2), 1.0 + u)


def question(user: str) -> str:
    """The question of a prompt's user message (without its options)."""
    return user.split("\nOptions:")[0]


def trained_on_pseudo_labels(call, unlabeled: set[str]) -> bool:
    return any(question(ex[-2]["content"]) in unlabeled for ex in call.trained)


def collapsing(unlabeled: set[str]):
    """A world where evolving on pseudo-labels teaches the model one answer (``unlabeled``:
    the unlabeled questions)."""
    def collapses(call):
        return "billing" if trained_on_pseudo_labels(call, unlabeled) else ticket_rule(call)
    return collapses


def retrieval_helps(call):
    """Shown solved examples, every sample is right; without, the samples disagree and the
    wrong ones are surer, so only self-justify (which always finds the truth) gets them."""
    if "Candidate answers" in call.user:
        return say(team_of(call.user), 0.1 + unit(call.user) / 10)
    truth = team_of(call.user)
    if len(call.messages) > 2 or call.temperature == 0 and call.trained:
        return say(truth, 0.05)
    return say(truth, 0.9) if call.sample % 2 else say(other(truth), 0.1)


class Recorder:
    """Wraps a rule; keeps every prompt's earlier messages (the retrieved shots)."""

    def __init__(self, rule):
        self.rule, self.shown = rule, []

    def __call__(self, call):
        self.shown += [m["content"] for m in call.messages[:-1]]
        return self.rule(call)


class Metered:
    """A backend that sums the usage each call reports (what this process used)."""

    def __init__(self, backend):
        self.backend, self.used = backend, Usage()

    def __getattr__(self, name):
        return getattr(self.backend, name)

    def _count(self, result):
        self.used += result.usage
        return result

    def finetune(self, *args, **options):
        return self._count(self.backend.finetune(*args, **options))

    def generate_with_logprobs(self, *args, **options):
        return self._count(self.backend.generate_with_logprobs(*args, **options))

    def embed(self, *args, **options):
        return self._count(self.backend.embed(*args, **options))
