"""Replay of general text in the distill training phases, and their held-out loss per language.

A training phase that sees only task text forgets the language model it started from. With
``distill.replay = r`` a share ``r`` of the phase's batches are general text instead: whole batches of
the data stage's shards, drawn by the cpt stage's :class:`~moe_adapt.cpt.sampler.MixtureSampler` with
the ``mixture`` group's sources and ratio (one curriculum phase: every bucket), so an 80/20 mixture
stays 80/20. Which steps replay is the divisor scheduler of :func:`~moe_adapt.cpt.streams.webster_picks`
over the two streams (task, general): after ``m`` steps the replay count is within one batch of
``r · m``. A replay batch trains on the plain next-token loss (no KD, whatever the phase) and its loss
terms are logged as ``replay/<term>``; every step logs ``replay`` (1 or 0).

Everything here is a pure function of (seed, config, shards, step) and :class:`ReplayMixer` saves its
state with the trainer's checkpoints, so a resumed phase continues the same stream.

Shape legend: ``B`` rows of a batch, ``T1`` seq_len + 1 packed tokens.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from moe_adapt.cpt.config import CurriculumConfig, MixtureConfig
from moe_adapt.cpt.sampler import MixtureBatch, MixtureSampler, load_manifest
from moe_adapt.cpt.streams import webster_picks
from moe_adapt.distill.sft_data import PackedSampler
from moe_adapt.engines.batch import TrainBatch
from moe_adapt.errors import MoEAdaptConfigError

RELABELLED = ("loss", "lm_loss", "aux_loss", "z_loss", "l2_anchor", "kl_anchor", "tokens")
"""The engine's metrics a replay step logs as ``replay/<key>`` (the task steps keep the plain keys, so
``loss`` is always the phase's own objective); lr, grad_norm, skipped and moe/* keep their names."""


@dataclasses.dataclass
class ReplaySource:
    """Where a phase's general-text batches come from."""

    shards: Path
    """The data stage's training shards (``manifest.json``)."""
    mixture: MixtureConfig
    """Sources and ratio (the ``mixture`` group); its ``seq_len`` is replaced by the phase's."""
    share: float
    """Share of the phase's batches that replay, in (0, 1)."""
    rows: bool = False
    """True: replay a share of the rows of every batch (the LM phases sft and seq_kd; the token-KD
    phases still replay whole batches, having no teacher for general text); False: whole batches."""
    adds_steps: bool = False
    """True: replay batches come on top of the phase's ``steps`` task batches (the phase runs
    :func:`steps_with_replay` steps); False: they take ``share`` of the ``steps``."""


def check_source(shards: str | None, share: float, key: str = "distill.shards") -> Path:
    """``shards`` as a folder with the data stage's manifest, or a one-line config error."""
    if not shards or not Path(shards, "manifest.json").is_file():
        raise MoEAdaptConfigError(
            f"{key}={shards!r} has no manifest.json, but distill.replay={share} draws general text from "
            "it: run the data stage first, point it at a shard folder, or set distill.replay=0"
        )
    return Path(shards)


@dataclasses.dataclass
class ReplayBatch:
    """A batch of general text inside a distill phase: plain next-token loss on every token."""

    tokens: np.ndarray
    """``tokens_BT1`` int64: inputs ``[:, :-1]``, labels ``[:, 1:]``."""
    mixture: MixtureBatch
    """The sampler's batch (its sources, for the ``data/<source>`` shares)."""
    kd: bool = False
    """Never distilled: the engine trains it on the LM term even in token-KD phases."""

    def metrics(self) -> dict[str, float]:
        """``replay`` = 1 and the share of each source (``data/<source>``)."""
        shares = self.mixture.metrics()
        shares.pop("phase", None)
        return {"replay": 1.0, **shares}

    def relabel(self, metrics: dict[str, float]) -> dict[str, float]:
        """The engine's metrics with the loss terms moved under ``replay/``."""
        return {(f"replay/{k}" if k in RELABELLED else k): v for k, v in metrics.items()}


class _TaskBatch(TrainBatch):
    """A task batch of a phase with replay: logs ``replay`` = 0 so each step says which stream it took."""

    def metrics(self) -> dict[str, float]:
        return {"replay": 0.0}


@dataclasses.dataclass
class MixedBatch(TrainBatch):
    """A task batch with general-text rows appended (row replay): those rows count every label, sit at
    positions ``0..T-1`` and belong to no task language (``lang_ids`` = -1)."""

    replay_rows: int = 0
    """How many of the rows (the last ones) are general text."""

    def metrics(self) -> dict[str, float]:
        """``replay`` = the share of the batch's rows that are general text."""
        return {"replay": self.replay_rows / len(self.tokens)}


def mix_rows(task: TrainBatch, general: np.ndarray) -> MixedBatch:
    """``task``'s rows followed by the general-text rows ``general`` (``tokens_BT1`` of the same width)."""
    k, width = general.shape
    if width != task.tokens.shape[1] or task.topk_ids is not None:
        raise MoEAdaptConfigError(
            f"replay rows ({width - 1} tokens) go only into LM batches of the same seq_len, got "
            f"{task.tokens.shape[1] - 1}{' with teacher top-k' if task.topk_ids is not None else ''}"
        )
    t = width - 1

    def cat(a: np.ndarray | None, fill: np.ndarray) -> np.ndarray | None:
        return None if a is None else np.concatenate([a, fill.astype(a.dtype)])

    return MixedBatch(
        tokens=np.concatenate([task.tokens, general.astype(task.tokens.dtype)]),
        loss_mask=cat(task.loss_mask, np.ones((k, t), dtype=bool)),
        position_ids=cat(task.position_ids, np.tile(np.arange(t), (k, 1))),
        lang_ids=cat(task.lang_ids, np.full((k, t), -1)),
        langs=task.langs,
        replay_rows=k,
    )


class ReplayMixer:
    """The batch source of a distill phase with replay: task batches from ``task`` and, on a share of
    the steps, general-text batches from ``general`` (the trainer's :class:`BatchSource` contract).
    With ``rows`` the share is of every batch's rows instead: each batch is the task's rows followed by
    general-text rows, their count per batch again the divisor schedule's (over rows)."""

    def __init__(
        self, task: PackedSampler, general: MixtureSampler, share: float, rows: bool = False
    ) -> None:
        if not 0 < share < 1:
            raise MoEAdaptConfigError(f"distill.replay={share} is invalid: must be in (0, 1) to mix")
        self.task, self.general, self.share, self.rows = task, general, float(share), bool(rows)
        self.weights_N = np.array([1.0 - self.share, self.share])
        self.counts_N = np.zeros(2, dtype=np.int64)
        """Task and replay batches (rows, with ``rows``) served so far."""

    @classmethod
    def build(
        cls, task: PackedSampler, source: ReplaySource, seq_len: int, seed: int, *, kd: bool = False
    ) -> ReplayMixer:
        """A mixer over ``task`` and ``source``'s shards cut into rows of ``seq_len`` tokens (one
        curriculum phase over every bucket); row replay (``source.rows``) only in a phase without
        token KD (``kd`` false)."""
        mixture = dataclasses.replace(source.mixture, seq_len=seq_len)
        general = MixtureSampler(source.shards, mixture, CurriculumConfig(), seed)
        return cls(task, general, source.share, rows=source.rows and not kd)

    @property
    def replayed(self) -> int:
        """Replay batches served so far."""
        return int(self.counts_N[1])

    def next_batch(self, batch_size: int) -> TrainBatch | ReplayBatch:
        """The next batch: the task's or (when the schedule says so) general text; with ``rows``, the
        task's rows and general-text rows in one batch."""
        if self.rows:
            picks = webster_picks(self.counts_N, self.weights_N, batch_size)
            k = int(picks.sum())
            if k == batch_size:
                raise MoEAdaptConfigError(
                    f"distill.replay_rows=true with distill.replay={self.share} fills a whole batch of "
                    f"{batch_size} rows with general text: use a larger batch_size, or replay_rows=false"
                )
            self.counts_N += [batch_size - k, k]
            task = self.task.next_batch(batch_size - k)
            if k == 0:
                return _TaskBatch(**{f.name: getattr(task, f.name) for f in dataclasses.fields(TrainBatch)})
            return mix_rows(task, np.ascontiguousarray(self.general.next_batch(k).tokens))
        pick = int(webster_picks(self.counts_N, self.weights_N, 1)[0])
        self.counts_N[pick] += 1
        if pick == 1:
            mixed = self.general.next_batch(batch_size)
            return ReplayBatch(np.ascontiguousarray(mixed.tokens), mixed)
        batch = self.task.next_batch(batch_size)
        return _TaskBatch(**{f.name: getattr(batch, f.name) for f in dataclasses.fields(TrainBatch)})

    def state_dict(self) -> dict[str, Any]:
        return {
            "task": self.task.state_dict(),
            "general": self.general.state_dict(),
            "counts": self.counts_N.tolist(),
            "share": self.share,
            "rows": self.rows,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if float(state.get("share", -1)) != self.share:
            raise MoEAdaptConfigError(
                f"the checkpoint was made with distill.replay={state.get('share')}, this run has "
                f"{self.share}: resume with the original setting, or start the phase afresh"
            )
        self.task.load_state_dict(state["task"])
        self.general.load_state_dict(state["general"])
        self.counts_N = np.asarray(state["counts"], dtype=np.int64)


def steps_with_replay(task_steps: int, share: float) -> int:
    """The number of steps whose schedule (:class:`ReplayMixer`'s) holds exactly ``task_steps`` task
    batches when ``share`` of the batches replay: about ``task_steps / (1 - share)``."""
    if task_steps <= 0 or share <= 0:
        return max(task_steps, 0)
    weights_N, counts_N = np.array([1.0 - share, share]), np.zeros(2, dtype=np.int64)
    steps = int(task_steps / (1.0 - share)) + 2  # a little past the end: the divisor schedule's slack
    picks = webster_picks(counts_N, weights_N, steps)
    return int(np.searchsorted(np.cumsum(picks == 0), task_steps) + 1)


def shard_vocab(shards: Path) -> int:
    """The vocabulary size the shards were tokenized with (0 when the manifest does not say)."""
    return int(load_manifest(shards).get("vocab_size", 0))


def realised_share(metrics_rows: Sequence[Mapping[str, Any]]) -> float | None:
    """Share of a phase's logged steps that replayed (None when no step logged ``replay``)."""
    flags = [float(r["replay"]) for r in metrics_rows if "replay" in r]
    return round(sum(flags) / len(flags), 6) if flags else None
