"""Batched generation with a transformers causal LM, and the teacher's top-k log-probabilities.

Prompts are token ids (already chat-formatted); they are left-padded into batches so every row's
response starts at the same column. Sampling is seeded per call, so a resumed generate phase
reproduces the shards it had not finished. Responses are returned as token ids up to and including
the end-of-sequence token when the model wrote one.

The model-level loop only: the generate phase (prompt shards, resume, files) is
:mod:`moe_adapt.distill.generate`, and held-out accuracy (:mod:`moe_adapt.distill.accuracy`) uses it too.

Shape legend: ``B`` rows, ``P`` padded prompt length, ``R`` response tokens, ``K`` top-k entries.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch


def generate(
    model: Any,
    prompts: Sequence[Sequence[int]],
    *,
    pad_id: int,
    eos_id: int,
    max_new_tokens: int,
    samples: int = 1,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int = 0,
) -> list[list[list[int]]]:
    """``out[i][s]``: response ids of sample ``s`` for prompt ``i`` (greedy when temperature is 0)."""
    if not prompts:
        return []
    device = next(model.parameters()).device
    width = max(len(p) for p in prompts)
    ids_BP = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask_BP = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids_BP[i, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        mask_BP[i, width - len(p) :] = 1
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "num_return_sequences": samples,
        "pad_token_id": pad_id,
        "eos_token_id": eos_id,
    }
    if temperature > 0:
        kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k or None)
    else:
        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
    torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model.generate(
                input_ids=ids_BP.to(device), attention_mask=mask_BP.to(device), use_cache=True, **kwargs
            )
    finally:
        model.train(was_training)
    new = out[:, width:].cpu().tolist()
    results: list[list[list[int]]] = []
    for i in range(len(prompts)):
        per_prompt = []
        for s in range(samples):
            row = new[i * samples + s]
            if eos_id in row:
                row = row[: row.index(eos_id) + 1]
            else:
                while row and row[-1] == pad_id:
                    row.pop()
            per_prompt.append(row)
        results.append(per_prompt)
    return results


def topk_logprobs(
    model: Any, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], k: int, *, pad_id: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """For each ``(prompt_ids, response_ids)``: the model's ``k`` most likely next tokens before each
    response token and their log-probabilities (temperature 1):
    ``(ids [R, K] int32, logp [R, K] float16)``."""
    device = next(model.parameters()).device
    seqs = [list(p) + list(r) for p, r in pairs]
    width = max(len(s) for s in seqs)
    ids_BT = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask_BT = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids_BT[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask_BT[i, : len(s)] = 1
    with torch.no_grad():
        logits_BTV = model(
            input_ids=ids_BT.to(device), attention_mask=mask_BT.to(device), use_cache=False
        ).logits
    out = []
    for i, (p, r) in enumerate(pairs):
        # logits at position t predict token t + 1: the response tokens are predicted from len(p) - 1 on
        logp_RV = torch.log_softmax(logits_BTV[i, len(p) - 1 : len(p) - 1 + len(r)].float(), dim=-1)
        top = torch.topk(logp_RV, min(k, logp_RV.shape[-1]), dim=-1)
        out.append((top.indices.to(torch.int32).cpu().numpy(), top.values.to(torch.float16).cpu().numpy()))
    return out


def pad_id_of(tokenizer: Any) -> int:
    """The tokenizer's padding id, or its end-of-sequence id when it has no padding token."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return int(pad)


def generate_for_prompts(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Any],
    *,
    chat_template: str | None,
    batch_size: int,
    seed: int = 0,
    **sampling: Any,
) -> Iterator[tuple[Sequence[Any], list[list[int]], list[list[list[int]]]]]:
    """Chat-format ``prompts`` (objects with a ``.prompt`` text) and generate for them ``batch_size``
    at a time; yields ``(batch, prompt_ids, responses)`` per batch, ``responses`` as :func:`generate`
    returns them. Batch ``b`` (0-based offset into ``prompts``) samples with seed ``seed + b``."""
    from moe_adapt.distill.sft_data import chat_prompt_ids

    pad_id, eos_id = pad_id_of(tokenizer), int(tokenizer.eos_token_id)
    for b in range(0, len(prompts), batch_size):
        batch = prompts[b : b + batch_size]
        ids = [chat_prompt_ids(tokenizer, p.prompt, chat_template) for p in batch]
        yield batch, ids, generate(model, ids, pad_id=pad_id, eos_id=eos_id, seed=seed + b, **sampling)
