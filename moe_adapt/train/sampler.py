"""The mixture sampler: packed training sequences from the data stage's shards, by source weight and phase.

Every sequence comes from one source. Which source is a deterministic divisor scheduler over the
sources' token shares (:func:`~moe_adapt.train.streams.webster_picks`), not random draws, so the
realised share of every source stays within ~2 sequences of its weight over any window. Within a
source, the curriculum decides which difficulty buckets are read: each (source, phase) is one pool of
documents, permuted per epoch from the seed, packed into windows of ``seq_len + 1`` tokens across
document boundaries. Sources named in ``replay`` ignore the curriculum and read all their buckets in
every phase. With linear pacing, the next phase's pool is blended in by integer error diffusion.

The stream is a pure function of (seed, config, manifest, position): it does not depend on how it is
cut into batches, and :meth:`MixtureSampler.state_dict` (small, JSON) resumes it exactly.

Shape legend: ``B`` sequences in a batch, ``S1`` seq_len + 1 tokens, ``N`` sources.
"""

from __future__ import annotations

import json
import logging
import math
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from moe_adapt.errors import MoEAdaptConfigError, MoEAdaptError, invalid
from moe_adapt.train.curriculum import Curriculum, CurriculumConfig
from moe_adapt.train.streams import DocPool, EpochLimit, ShardArrays, diffuse_picks, webster_picks

log = logging.getLogger(__name__)

EXHAUSTION = ("repeat", "stop_phase")
STATE_VERSION = 1


def _fail(key: str, value: object, allowed: str) -> NoReturn:
    invalid(f"mixture.{key}", value, allowed)


@dataclass
class MixtureConfig:
    """The ``mixture`` config group: how much of each source the training stream holds."""

    target_ratio: float | None = 0.8
    """Share of training tokens from sources with role target; the rest is split over the other roles'
    sources in proportion to their tokens. Set to null when using weights."""

    weights: dict[str, float] = field(default_factory=dict)
    """Explicit weights per source name or role (normalised to sum 1; a role's weight is split over its
    sources in proportion to their tokens). Needs target_ratio=null."""

    replay: list[str] = field(default_factory=lambda: ["anchor"])
    """Sources or roles read from all their buckets in every phase (continuous replay / anti-forgetting
    anchors) instead of following the curriculum; their share is kept in every phase like any other."""

    exhaustion: str = "repeat"
    """When a pool runs out: repeat (re-permute, next epoch, up to max_epochs) or stop_phase (end the
    current phase early and move to the next)."""

    max_epochs: int = 4
    """With exhaustion=repeat: most passes over any pool; one more is an error naming the source."""

    seq_len: int = 2048
    """Tokens per training sequence; the sampler yields seq_len + 1 ids (inputs and shifted labels)."""

    def __post_init__(self) -> None:
        if self.target_ratio is not None and not 0.0 < self.target_ratio <= 1.0:
            _fail("target_ratio", self.target_ratio, "must be in (0, 1], or null to use mixture.weights")
        if self.weights and self.target_ratio is not None:
            _fail("target_ratio", self.target_ratio, "must be null when mixture.weights is set")
        if not self.weights and self.target_ratio is None:
            _fail("weights", dict(self.weights), "set mixture.weights or mixture.target_ratio")
        for key, w in self.weights.items():
            if not (isinstance(w, int | float) and math.isfinite(w) and w >= 0):
                _fail(f"weights.{key}", w, "must be a finite number >= 0")
        if self.weights and sum(self.weights.values()) <= 0:
            _fail("weights", dict(self.weights), "at least one weight must be > 0")
        if self.exhaustion not in EXHAUSTION:
            _fail("exhaustion", self.exhaustion, f"choose one of {', '.join(EXHAUSTION)}")
        if self.max_epochs < 1:
            _fail("max_epochs", self.max_epochs, "must be >= 1")
        if self.seq_len < 1:
            _fail("seq_len", self.seq_len, "must be >= 1")


class DataExhaustedError(MoEAdaptError):
    """The last phase ran out of data under ``mixture.exhaustion=stop_phase``."""


@dataclass
class Batch:
    """One batch of packed sequences."""

    tokens: np.ndarray
    """``tokens_BS1`` int64 ``[B, seq_len + 1]``: inputs are ``[:, :-1]``, labels ``[:, 1:]``."""
    source_ids: np.ndarray
    """``source_ids_B`` int64: index of each sequence's source in ``names``."""
    phases: np.ndarray
    """``phases_B`` int64: curriculum phase of each sequence."""
    names: list[str]
    """Source names (the sampler's ``sources``)."""

    @property
    def sources(self) -> list[str]:
        """The source name of each sequence."""
        return [self.names[i] for i in self.source_ids.tolist()]


def load_manifest(shard_dir: str | Path) -> dict[str, Any]:
    """Read ``shard_dir/manifest.json`` as written by the data stage."""
    path = Path(shard_dir) / "manifest.json"
    if not path.is_file():
        raise MoEAdaptError(f"no manifest.json in {shard_dir}: run the data stage first (stages=[data])")
    try:
        manifest: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise MoEAdaptError(f"cannot read {path}: {err}") from err
    if not manifest.get("shards"):
        raise MoEAdaptError(f"{path} lists no shards: the data stage kept no documents")
    return manifest


def resolve_weights(shards: list[dict[str, Any]], cfg: MixtureConfig) -> dict[str, float]:
    """Normalised token share per source name (sources with weight 0 left out)."""
    role_of: dict[str, str] = {}
    tokens: dict[str, int] = {}
    for s in shards:
        role_of[s["source"]] = s.get("role", "other")
        tokens[s["source"]] = tokens.get(s["source"], 0) + int(s["tokens"])
    roles = sorted(set(role_of.values()))
    spec = dict(cfg.weights)
    if not spec:
        assert cfg.target_ratio is not None
        if "target" not in roles:
            _fail("target_ratio", cfg.target_ratio, f"the manifest has no role target (roles: {roles})")
        spec = {"target": cfg.target_ratio}
        others = {r: sum(tokens[s] for s in tokens if role_of[s] == r) for r in roles if r != "target"}
        rest = 1.0 - cfg.target_ratio
        if rest > 0 and not others:
            _fail("target_ratio", cfg.target_ratio, f"{rest:.3g} left for other roles but there are none")
        spec.update({r: rest * n / sum(others.values()) for r, n in others.items()})
    out: dict[str, float] = {}
    via: dict[str, str] = {}
    for key, w in spec.items():
        members = [key] if key in tokens else [m for m in tokens if role_of[m] == key]
        if not members:
            _fail(f"weights.{key}", w, f"not a source ({sorted(tokens)}) or role ({roles}) in the manifest")
        total = sum(tokens[m] for m in members)
        for m in members:
            if m in via:
                _fail(f"weights.{key}", w, f"source {m} is already weighted through {via[m]!r}")
            via[m] = key
            out[m] = float(w) * tokens[m] / total if total else 0.0
    norm = sum(out.values())
    return {s: w / norm for s, w in sorted(out.items()) if w > 0}


class MixtureSampler:
    """Fixed-length packed sequences mixed from the shards' sources, following the curriculum.

    ``shard_dir`` holds the data stage's ``manifest.json`` and shards (``<run_dir>/data/shards``).
    ``global_batch_size`` is needed only when the curriculum is given in steps.
    """

    def __init__(
        self,
        shard_dir: str | Path,
        mixture: MixtureConfig,
        curriculum: CurriculumConfig,
        seed: int,
        *,
        global_batch_size: int | None = None,
    ) -> None:
        self.dir = Path(shard_dir)
        self.cfg, self.seed, self.seq_len = mixture, int(seed), mixture.seq_len
        manifest = load_manifest(self.dir)
        shards = manifest["shards"]
        buckets = sorted({int(s["bucket"]) for s in shards})
        tps = global_batch_size * self.seq_len if global_batch_size else None
        self.curriculum = Curriculum(curriculum, buckets[-1] + 1, tokens_per_step=tps, seed=self.seed)
        if self.curriculum.unit == "steps" and tps is None:
            raise MoEAdaptConfigError("curriculum.phase_steps needs the sampler's global_batch_size")
        self._unit_tokens: int = 1 if tps is None or self.curriculum.unit == "tokens" else tps
        weights = resolve_weights(shards, mixture)
        self.sources: list[str] = list(weights)
        self.weights_N = np.array([weights[s] for s in self.sources])
        role_of = {s["source"]: s.get("role", "other") for s in shards}
        opened: dict[str, ShardArrays] = {}
        # pools[n][p]: the pool source n reads in phase p (replay sources: the same pool in every phase)
        self.pools: list[list[DocPool]] = []
        self._replay: list[bool] = []
        for name in self.sources:
            replay = name in mixture.replay or role_of[name] in mixture.replay
            self._replay.append(replay)
            groups = [None] if replay else self.curriculum.groups
            per_group: list[DocPool] = []
            for p, group in enumerate(groups):
                members = [
                    s for s in shards if s["source"] == name and (group is None or int(s["bucket"]) in group)
                ]
                members = [s for s in members if int(s["documents"]) > 0 and int(s["tokens"]) > 0]
                if not members:
                    raise MoEAdaptError(
                        f"phase {p} (buckets {list(group or [])}) has no data for source {name} "
                        f"(role {role_of[name]}); give it a weight of 0, list it in mixture.replay, "
                        "or use fewer curriculum phases"
                    )
                arrays = []
                for s in members:
                    if s["prefix"] not in opened:
                        opened[s["prefix"]] = ShardArrays.open(self.dir, s["prefix"])
                    arrays.append(opened[s["prefix"]])
                label = "all" if group is None else "-".join(map(str, group))
                per_group.append(DocPool(f"{name}/b{label}", arrays, self.seed))
            self.pools.append(per_group * (self.curriculum.num_phases if replay else 1))
        self._fingerprint = self._make_fingerprint(manifest, curriculum)
        self.sequences = 0  # sequences emitted so far
        self.shift = 0  # curriculum tokens skipped by phases that ended early (stop_phase)
        self.counts_N = np.zeros(len(self.sources), dtype=np.int64)
        self.credits = [0] * len(self.sources)
        self.phase = 0
        self._warned: set[str] = set()

    def _make_fingerprint(self, manifest: dict[str, Any], curriculum: CurriculumConfig) -> str:
        blob = json.dumps(
            [asdict(self.cfg), asdict(curriculum), self.seed, self._unit_tokens,
             [(s["prefix"], s["tokens"]) for s in manifest["shards"]]],
            sort_keys=True,
        )  # fmt: skip
        return f"{zlib.crc32(blob.encode()):08x}"

    @property
    def position(self) -> int:
        """Curriculum position in tokens of the next sequence (phases cut short by stop_phase included)."""
        return self.sequences * self.seq_len + self.shift

    def _phase_of(self, tokens: int) -> int:
        return self.curriculum.locate(tokens / self._unit_tokens).phase

    def next_batch(self, batch_size: int) -> Batch:
        """The next ``batch_size`` sequences."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        tokens_BS1 = np.empty((batch_size, self.seq_len + 1), dtype=np.int64)
        source_ids_B = np.empty(batch_size, dtype=np.int64)
        phases_B = np.empty(batch_size, dtype=np.int64)
        filled = 0
        while filled < batch_size:
            filled += self._segment(tokens_BS1, source_ids_B, phases_B, filled, batch_size - filled)
        return Batch(tokens_BS1, source_ids_B, phases_B, self.sources)

    def _enter_phase(self, phase: int) -> None:
        if phase != self.phase:
            self.phase, self.credits = phase, [0] * len(self.sources)
            log.info(
                "curriculum: phase %d (buckets %s) starts at sequence %d",
                phase, list(self.curriculum.groups[phase]), self.sequences,
            )  # fmt: skip

    def _segment(self, out_BS1: np.ndarray, src_B: np.ndarray, ph_B: np.ndarray, row: int, want: int) -> int:
        """Fill up to ``want`` rows from ``row`` on, within one phase; returns the rows filled."""
        S, unit = self.seq_len, self._unit_tokens
        pos = self.position
        phase = self._phase_of(pos)
        self._enter_phase(phase)
        end = self.curriculum.phase_end(phase) * unit
        length = want if math.isinf(end) else min(want, max(1, -(-(round(end) - pos) // S)))
        window = self.curriculum.blend_window(phase)
        last = phase + 1 >= self.curriculum.num_phases
        while True:
            picks = webster_picks(self.counts_N, self.weights_N, length)
            plan: list[tuple[int, int, np.ndarray]] = []  # (source, phase of its pool, rows)
            credits = list(self.credits)
            for n in np.unique(picks).tolist():
                rows = np.flatnonzero(picks == n)
                if window is None or self._replay[n]:
                    plan.append((n, phase, rows))
                    continue
                w0, wl = round(window[0] * unit), max(1, round(window[1] * unit))
                shares = np.clip(pos + rows * S - w0, 0, wl)
                nxt, credits[n] = diffuse_picks(self.credits[n] + wl // 2, shares, wl)
                credits[n] -= wl // 2
                plan += [(n, p, r) for p, r in ((phase, rows[~nxt]), (phase + 1, rows[nxt])) if r.size]
            if self.cfg.exhaustion != "stop_phase":
                break
            cut = length
            for n, p, rows in plan:
                left = self.pools[n][p].windows_left(S)
                if rows.size > left:
                    cut = min(cut, int(rows[left]))
            if cut == length:
                break
            if cut > 0:
                length = cut
                continue
            exhausted = [
                self.pools[n][p].name for n, p, rows in plan if rows.size > self.pools[n][p].windows_left(S)
            ]
            if last:
                raise DataExhaustedError(
                    f"mixture: the last phase ({phase}) ran out of data in {', '.join(exhausted)} "
                    f"after {self.sequences} sequences (mixture.exhaustion=stop_phase)"
                )
            new_shift = math.ceil(end) - self.sequences * S
            log.warning(
                "mixture: %s exhausted; phase %d ends early at sequence %d (mixture.exhaustion=stop_phase)",
                ", ".join(exhausted), phase, self.sequences,
            )  # fmt: skip
            self.shift = new_shift
            return 0
        for n, p, rows in plan:
            pool = self.pools[n][p]
            max_epochs = self.cfg.max_epochs if self.cfg.exhaustion == "repeat" else None
            try:
                windows, entered = pool.take(rows.size, S, max_epochs)
            except EpochLimit as err:
                raise MoEAdaptError(
                    f"mixture: source {self.sources[n]} ({err.pool}) would start epoch {err.epoch + 1} "
                    f"but mixture.max_epochs={self.cfg.max_epochs}; add data, lower its weight or "
                    "raise max_epochs"
                ) from None
            if entered and self.sources[n] not in self._warned:
                self._warned.add(self.sources[n])
                log.warning(
                    "mixture: source %s (%s) ran out of data after %d tokens; repeating (epoch %d of %d)",
                    self.sources[n], pool.name, pool.total, entered[-1] + 1, self.cfg.max_epochs,
                )  # fmt: skip
            r0, r1 = int(rows[0]), int(rows[-1]) + 1
            if r1 - r0 == rows.size:  # consecutive rows: a slice copies faster than an index
                out_BS1[row + r0 : row + r1] = windows
            else:
                out_BS1[row + rows] = windows
        src_B[row : row + length] = picks
        ph_B[row : row + length] = phase
        self.counts_N += np.bincount(picks, minlength=len(self.sources))
        self.credits = credits
        self.sequences += length
        return length

    def state_dict(self) -> dict[str, Any]:
        """Small JSON-serialisable state; :meth:`load_state_dict` continues the exact same stream."""
        return {
            "version": STATE_VERSION,
            "fingerprint": self._fingerprint,
            "sequences": self.sequences,
            "shift": self.shift,
            "phase": self.phase,
            "counts": self.counts_N.tolist(),
            "credits": list(self.credits),
            "pools": {pool.name: [pool.epoch, pool.offset] for pools in self.pools for pool in pools},
            "warned": sorted(self._warned),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; the config, seed and manifest must be the ones it was made with."""
        if state.get("version") != STATE_VERSION or state.get("fingerprint") != self._fingerprint:
            raise MoEAdaptError(
                "sampler state does not match this sampler: it was saved with a different mixture, "
                "curriculum, seed or manifest (resume with the original config, or start the data order anew)"
            )
        self.sequences, self.shift, self.phase = (
            int(state["sequences"]),
            int(state["shift"]),
            int(state["phase"]),
        )
        self.counts_N = np.asarray(state["counts"], dtype=np.int64)
        self.credits = [int(c) for c in state["credits"]]
        for pools in self.pools:
            for pool in pools:
                pool.epoch, pool.offset = (int(v) for v in state["pools"][pool.name])
        self._warned = set(state["warned"])
