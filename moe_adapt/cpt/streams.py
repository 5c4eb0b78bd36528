"""Building blocks of the mixture sampler: document pools read from memmapped shards, and schedulers.

A :class:`DocPool` is the documents of one or more shards drawn as one stream: each epoch is a seeded
permutation of the documents, epochs follow each other, and the stream is cut into windows of
``seq_len + 1`` tokens that start ``seq_len`` tokens apart (one token of overlap, as in Megatron's
``GPTDataset``), across document boundaries. The ``.bin`` files are read with ``numpy.memmap`` at the
document offsets from megatron-core's index. A pool copies the stream out of the memmaps in spans of
up to :data:`READ_AHEAD_TOKENS` (as far ahead as its caller says it will read), and hands out windows
as views into that copy: what it returns depends only on the position, never on how reads were cut.

Shape legend: ``B`` sequences in a batch, ``K`` windows read from one pool, ``S`` seq_len, ``N`` sources.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from moe_adapt.data.shards import open_shard

READ_AHEAD_TOKENS = 1 << 16
"""Most tokens a :class:`DocPool` copies out of its memmaps ahead of the windows asked for (128 KiB of
uint16): fewer, larger copies, without holding more than this per pool."""


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
    _src: list[Any] = field(init=False)
    """Per shard what ``_read`` slices: a ``memoryview`` of the tokens (fast path) or the ndarray."""
    _dtype: np.dtype | None = field(init=False)
    """The shards' token dtype when ``_src`` are memoryviews (all shards alike), else None."""
    _cache: dict[int, _Epoch] = field(init=False, default_factory=dict)
    _buf: Any = field(init=False, default=b"")
    """The stream's tokens ``[_lo, _hi)`` (positions across epochs: ``epoch * total + offset``), copied
    out of the memmaps: ``bytes`` on the fast path, else a contiguous ndarray."""
    _lo: int = field(init=False, default=0)
    _hi: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.shard_of = np.concatenate(
            [np.full(s.lengths.size, i, dtype=np.int32) for i, s in enumerate(self.shards)]
        )
        self.starts = np.concatenate([s.starts for s in self.shards])
        self.lengths = np.concatenate([s.lengths for s in self.shards])
        self.total = int(self.lengths.sum())
        dtypes = {s.tokens.dtype for s in self.shards}
        flat = all(s.tokens.ndim == 1 and s.tokens.flags.c_contiguous for s in self.shards)
        self._dtype = dtypes.pop() if len(dtypes) == 1 and flat else None
        if self._dtype is not None and self._dtype.isnative:
            # memoryview slices are cheaper to make than ndarray slices, and bytes.join copies them
            # several times faster than np.concatenate (the per-piece overhead dominates)
            self._src = [memoryview(s.tokens) for s in self.shards]  # type: ignore[arg-type]
        else:
            self._dtype = None
            self._src = [s.tokens for s in self.shards]

    def _epoch(self, epoch: int) -> _Epoch:
        """The documents of ``epoch`` in permuted order; the last two epochs are cached."""
        cached = self._cache.get(epoch)
        if cached is None:
            rng = np.random.default_rng([self.seed, zlib.crc32(self.name.encode()), epoch])
            perm = rng.permutation(self.lengths.size)
            self._cache = {e: v for e, v in self._cache.items() if e == epoch - 1}
            lengths = self.lengths[perm]
            starts = self.starts[perm]
            shard = self.shard_of[perm] if len(self.shards) > 1 else None
            cached = self._cache[epoch] = _Epoch(np.cumsum(lengths), starts, starts + lengths, shard)
        return cached

    def windows_left(self, seq_len: int) -> int:
        """Windows of ``seq_len + 1`` tokens that still fit in the current epoch."""
        return max(0, (self.total - self.offset - 1) // seq_len)

    def _read(self, epoch: int, lo: int, hi: int, out: list[Any]) -> None:
        """Append the tokens ``[lo, hi)`` of ``epoch``'s permuted concatenation to ``out``.

        The pieces are slices of ``_src``: memoryviews (fast path) or ndarrays.
        """
        ep = self._epoch(epoch)
        ends = ep.ends
        d0, d1 = ends.searchsorted((lo, hi - 1), side="right").tolist()  # first and last document
        a = ep.starts[d0 : d1 + 1].tolist()
        b = ep.stops[d0 : d1 + 1].tolist()
        # only the first document can start before lo and only the last can end after hi
        a[0] = b[0] - (int(ends[d0]) - lo)
        b[-1] -= int(ends[d1]) - hi
        if ep.shard is None:
            mm = self._src[0]
            out.extend([mm[x:y] for x, y in zip(a, b, strict=True)])
        else:
            mms = self._src
            sh = ep.shard[d0 : d1 + 1].tolist()
            out.extend([mms[s][x:y] for s, x, y in zip(sh, a, b, strict=True)])

    def _fill(self, lo: int, hi: int) -> None:
        """Make ``_buf`` the stream's tokens ``[lo, hi)`` (positions across epochs), copied out of the
        memmaps; what the current buffer already holds from ``lo`` on is kept, not read again."""
        parts: list[Any] = []
        at = lo
        if self._lo <= lo < self._hi:
            i = lo - self._lo
            kept = self._buf[i:] if self._dtype is None else memoryview(self._buf)[i * self._dtype.itemsize :]
            parts.append(kept)
            at = self._hi
        total = self.total
        epoch, off = divmod(at, total)
        while at < hi:
            stop = min(hi, (epoch + 1) * total)
            self._read(epoch, off, stop - epoch * total, parts)
            at, epoch, off = stop, epoch + 1, 0
        self._buf = b"".join(parts) if self._dtype is not None else np.concatenate(parts)
        self._lo, self._hi = lo, hi

    def take(
        self, k: int, seq_len: int, max_epochs: int | None, ahead: int = 0
    ) -> tuple[np.ndarray, list[int]]:
        """Read the next ``k`` windows as ``windows_KS1`` ``[k, seq_len + 1]`` and advance.

        Returns the windows (a strided read-only view, windows overlap by one token) and the epochs
        newly entered. Raises ``EpochLimit`` when the read would go past ``max_epochs`` epochs (nothing
        is advanced then). ``ahead``: how many more windows the caller will take next (a hint: they are
        copied out of the memmaps now, together with these, up to :data:`READ_AHEAD_TOKENS`).
        """
        total, epoch = self.total, self.epoch
        lo = epoch * total + self.offset
        hi = lo + k * seq_len + 1  # the stream's tokens [lo, hi) are read
        entered: list[int] = []
        if hi > (epoch + 1) * total:
            last = (hi - 1) // total  # epoch of the last token read
            if max_epochs is not None and last >= max_epochs:
                raise EpochLimit(self.name, max(epoch + 1, max_epochs))
            entered = list(range(epoch + 1, last + 1))
        if lo < self._lo or hi > self._hi:
            end = max(hi, min(hi + ahead * seq_len, lo + READ_AHEAD_TOKENS))
            if max_epochs is not None:
                end = max(hi, min(end, max_epochs * total))
            self._fill(lo, end)
        buf = self._buf
        dtype = self._dtype if self._dtype is not None else buf.dtype
        step = dtype.itemsize  # buf is contiguous; a bare ndarray is ~8x cheaper than as_strided
        windows_KS1 = np.ndarray((k, seq_len + 1), dtype, buf, (lo - self._lo) * step, (seq_len * step, step))
        self.epoch, self.offset = divmod(lo + k * seq_len, total)
        return windows_KS1, entered


class _Epoch(NamedTuple):
    """One epoch's documents in permuted order: cumulative end offsets, element ranges, shard (or None)."""

    ends: np.ndarray
    starts: np.ndarray
    stops: np.ndarray
    shard: np.ndarray | None


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
