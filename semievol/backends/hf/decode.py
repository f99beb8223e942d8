"""The decode loop and the teacher-forced scorer: each prompt read once, its KV cache shared
by its n samples, and every token's raw log-probability taken as it is sampled."""
from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch
from peft import PeftModel
from transformers import DynamicCache

@torch.inference_mode()
def decode(model, input_ids: torch.Tensor, mask: torch.Tensor, *, n: int,
            temperature: float, max_tokens: int, stop: torch.Tensor,
            generator: torch.Generator):
    """Prefill left-padded prompts once, repeat the KV cache n times, then sample.

    Rows are the prompts' samples in order (prompt 0's n samples, then prompt 1's, ...).
    A row leaves the cache as soon as it stops, so short answers cost no more steps.
    Returns (token ids, logprobs, lengths) as CPU tensors: ids and logprobs are
    (rows, max_tokens), valid up to each row's length, which excludes the stop token; a
    row that never stopped has length ``max_tokens``."""
    cache = DynamicCache(config=model.config)
    with_cache = {cache_arg(model): cache, "use_cache": True}
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                   logits_to_keep=1, **with_cache).logits[:, -1]
    if n > 1:
        cache.batch_repeat_interleave(n)
        logits, mask = logits.repeat_interleave(n, 0), mask.repeat_interleave(n, 0)
        positions = positions.repeat_interleave(n, 0)
    rows, device = logits.shape[0], logits.device
    ids = torch.full((rows, max_tokens), -1, dtype=torch.long, device=device)
    logprobs = torch.zeros((rows, max_tokens), device=device)
    lengths = torch.full((rows,), max_tokens, dtype=torch.long, device=device)
    alive = torch.arange(rows, device=device)
    """The rows still sampling, in the order the cache holds them."""
    position = positions[:, -1:]
    for step in range(max_tokens):
        logits = logits.float()
        token = pick(logits, temperature, generator)
        ids[alive, step] = token
        logprobs[alive, step] = torch.log_softmax(logits, -1).gather(1, token[:, None])[:, 0]
        ends = torch.isin(token, stop)
        lengths[alive[ends]] = step
        if ends.all() or step == max_tokens - 1:
            break
        if ends.any():
            keep = (~ends).nonzero()[:, 0].cpu()  # CPU indices index tensors on any device
            cache.batch_select_indices(keep)
            alive, token = alive[keep.to(device)], token[keep.to(device)]
            mask, position = mask[keep.to(mask.device)], position[keep.to(mask.device)]
        position = position + 1
        mask = torch.cat([mask, mask.new_ones(len(alive), 1)], dim=1)
        logits = model(input_ids=token[:, None].to(input_ids.device), attention_mask=mask,
                       position_ids=position, **with_cache).logits[:, -1]
    return ids.cpu(), logprobs.cpu(), lengths.cpu()


def pick(logits: torch.Tensor, temperature: float, generator: torch.Generator) -> torch.Tensor:
    """The next token of each row: argmax at temperature 0, else a temperature sample."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, -1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


def teacher_forced(model, pad_id: int, prompts: list[list[int]],
                    answers: list[list[int]]) -> list[list[float]]:
    """Log-probabilities of each answer's tokens after its prompt, one batch."""
    seqs = [p + a for p, a in zip(prompts, answers)]
    input_ids, mask = left_pad(seqs, pad_id, input_device(model))
    keep = max(len(a) for a in answers) + 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                   logits_to_keep=keep).logits.float()
    logprobs = torch.log_softmax(logits, -1)
    out = []
    for row, answer in enumerate(answers):
        if not answer:
            out.append([])
            continue
        # answer token j sits at position -len(answer)+j; it is predicted one position earlier
        at = torch.arange(keep - len(answer) - 1, keep - 1, device=logprobs.device)
        target = torch.tensor(answer, device=logprobs.device)
        out.append(logprobs[row, at, target].tolist())
    return out


def left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in seqs], device=device)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=device)
    return ids, mask


def stop_ids(tok, model) -> set[int]:
    """End-of-turn and end-of-sequence ids of the tokenizer and generation config."""
    ids = {tok.eos_token_id}
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids.update(configured if isinstance(configured, list) else [configured])
    for special in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>"):
        if special in tok.get_vocab():
            ids.add(tok.convert_tokens_to_ids(special))
    return {i for i in ids if i is not None}


def token_ids(tok, completion: str | Sequence[str]) -> list[int]:
    if isinstance(completion, str):
        return tok(completion, add_special_tokens=False)["input_ids"]
    return [i for piece in completion for i in tok(piece, add_special_tokens=False)["input_ids"]]


def last_hidden(model, batch, *, causal: bool) -> torch.Tensor:
    """Last-layer hidden states: of a causal LM (skipping most of its output layer), or of
    a bare ``AutoModel``."""
    if causal:
        return model(**batch, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
    return model(**batch).last_hidden_state


def cache_arg(model) -> str:
    """The forward() argument that takes a KV cache: ``cache`` in recent transformers,
    ``past_key_values`` (deprecated there) before."""
    inner = model.get_base_model() if isinstance(model, PeftModel) else model
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"


def input_device(model) -> torch.device:
    """Where inputs go: the input embeddings' device (right under ``device_map="auto"``)."""
    return model.get_input_embeddings().weight.device


def output_device(model) -> torch.device:
    head = model.get_output_embeddings()
    return head.weight.device if head is not None else input_device(model)
