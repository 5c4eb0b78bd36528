"""Multiple-choice benchmarks scored by log-likelihood, in batches, on any HF causal LM.

Each item is a JSONL line ``{"id", "source_key", "question", "choices": [...], "answer": int}``.
The score of choice ``c`` is ``sum_t log p(cont_t | question, cont_<t)`` over the tokens of
``delimiter + c`` (the question is encoded with the tokenizer's special tokens, the continuation
without). The pick is the arg-max; ``acc_norm`` picks by score per character of the choice
(lm-eval's ``acc_norm``). Malformed lines are counted, skipped and warned about (the file and the first
bad line); a file with no good item, or with more than :data:`MAX_MALFORMED_SHARE` of its lines bad,
is refused: it is most likely not a benchmark of this format, and a score on what is left would not
be the benchmark's.

Tensor legend: ``B`` batch of (item, choice) requests, ``T`` time, ``V`` vocabulary.
``input_ids_BT``, ``attention_mask_BT``, ``cont_mask_BT`` (continuation targets), ``logprobs_BTV``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from moe_adapt.errors import MoEAdaptError
from moe_adapt.eval.lm import target_logprobs

__all__ = ["MAX_MALFORMED_SHARE", "MCItem", "MCSet", "ScoredItem", "load_mc_items", "score_items"]

MAX_MALFORMED_SHARE = 0.5
"""Largest share of a benchmark file's non-empty lines that may be malformed; above it the file is
refused (a few bad lines are skipped with a warning, a file mostly of bad lines is not a benchmark)."""

Encode = Callable[[str, bool], list[int]]
"""``encode(text, add_special_tokens) -> token ids``."""

log = logging.getLogger("moe_adapt.eval")


@dataclass(frozen=True)
class MCItem:
    """One well-formed multiple-choice item."""

    id: str
    """Item id (unique in its file)."""
    question: str
    """Prompt text."""
    choices: tuple[str, ...]
    """Answer options (2 or more)."""
    answer: int
    """Index of the correct choice."""
    pair_key: str | None
    """Value of the parallel key, or None when the item has none."""


@dataclass
class MCSet:
    """Items of one benchmark file and what was skipped."""

    items: list[MCItem]
    """Well-formed items, in file order."""
    malformed: int = 0
    """Lines skipped as malformed (bad JSON, missing or wrong fields, duplicate id)."""
    examples: list[str] = field(default_factory=list)
    """The first few reasons, as ``line N: why``."""


@dataclass(frozen=True)
class ScoredItem:
    """Scores of one item."""

    item: MCItem
    """The item."""
    loglik: tuple[float, ...]
    """Sum of continuation log-likelihoods per choice (nats)."""
    n_chars: tuple[int, ...]
    """Characters per choice (for the length-normalised pick)."""

    @property
    def pick(self) -> int:
        """Arg-max choice by log-likelihood."""
        return int(np.argmax(self.loglik))

    @property
    def pick_norm(self) -> int:
        """Arg-max choice by log-likelihood per character."""
        return int(np.argmax(np.asarray(self.loglik) / np.maximum(np.asarray(self.n_chars), 1)))


def _check_item(obj: Any, parallel_key: str) -> tuple[MCItem | None, str]:
    if not isinstance(obj, dict):
        return None, "not a JSON object"
    item_id, question, choices, answer = (obj.get(k) for k in ("id", "question", "choices", "answer"))
    if not isinstance(item_id, str | int) or isinstance(item_id, bool) or str(item_id) == "":
        return None, "missing 'id'"
    if not isinstance(question, str) or not question.strip():
        return None, "missing or empty 'question'"
    if (
        not isinstance(choices, list)
        or len(choices) < 2
        or not all(isinstance(c, str) and c for c in choices)
    ):
        return None, "'choices' must be a list of 2+ non-empty strings"
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        return None, f"'answer' must be an integer index into the {len(choices)} choices"
    key = obj.get(parallel_key)
    pair_key = None if key is None else str(key)
    return MCItem(str(item_id), question, tuple(choices), answer, pair_key), ""


def load_mc_items(
    path: str | Path,
    *,
    parallel_key: str = "source_key",
    key: str = "file",
    max_malformed_share: float = MAX_MALFORMED_SHARE,
) -> MCSet:
    """Read a JSONL benchmark file; malformed lines are counted in ``malformed``, skipped, and logged
    in one warning naming the file, the count and the first bad line.

    Raises:
        MoEAdaptError: naming ``key`` when the file does not exist or cannot be read, holds no
            well-formed item, or more than ``max_malformed_share`` of its non-empty lines are malformed.
    """
    p = Path(path)
    if not p.is_file():
        raise MoEAdaptError(f"{key}={str(p)!r} does not exist (a JSONL file of multiple-choice items)")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise MoEAdaptError(f"{key}={str(p)!r} cannot be read: {err}") from err
    out = MCSet(items=[])
    seen: set[str] = set()
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        item: MCItem | None
        try:
            item, why = _check_item(json.loads(line), parallel_key)
        except json.JSONDecodeError as err:
            item, why = None, f"invalid JSON ({err.msg})"
        if item is not None and item.id in seen:
            why = f"duplicate id {item.id!r}"
            item = None
        if item is None:
            out.malformed += 1
            if len(out.examples) < 5:
                out.examples.append(f"line {n}: {why}")
            continue
        seen.add(item.id)
        out.items.append(item)
    lines_used = len(out.items) + out.malformed
    first = out.examples[0] if out.examples else ""
    if not out.items:
        why = f"all {out.malformed} lines are malformed (first: {first})" if out.malformed else "it is empty"
        raise MoEAdaptError(f"{key}={str(p)!r} holds no multiple-choice item: {why}")
    if out.malformed > max_malformed_share * lines_used:
        raise MoEAdaptError(
            f"{key}={str(p)!r}: {out.malformed} of {lines_used} lines are malformed, more than "
            f"{max_malformed_share:.0%} (first: {first}); fix the file or check its format"
        )
    if out.malformed:
        log.warning(
            "%s=%r: skipped %d of %d lines as malformed (first: %s)",
            key,
            str(p),
            out.malformed,
            lines_used,
            first,
        )
    return out


def _device(model: torch.nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def score_items(
    model: torch.nn.Module,
    encode: Encode,
    items: Sequence[MCItem],
    *,
    delimiter: str = " ",
    max_length: int | None = None,
    batch_size: int = 8,
    pad_id: int = 0,
    desc: str = "choices",
) -> list[ScoredItem]:
    """Log-likelihood of every choice of every item, in batches of ``batch_size`` (item, choice) pairs.

    Sequences longer than ``max_length`` (default: the model's ``max_position_embeddings``) lose
    question tokens from the left; the continuation is always scored whole. An item with a choice
    that leaves no room for context is skipped (logged) and absent from the result.
    """
    config = getattr(model, "config", None)
    limit = max_length or getattr(config, "max_position_embeddings", None) or 2048
    vocab_size = getattr(config, "vocab_size", None)
    requests: list[tuple[int, int, list[int], int]] = []  # (item, choice, ids, n_continuation)
    too_long: set[int] = set()
    for i, item in enumerate(items):
        ctx = encode(item.question, True)
        item_requests = []
        for c, choice in enumerate(item.choices):
            cont = encode(delimiter + choice, False)
            if not cont:
                raise MoEAdaptError(f"item {item.id!r}: choice {c} encodes to no token")
            ids = (ctx + cont)[-limit:]
            if vocab_size is not None and max(ids) >= vocab_size:
                raise MoEAdaptError(
                    f"item {item.id!r}: the tokenizer gives id {max(ids)} but the model's vocabulary is "
                    f"0..{vocab_size - 1}; set eval.tokenizer to the model's tokenizer"
                )
            if len(ids) <= len(cont):  # the choice alone fills the context: the item cannot be scored
                too_long.add(i)
            item_requests.append((i, c, ids, len(cont)))
        if i not in too_long:
            requests += item_requests
    if too_long:
        log.warning(
            "%s: skipped %d of %d item(s) whose choices do not fit in max_length=%d",
            desc,
            len(too_long),
            len(items),
            limit,
        )
    order = sorted(range(len(requests)), key=lambda r: -len(requests[r][2]))
    loglik = [[0.0] * len(item.choices) for item in items]
    device = _device(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in tqdm(range(0, len(order), batch_size), desc=desc, leave=False, mininterval=2):
                batch = [requests[r] for r in order[start : start + batch_size]]
                width = max(len(ids) for _, _, ids, _ in batch)
                input_ids_BT = torch.full((len(batch), width), pad_id, dtype=torch.long)
                attention_mask_BT = torch.zeros_like(input_ids_BT)
                cont_mask_BT = torch.zeros((len(batch), width), dtype=torch.bool)
                for b, (_, _, ids, n_cont) in enumerate(batch):
                    input_ids_BT[b, : len(ids)] = torch.tensor(ids)
                    attention_mask_BT[b, : len(ids)] = 1
                    cont_mask_BT[b, len(ids) - n_cont : len(ids)] = True
                # position t predicts token t + 1: predict just before each continuation token
                predict_BT = torch.zeros_like(cont_mask_BT)
                predict_BT[:, :-1] = cont_mask_BT[:, 1:]
                token_lp_N, rows_N = target_logprobs(
                    model, input_ids_BT.to(device), attention_mask_BT.to(device), predict_BT.to(device)
                )
                summed_B = torch.zeros(len(batch), dtype=torch.float64, device=token_lp_N.device)
                summed_B = summed_B.index_add(0, rows_N, token_lp_N.double()).cpu()
                for b, (i, c, _, _) in enumerate(batch):
                    loglik[i][c] = float(summed_B[b])
    finally:
        model.train(was_training)
    return [
        ScoredItem(item, tuple(loglik[i]), tuple(len(ch) for ch in item.choices))
        for i, item in enumerate(items)
        if i not in too_long
    ]
