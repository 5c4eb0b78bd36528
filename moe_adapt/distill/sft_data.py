"""Supervised fine-tuning data: chat-formatted examples packed into rows, loss on responses only.

An :class:`Example` is a prompt (already run through the student's chat template) and a response,
as token ids, optionally with the teacher's top-k log-probabilities for each response token.
:func:`pack_examples` fills rows of ``seq_len + 1`` tokens greedily; ``position_ids`` restart at 0 at
every example, which transformers turns into a block-diagonal causal mask, so packed examples never
attend to each other. :class:`PackedSampler` serves the rows in a fresh permutation per epoch, a pure
function of ``(seed, epoch)``, so a resumed run sees the same batches.

Shape legend: ``R`` rows, ``T1`` = seq_len + 1 tokens, ``T`` label positions, ``K`` top-k entries.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from moe_adapt.engines.batch import TrainBatch
from moe_adapt.errors import MoEAdaptConfigError, MoEAdaptError

log = logging.getLogger(__name__)


@dataclass
class Example:
    """One prompt/response pair as token ids."""

    prompt_ids: list[int]
    response_ids: list[int]
    lang: str
    topk_ids: np.ndarray | None = None
    """``[len(response_ids), K]`` the teacher's top-k next tokens before each response token."""
    topk_logp: np.ndarray | None = None
    """``[len(response_ids), K]`` their log-probabilities."""


def chat_prompt_ids(tokenizer: Any, prompt: str, chat_template: str | None = None) -> list[int]:
    """Token ids of ``prompt`` as one user turn followed by the assistant's generation prompt."""
    template = chat_template or getattr(tokenizer, "chat_template", None)
    if not template:
        raise MoEAdaptConfigError(
            f"the tokenizer of {getattr(tokenizer, 'name_or_path', '?')!r} has no chat template: "
            "set distill.chat_template to a Jinja template"
        )
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        chat_template=template,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def response_ids(tokenizer: Any, response: str) -> list[int]:
    """Token ids of a response text, ending with the end-of-sequence token (so the model learns to stop)."""
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    return [int(i) for i in ids] + [int(tokenizer.eos_token_id)]


@dataclass
class PackedRows:
    """Packed training rows (see the module docstring for shapes)."""

    tokens: np.ndarray  # [R, T1] int64
    loss_mask: np.ndarray  # [R, T] bool
    position_ids: np.ndarray  # [R, T] int64
    lang_ids: np.ndarray  # [R, T] int16
    langs: tuple[str, ...]
    topk_ids: np.ndarray | None  # [R, T, K] int64
    topk_logp: np.ndarray | None  # [R, T, K] float32
    truncated: int  # examples whose response was cut to fit a row

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


def pack_examples(examples: Sequence[Example], seq_len: int, pad_id: int, langs: Sequence[str]) -> PackedRows:
    """Pack examples in the given order into rows of ``seq_len + 1`` tokens (first fit, in order).

    An example longer than a row keeps its prompt and the first part of its response (counted in
    ``truncated``); an example whose prompt alone fills a row is an error.
    """
    if not examples:
        raise MoEAdaptError("no training examples to pack")
    width = seq_len + 1
    with_topk = examples[0].topk_ids is not None
    k = int(examples[0].topk_ids.shape[1]) if with_topk and examples[0].topk_ids is not None else 0
    lang_index = {lang: i for i, lang in enumerate(langs)}
    rows: list[list[tuple[Example, int]]] = []  # (example, response tokens kept)
    used, truncated = width, 0
    for ex in examples:
        if ex.lang not in lang_index:
            raise MoEAdaptError(f"example language {ex.lang!r} is not one of {list(langs)}")
        if (ex.topk_ids is not None) != with_topk:
            raise MoEAdaptError("either every example carries teacher top-k log-probabilities or none does")
        if len(ex.prompt_ids) >= width - 1:
            raise MoEAdaptConfigError(
                f"a prompt of {len(ex.prompt_ids)} tokens does not fit seq_len={seq_len} with its response: "
                "raise the phase's seq_len"
            )
        keep = min(len(ex.response_ids), width - len(ex.prompt_ids))
        truncated += keep < len(ex.response_ids)
        size = len(ex.prompt_ids) + keep
        if used + size > width:
            rows.append([])
            used = 0
        rows[-1].append((ex, keep))
        used += size
    num = len(rows)
    tokens = np.full((num, width), pad_id, dtype=np.int64)
    is_response = np.zeros((num, width), dtype=bool)
    example_of = np.full((num, width), -1, dtype=np.int64)  # example index within the row, -1 = pad
    positions = np.zeros((num, width), dtype=np.int64)
    lang_of = np.zeros((num, width), dtype=np.int16)
    topk_ids = np.zeros((num, width, k), dtype=np.int64) if with_topk else None
    topk_logp = np.zeros((num, width, k), dtype=np.float32) if with_topk else None
    for r, row in enumerate(rows):
        at = 0
        for j, (ex, keep) in enumerate(row):
            p = len(ex.prompt_ids)
            n = p + keep
            tokens[r, at : at + p] = ex.prompt_ids
            tokens[r, at + p : at + n] = ex.response_ids[:keep]
            is_response[r, at + p : at + n] = True
            example_of[r, at : at + n] = j
            positions[r, at : at + n] = np.arange(n)
            lang_of[r, at : at + n] = lang_index[ex.lang]
            if topk_ids is not None and topk_logp is not None:
                assert ex.topk_ids is not None and ex.topk_logp is not None
                topk_ids[r, at + p : at + n] = ex.topk_ids[:keep]
                topk_logp[r, at + p : at + n] = ex.topk_logp[:keep]
            at += n
        positions[r, at:] = np.arange(width - at)  # the padding is a document of its own
    # label position t predicts token t + 1: it counts when that token is a response token of the
    # same example as token t
    same_example = (example_of[:, 1:] == example_of[:, :-1]) & (example_of[:, 1:] >= 0)
    loss_mask = is_response[:, 1:] & same_example
    return PackedRows(
        tokens=tokens,
        loss_mask=loss_mask,
        position_ids=positions[:, :-1],
        lang_ids=lang_of[:, 1:],
        langs=tuple(langs),
        topk_ids=None if topk_ids is None else topk_ids[:, 1:],
        topk_logp=None if topk_logp is None else topk_logp[:, 1:],
        truncated=truncated,
    )


class PackedSampler:
    """Serves packed rows in batches, epoch after epoch, each epoch in its own seeded permutation."""

    def __init__(self, rows: PackedRows, seed: int) -> None:
        self.rows, self.seed = rows, int(seed)
        self.epoch, self.cursor = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.rows))

    def next_batch(self, batch_size: int) -> TrainBatch:
        """The next ``batch_size`` rows (crossing into the next epoch when this one runs out)."""
        picked: list[int] = []
        while len(picked) < batch_size:
            if self.cursor == len(self._order):
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            take = min(batch_size - len(picked), len(self._order) - self.cursor)
            picked += self._order[self.cursor : self.cursor + take].tolist()
            self.cursor += take
        idx = np.asarray(picked)
        r = self.rows
        return TrainBatch(
            tokens=r.tokens[idx],
            loss_mask=r.loss_mask[idx],
            position_ids=r.position_ids[idx],
            lang_ids=r.lang_ids[idx],
            langs=r.langs,
            topk_ids=None if r.topk_ids is None else r.topk_ids[idx],
            topk_logp=None if r.topk_logp is None else r.topk_logp[idx],
        )

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "epoch": self.epoch, "cursor": self.cursor, "rows": len(self.rows)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["rows"] != len(self.rows) or state["seed"] != self.seed:
            raise MoEAdaptError(
                f"checkpoint was made on {state['rows']} packed rows with seed {state['seed']}, this run has "
                f"{len(self.rows)} with seed {self.seed}: the training data changed, start the phase afresh"
            )
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._permutation(self.epoch)
