"""Building blocks of the mixture sampler: document pools read from memmapped shards, and schedulers.

A :class:`DocPool` is the documents of one or more shards drawn as one stream: each epoch is a seeded
permutation of the documents, epochs follow each other, and the stream is cut into windows of
``seq_len + 1`` tokens that start ``seq_len`` tokens apart (one token of overlap, as in Megatron's
``GPTDataset``), across document boundaries. The ``.bin`` files are read with ``numpy.memmap`` at the
document offsets from megatron-core's index.

Shape legend: ``B`` sequences in a batch, ``K`` windows read from one pool, ``S`` seq_len, ``N`` sources.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from moe_adapt.data.shards import open_shard


@dataclass
class ShardArrays:
    """One shard as a token memmap plus each document's element offset and length."""

    tokens: np.ndarray
    """The ``.bin`` file memory-mapped, as a plain ndarray view (slicing a ``np.memmap`` costs ~4x more)."""
    starts: np.ndarray
    lengths: np.ndarray

    @classmethod
    def open(cls, shard_dir: Path, prefix: str) -> ShardArrays:
        """Open ``shard_dir/prefix.{bin,idx}``; documents made of several sequences are joined."""
        ds = open_shard(shard_dir, prefix)
        index = ds.index
        itemsize = np.dtype(index.dtype).itemsize
        doc_idx = np.asarray(ds.document_indices, dtype=np.int64)
        seq_len = np.asarray(index.sequence_lengths, dtype=np.int64)
        seq_ptr = np.asarray(index.sequence_pointers, dtype=np.int64) // itemsize
        first = doc_idx[:-1]
        nonempty = doc_idx[1:] > first
        first = first[nonempty]
        lengths = np.add.reduceat(seq_len, first) if seq_len.size else np.zeros(0, np.int64)
        mm = np.memmap(str(shard_dir / f"{prefix}.bin"), dtype=index.dtype, mode="r")
        return cls(mm.view(np.ndarray), seq_ptr[first], lengths)


@dataclass
class DocPool:
    """Documents of several shards drawn as one shuffled, repeating stream of tokens."""

    name: str
    """Stable name (source and buckets); seeds the permutation and keys the state."""
    shards: list[ShardArrays]
    seed: int
    epoch: int = 0
    """Current epoch (0-based)."""
    offset: int = 0
    """Token offset of the next window inside the current epoch's permuted concatenation."""
    shard_of: np.ndarray = field(init=False)
    starts: np.ndarray = field(init=False)
    lengths: np.ndarray = field(init=False)
    total: int = field(init=False)
    _cache: dict[int, tuple[np.ndarray, np.ndarray]] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self.shard_of = np.concatenate(
            [np.full(s.lengths.size, i, dtype=np.int32) for i, s in enumerate(self.shards)]
        )
        self.starts = np.concatenate([s.starts for s in self.shards])
        self.lengths = np.concatenate([s.lengths for s in self.shards])
        self.total = int(self.lengths.sum())

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(permutation, cumulative end offsets) of ``epoch``; the last two epochs are cached."""
        if epoch not in self._cache:
            rng = np.random.default_rng([self.seed, zlib.crc32(self.name.encode()), epoch])
            perm = rng.permutation(self.lengths.size)
            self._cache = {e: v for e, v in self._cache.items() if e == epoch - 1}
            self._cache[epoch] = (perm, np.cumsum(self.lengths[perm]))
        return self._cache[epoch]

    def windows_left(self, seq_len: int) -> int:
        """Windows of ``seq_len + 1`` tokens that still fit in the current epoch."""
        return max(0, (self.total - self.offset - 1) // seq_len)

    def _read(self, epoch: int, lo: int, hi: int, out: list[np.ndarray]) -> None:
        """Append the tokens ``[lo, hi)`` of ``epoch``'s permuted concatenation to ``out`` (slices)."""
        perm, ends = self._epoch(epoch)
        d0 = int(np.searchsorted(ends, lo, side="right"))
        d1 = int(np.searchsorted(ends, hi - 1, side="right")) + 1
        docs = perm[d0:d1]
        doc_begin = ends[d0:d1] - self.lengths[docs]
        a = np.maximum(lo - doc_begin, 0) + self.starts[docs]
        b = np.minimum(hi - doc_begin, self.lengths[docs]) + self.starts[docs]
        if len(self.shards) == 1:
            mm = self.shards[0].tokens
            out.extend([mm[x:y] for x, y in zip(a.tolist(), b.tolist(), strict=True)])
        else:
            mms = [s.tokens for s in self.shards]
            sh = self.shard_of[docs].tolist()
            out.extend([mms[s][x:y] for s, x, y in zip(sh, a.tolist(), b.tolist(), strict=True)])

    def take(self, k: int, seq_len: int, max_epochs: int | None) -> tuple[np.ndarray, list[int]]:
        """Read the next ``k`` windows as ``windows_KS1`` ``[k, seq_len + 1]`` and advance.

        Returns the windows and the epochs newly entered. Raises ``EpochLimit`` when the read would
        go past ``max_epochs`` epochs (nothing is advanced then).
        """
        need = k * seq_len + 1
        parts: list[np.ndarray] = []
        epoch, lo, entered = self.epoch, self.offset, []
        while need > 0:
            if lo >= self.total:
                epoch, lo = epoch + 1, 0
                entered.append(epoch)
                if max_epochs is not None and epoch >= max_epochs:
                    raise EpochLimit(self.name, epoch)
            hi = min(self.total, lo + need)
            self._read(epoch, lo, hi, parts)
            need -= hi - lo
            lo = hi
        buf = parts[0] if len(parts) == 1 else np.concatenate(parts)
        windows_KS1 = np.lib.stride_tricks.sliding_window_view(buf, seq_len + 1)[::seq_len]
        self.offset += k * seq_len
        while self.offset >= self.total:
            self.offset -= self.total
            self.epoch += 1
        return windows_KS1, entered


class EpochLimit(Exception):
    """Internal: a pool would start epoch ``epoch`` beyond the allowed number of epochs."""

    def __init__(self, pool: str, epoch: int) -> None:
        super().__init__(pool, epoch)
        self.pool = pool
        self.epoch = epoch


def webster_picks(counts_N: np.ndarray, weights_N: np.ndarray, length: int) -> np.ndarray:
    """The next ``length`` picks of the deterministic divisor (Webster/Sainte-Lague) scheduler.

    Source ``n``'s ``j``-th pick is due at virtual time ``(j + 0.5) / w_n``; picks go in order of due
    time (ties: lower source index first). After ``m`` picks every source's count is within about one
    sequence of ``w_n * m``, so any window of picks holds each source's share up to ~2 sequences.
    ``counts_N`` are the picks made so far; returns ``picks_B`` (source indices, prefix-consistent:
    the first ``l`` of ``length`` picks equal the picks for ``l``).
    """
    j = np.arange(length, dtype=np.float64)
    due_NB = (counts_N[:, None] + j[None, :] + 0.5) / weights_N[:, None]
    order = np.argsort(due_NB.ravel(), kind="stable")[:length]
    return (order // length).astype(np.int64)


def diffuse_picks(credit: int, shares: np.ndarray, scale: int) -> tuple[np.ndarray, int]:
    """Error diffusion in integers: which of a run of draws go to the "next" pool.

    ``shares`` are the next pool's shares in units of ``1/scale`` (0..scale) for each draw in order;
    a draw goes to the next pool when the running sum (started at ``credit``, which a phase starts
    at ``scale // 2``) crosses a multiple of ``scale``. Returns (mask, new credit); prefix-consistent.
    """
    cum = credit + np.cumsum(shares, dtype=np.int64)
    mask = cum // scale > (cum - shares) // scale
    return mask, int(cum[-1]) if cum.size else credit
