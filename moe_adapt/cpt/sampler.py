"""The mixture sampler: packed training sequences from the data stage's shards, by source weight and phase.

Every sequence comes from one source. Which source is a deterministic divisor scheduler over the
sources' token shares (:func:`~moe_adapt.cpt.streams.webster_picks`), not random draws, so the
realised share of every source stays within ~2 sequences of its weight over any window. Within a
source, the curriculum decides which difficulty buckets are read: each (source, phase) is one pool of
documents, permuted per epoch from the seed, packed into windows of ``seq_len + 1`` tokens across
document boundaries. Sources named in ``replay`` ignore the curriculum and read all their buckets in
every phase. With linear pacing, the next phase's pool is blended in by integer error diffusion.
With ``mixture.phase_weights`` (a source-staged curriculum) each phase has its own source weights: the
divisor scheduler restarts its counts at each phase boundary, so every phase holds its own shares
exactly, and a source with no weight in a phase is not read in it.

The stream is a pure function of (seed, config, manifest, position): it does not depend on how it is
cut into batches, and :meth:`MixtureSampler.state_dict` (small, JSON) resumes it exactly. Both
schedulers are prefix-consistent, so the sampler schedules up to :data:`PLAN_ROWS` rows at once (a
plan, never across a phase boundary) and a batch only copies the planned windows: the same stream as
scheduling every batch on its own, at a fraction of the cost.

Shape legend: ``B`` sequences in a batch, ``S1`` seq_len + 1 tokens, ``N`` sources, ``R`` rows of a
plan, ``K`` rows of a plan that one pool serves.
"""

from __future__ import annotations

import json
import logging
import math
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np

from moe_adapt.cpt.config import CurriculumConfig, MixtureConfig
from moe_adapt.cpt.curriculum import Curriculum
from moe_adapt.cpt.streams import DocPool, EpochLimit, ShardArrays, diffuse_picks, webster_picks
from moe_adapt.errors import MoEAdaptConfigError, MoEAdaptError, invalid

log = logging.getLogger(__name__)

STATE_VERSION = 1
PLAN_ROWS = 4096
"""Most rows scheduled at once: which source and pool serves each row is computed for up to this many
rows ahead (within one phase), so that a batch only copies tokens."""


def _fail(key: str, value: object, allowed: str) -> NoReturn:
    invalid(f"mixture.{key}", value, allowed)


class DataExhaustedError(MoEAdaptError):
    """The last phase ran out of data under ``mixture.exhaustion=stop_phase``."""


@dataclass
class MixtureBatch:
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

    def metrics(self) -> dict[str, float]:
        """What the trainer logs about the stream with each step: ``phase`` (the curriculum phase of
        the batch's sequences, their mean where a batch crosses into the next phase) and
        ``data/<source>`` (each source's share of the batch's sequences)."""
        shares = np.bincount(self.source_ids, minlength=len(self.names)) / self.source_ids.size
        out = {"phase": float(self.phases.mean())}
        out.update({f"data/{name}": float(x) for name, x in zip(self.names, shares.tolist(), strict=True)})
        return out


@dataclass
class _Take:
    """The rows of a plan that one pool serves."""

    source: int
    pool: DocPool
    rows: np.ndarray
    """``rows_K``: plan rows (0 = the plan's first sequence), ascending."""
    upto: np.ndarray | None
    """``upto_R1[r]``: how many of ``rows`` are ``< r`` (None when the pool serves every row)."""
    done: int = 0
    """How many of ``rows`` have been taken."""


def _upto(rows: np.ndarray, length: int, takes: int) -> np.ndarray | None:
    """``upto_R1`` of a :class:`_Take` with ``rows`` out of a plan of ``length`` rows and ``takes`` takes."""
    if takes == 1:
        return None
    upto = np.zeros(length + 1, dtype=np.int64)
    upto[rows + 1] = 1
    return np.cumsum(upto, out=upto)


@dataclass
class _Plan:
    """Rows ``[start, stop)`` of the stream, scheduled: one phase, each row's source and pool."""

    start: int
    stop: int
    phase: int
    picks: np.ndarray
    """``picks_R``: source of each row."""
    takes: list[_Take]
    counts_N: np.ndarray
    """Sequences per source before ``start``."""
    credits: list[int]
    """Blend credits per source at ``start``."""
    shares: dict[int, tuple[np.ndarray, np.ndarray]]
    """Per source in the blend: its rows and their next-pool shares (what its credit grows by)."""


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


def resolve_weights(
    shards: list[dict[str, Any]], cfg: MixtureConfig, phase: int | None = None
) -> dict[str, float]:
    """Normalised token share per source name (sources with weight 0 left out); with ``phase``, the
    shares of that entry of ``cfg.phase_weights``."""
    role_of: dict[str, str] = {}
    tokens: dict[str, int] = {}
    for s in shards:
        role_of[s["source"]] = s.get("role", "other")
        tokens[s["source"]] = tokens.get(s["source"], 0) + int(s["tokens"])
    roles = sorted(set(role_of.values()))
    key_prefix = "weights"
    if phase is not None:
        assert cfg.phase_weights is not None
        spec = dict(cfg.phase_weights[phase])
        key_prefix = f"phase_weights[{phase}]"
    else:
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
            _fail(
                f"{key_prefix}.{key}", w, f"not a source ({sorted(tokens)}) or role ({roles}) in the manifest"
            )
        total = sum(tokens[m] for m in members)
        for m in members:
            if m in via:
                _fail(f"{key_prefix}.{key}", w, f"source {m} is already weighted through {via[m]!r}")
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
        log.info("curriculum: %s", self.curriculum.describe())
        phases = self.curriculum.num_phases
        self.staged = mixture.phase_weights is not None
        if self.staged:
            if len(mixture.phase_weights or []) != phases:
                _fail(
                    "phase_weights",
                    [dict(p) for p in mixture.phase_weights or []],
                    f"give one entry per curriculum phase ({phases})",
                )
            per_phase = [resolve_weights(shards, mixture, p) for p in range(phases)]
        else:
            per_phase = [resolve_weights(shards, mixture)] * phases
        self.sources: list[str] = sorted({s for w in per_phase for s in w})
        # weights_PN[p, n]: source n's share in phase p (0: not read in that phase)
        self.weights_PN = np.array([[w.get(s, 0.0) for s in self.sources] for w in per_phase])
        role_of = {s["source"]: s.get("role", "other") for s in shards}
        opened: dict[str, ShardArrays] = {}
        # pools[n][p]: the pool source n reads in phase p (replay sources: the same pool in every phase)
        self.pools: list[list[DocPool | None]] = []
        self._replay: list[bool] = []
        for n, name in enumerate(self.sources):
            replay = name in mixture.replay or role_of[name] in mixture.replay
            self._replay.append(replay)
            # one pool per distinct bucket group (phases reading the same buckets share it); None in a
            # phase where the source has no weight
            by_group: dict[tuple[int, ...] | None, DocPool] = {}
            per_phase_pools: list[DocPool | None] = []
            for p in range(phases):
                group = None if replay else self.curriculum.groups[p]
                if self.weights_PN[p, n] <= 0:
                    per_phase_pools.append(None)
                    continue
                if group in by_group:
                    per_phase_pools.append(by_group[group])
                    continue
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
                by_group[group] = DocPool(f"{name}/b{label}", arrays, self.seed)
                per_phase_pools.append(by_group[group])
            self.pools.append(per_phase_pools)
        if self.staged:
            self._log_weights(0)
        self._fingerprint = self._make_fingerprint(manifest, curriculum)
        self.sequences = 0  # sequences emitted so far
        self.shift = 0  # curriculum tokens skipped by phases that ended early (stop_phase)
        # sequences per source and blend credits, as of the current plan's start (see _settle)
        self.counts_N = np.zeros(len(self.sources), dtype=np.int64)
        self.credits = [0] * len(self.sources)
        self.phase = 0
        self._warned: set[str] = set()
        self._plan: _Plan | None = None

    def _make_fingerprint(self, manifest: dict[str, Any], curriculum: CurriculumConfig) -> str:
        mixture, phases = asdict(self.cfg), asdict(curriculum)
        # settings added later leave the fingerprint of a run that does not use them as it was, so a
        # checkpoint made before they existed still resumes
        if mixture["phase_weights"] is None:
            del mixture["phase_weights"]
        if phases["buckets"] == "by_phase":
            del phases["buckets"]
        blob = json.dumps(
            [mixture, phases, self.seed, self._unit_tokens,
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

    def next_batch(self, batch_size: int) -> MixtureBatch:
        """The next ``batch_size`` sequences."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        tokens_BS1 = np.empty((batch_size, self.seq_len + 1), dtype=np.int64)
        segments: list[tuple[np.ndarray, int]] = []  # (sources, phase) of each run of rows
        filled = 0
        while filled < batch_size:
            filled += self._segment(tokens_BS1, filled, batch_size - filled, segments)
        if len(segments) == 1:
            source_ids_B = segments[0][0].copy()
            phases_B = np.empty(batch_size, dtype=np.int64)
            phases_B.fill(segments[0][1])
        else:
            source_ids_B = np.concatenate([src for src, _ in segments])
            phases_B = np.repeat(
                np.array([ph for _, ph in segments], dtype=np.int64), [s.size for s, _ in segments]
            )
        return MixtureBatch(tokens_BS1, source_ids_B, phases_B, self.sources)

    def _log_weights(self, phase: int) -> None:
        weights_N = self.weights_PN[phase]
        shares = {s: round(float(w), 4) for s, w in zip(self.sources, weights_N, strict=True) if w > 0}
        log.info("mixture: phase %d source weights %s", phase, shares)

    def _pool(self, source: int, phase: int) -> DocPool:
        """The pool ``source`` reads in ``phase`` (one it has weight in)."""
        pool = self.pools[source][phase]
        assert pool is not None, (self.sources[source], phase)
        return pool

    def _enter_phase(self, phase: int) -> None:
        if phase != self.phase:
            self.phase, self.credits = phase, [0] * len(self.sources)
            if self.staged:  # the new phase's shares hold from its first sequence
                self.counts_N = np.zeros(len(self.sources), dtype=np.int64)
                self._log_weights(phase)
            log.info(
                "curriculum: phase %d (buckets %s) starts at sequence %d",
                phase, list(self.curriculum.groups[phase]), self.sequences,
            )  # fmt: skip

    def _settle(self) -> None:
        """Fold the rows taken from the current plan into ``counts_N`` and ``credits``; drop the plan."""
        plan = self._plan
        if plan is None:
            return
        done = self.sequences - plan.start
        self.counts_N = plan.counts_N + np.bincount(plan.picks[:done], minlength=len(self.sources))
        self.credits = list(plan.credits)
        for n, (rows, shares) in plan.shares.items():
            self.credits[n] += int(shares[: int(rows.searchsorted(done))].sum())
        self._plan = None

    def _make_plan(self, want: int) -> _Plan | None:
        """Schedule the rows from ``sequences`` on: ``max(PLAN_ROWS, want)`` rows, within one phase.

        Returns None when the phase ended early (stop_phase): the position moved to the next phase.
        Which pool serves a row does not depend on how the rows are cut into plans or batches
        (:func:`webster_picks` and :func:`diffuse_picks` are prefix-consistent), so a plan computes
        exactly what the batches it serves would have computed one by one.
        """
        self._settle()
        S, unit = self.seq_len, self._unit_tokens
        pos = self.position
        phase = self._phase_of(pos)
        self._enter_phase(phase)
        end = self.curriculum.phase_end(phase) * unit
        length = max(PLAN_ROWS, want)
        if not math.isinf(end):  # up to the row that starts the next phase
            length = min(length, max(1, -(-(round(end) - pos) // S)))
        window = self.curriculum.blend_window(phase)
        w0 = wl = 0
        if window is not None:
            w0, wl = round(window[0] * unit), max(1, round(window[1] * unit))
            if pos + (length - 1) * S <= w0:
                window = None  # the plan ends before the blend: every next-pool share is 0
        weights_N = self.weights_PN[phase]
        active = np.flatnonzero(weights_N > 0)  # sources read in this phase
        picks = active[webster_picks(self.counts_N[active], weights_N[active], length)]
        pools: list[tuple[int, int, np.ndarray]] = []  # (source, phase of its pool, rows)
        shares: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for n in np.flatnonzero(np.bincount(picks, minlength=len(self.sources))).tolist():
            rows = np.flatnonzero(picks == n)
            if window is None or self._replay[n] or self.pools[n][phase + 1] is None:
                pools.append((n, phase, rows))
                continue
            shares_n = np.minimum(np.maximum(rows * S + (pos - w0), 0), wl)  # the next pool's share
            nxt, _ = diffuse_picks(self.credits[n] + wl // 2, shares_n, wl)
            shares[n] = (rows, shares_n)
            pools += [(n, p, r) for p, r in ((phase, rows[~nxt]), (phase + 1, rows[nxt])) if r.size]
        if self.cfg.exhaustion == "stop_phase":
            cut = length
            for n, p, rows in pools:
                left = self._pool(n, p).windows_left(S)
                if rows.size > left:
                    cut = min(cut, int(rows[left]))
            if cut == 0:
                self._end_phase_early(phase, end, pools, min(want, length))  # as the batch would see
                return None
            if cut < length:  # the plan stops where a pool runs out; the next one ends the phase
                length, picks = cut, picks[:cut]
                pools = [(n, p, rows[: int(rows.searchsorted(cut))]) for n, p, rows in pools]
                pools = [(n, p, rows) for n, p, rows in pools if rows.size]
        takes = [_Take(n, self._pool(n, p), rows, _upto(rows, length, len(pools))) for n, p, rows in pools]
        return _Plan(self.sequences, self.sequences + length, phase, picks, takes,
                     self.counts_N, list(self.credits), shares)  # fmt: skip

    def _end_phase_early(
        self, phase: int, end: float, pools: list[tuple[int, int, np.ndarray]], length: int
    ) -> None:
        """stop_phase: a pool has no window left for the first row; end the phase (or fail in the last)."""
        S = self.seq_len
        exhausted = [
            self._pool(n, p).name
            for n, p, rows in pools
            if int(np.count_nonzero(rows < length)) > self._pool(n, p).windows_left(S)
        ]
        if phase + 1 >= self.curriculum.num_phases:
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

    def _segment(
        self, out_BS1: np.ndarray, row: int, want: int, segments: list[tuple[np.ndarray, int]]
    ) -> int:
        """Fill up to ``want`` rows from ``row`` on from one plan and append their (sources, phase) to
        ``segments``; returns the rows filled."""
        plan = self._plan
        if plan is None or self.sequences >= plan.stop:
            plan = self._plan = self._make_plan(want)
            if plan is None:
                return 0
        S = self.seq_len
        a = self.sequences - plan.start  # plan rows [a, b) go to out rows [row, row + b - a)
        b = min(plan.stop - plan.start, a + want)
        max_epochs = self.cfg.max_epochs if self.cfg.exhaustion == "repeat" else None
        for t in plan.takes:
            i0 = t.done
            k = (b - a) if t.upto is None else int(t.upto[b]) - i0
            if k == 0:
                continue
            pool = t.pool
            try:
                windows, entered = pool.take(k, S, max_epochs, t.rows.size - i0 - k)
            except EpochLimit as err:
                raise MoEAdaptError(
                    f"mixture: source {self.sources[t.source]} ({err.pool}) would start epoch "
                    f"{err.epoch + 1} but mixture.max_epochs={self.cfg.max_epochs}; add data, lower its "
                    "weight or raise max_epochs"
                ) from None
            t.done = i0 + k
            if entered and self.sources[t.source] not in self._warned:
                self._warned.add(self.sources[t.source])
                log.warning(
                    "mixture: source %s (%s) ran out of data after %d tokens; repeating (epoch %d of %d)",
                    self.sources[t.source], pool.name, pool.total, entered[-1] + 1, self.cfg.max_epochs,
                )  # fmt: skip
            if k == b - a:  # all rows from one pool: a slice copies faster than an index
                out_BS1[row : row + k] = windows
            else:
                out_BS1[t.rows[i0 : i0 + k] + (row - a)] = windows
        segments.append((plan.picks[a:b], plan.phase))
        self.sequences += b - a
        return b - a

    def state_dict(self) -> dict[str, Any]:
        """Small JSON-serialisable state; :meth:`load_state_dict` continues the exact same stream."""
        self._settle()
        return {
            "version": STATE_VERSION,
            "fingerprint": self._fingerprint,
            "sequences": self.sequences,
            "shift": self.shift,
            "phase": self.phase,
            "counts": self.counts_N.tolist(),
            "credits": list(self.credits),
            "pools": {
                pool.name: [pool.epoch, pool.offset]
                for pools in self.pools
                for pool in pools
                if pool is not None
            },
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
        self._plan = None
        self.counts_N = np.asarray(state["counts"], dtype=np.int64)
        self.credits = [int(c) for c in state["credits"]]
        for pools in self.pools:
            for pool in filter(None, pools):
                pool.epoch, pool.offset = (int(v) for v in state["pools"][pool.name])
        self._warned = set(state["warned"])
