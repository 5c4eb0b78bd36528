"""Mixture-sampler throughput against reading the same tokens straight from the memmapped shards (not CI).

    python tests/benchmarks/bench_sampler.py [--tokens-per-shard 4000000] [--batches 60] [--repeats 21]

Writes synthetic shards (2 sources x 3 difficulty buckets, uint16, log-normal document lengths with
median ~300 tokens) with megatron-core's IndexedDatasetBuilder in a temporary folder, then times, in
the same process and with warm page cache, ``--repeats`` rounds (the order rotating every round) of:

(a) sampler: ``MixtureSampler.next_batch`` (80/20 target/english, 3-phase easy-to-hard curriculum with
    linear pacing, seq_len 2048, batch 64) from a sampler built before the clock starts: scheduling,
    curriculum, shuffling (each pool's first epoch order is drawn inside the timed region), packing,
    int64 output;
(a') sampler_warm: the same, with every pool's epoch order drawn before the clock starts (a per-epoch
    cost, paid once per pass over a pool; timed on its own as epoch_setup);
(b) baseline: the same batches read with no scheduling, shuffling or bookkeeping, from a plan made
    before the clock starts: per batch a fresh ``[B, seq_len + 1]`` int64 array; per (batch, pool)
    read, the exact document slices of the memmaps, given as int64 (start, stop) arrays as an index
    holds them, turned into memoryview slices, joined with ``bytes.join`` into one buffer, cut into
    the overlapping windows and copied (uint16 -> int64) into the rows where the sampler put them.
    These are the copies any loader of these tokens makes (memmap -> contiguous buffer -> int64
    batch), with the cheapest primitives numpy/CPython offer for many small slices, and its output
    is checked to be identical to the sampler's, batch by batch;
(b') baseline_py: (b) handed ready-made ``(memoryview, start, stop)`` Python tuples instead (the
    strictest baseline: not even the index conversion);
(c) floor: contiguous ``seq_len + 1`` windows sliced straight from one memmap into a fresh array
    per batch (no document boundaries: a lower bound, not a fair comparison).

Both "fresh maps" (every round maps the shards anew, as a newly built sampler does: both sides pay
the first touch of every page, as in a first pass over the data) and "mapped" (the same mappings in
every round: no page faults, as in later passes) are timed. Prints wall and CPU medians, the
sampler's ratio to (b) (target: <= 1.05) as the ratio of medians and as the median of the per-round
ratios, the epoch set-up cost, and the stream's sha256 (with the default sizes, checked against the
stream pinned before the read path was optimised).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from moe_adapt.cpt import CurriculumConfig, MixtureBatch, MixtureConfig, MixtureSampler, streams

PINNED_SHA256 = "1e55c340218369bb"
"""sha256 prefix of the default run's stream (tokens, sources, phases of 60 batches of 64), as produced
by the sampler before its read path was optimised (commit c9b043c)."""
DEFAULTS = {"tokens_per_shard": 4_000_000, "batches": 60, "batch_size": 64, "seq_len": 2048}

Read = tuple[Any, list[str], np.ndarray | None, np.ndarray, np.ndarray]
"""One read of one batch: (rows of the batch it fills: a slice or an int64 index array, the .bin files,
each document slice's file index (None: all in the first), first and end element of each slice)."""


def write_shards(out: Path, tokens_per_shard: int) -> None:
    """Two sources x three buckets of synthetic documents (ids < 32,000, EOD 0) plus manifest.json."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(0)
    entries = []
    for source, lang, role in (("web_ar", "ar", "target"), ("web_en", "en", "english")):
        for bucket in range(3):
            prefix = f"{source}__{lang}__b{bucket}"
            builder = IndexedDatasetBuilder(str(out / f"{prefix}.bin"), dtype=np.uint16)
            lengths = np.clip(rng.lognormal(np.log(300), 0.8, tokens_per_shard // 300), 8, 20_000).astype(int)
            flat = rng.integers(1, 32_000, int(lengths.sum()), dtype=np.uint16)
            flat[np.cumsum(lengths) - 1] = 0
            for doc in np.split(flat, np.cumsum(lengths)[:-1]):
                builder.add_document(doc, [doc.size])
            builder.finalize(str(out / f"{prefix}.idx"))
            entries.append(
                {"prefix": prefix, "source": source, "lang": lang, "bucket": str(bucket), "role": role,
                 "documents": int(lengths.size), "tokens": int(lengths.sum())}
            )  # fmt: skip
    (out / "manifest.json").write_text(json.dumps({"version": 1, "eod_id": 0, "shards": entries}))


def make_sampler(shard_dir: Path, seq_len: int, phase_tokens: int) -> MixtureSampler:
    """The benchmarked configuration."""
    mix = MixtureConfig(target_ratio=0.8, seq_len=seq_len, max_epochs=100)
    cur = CurriculumConfig(phase_tokens=[phase_tokens] * 2, pacing="linear", blend_fraction=0.2)
    return MixtureSampler(shard_dir, mix, cur, seed=0)


def stream_digest(batches: list[MixtureBatch]) -> str:
    h = hashlib.sha256()
    for b in batches:
        for arr in (b.tokens, b.source_ids, b.phases):
            h.update(np.ascontiguousarray(arr, dtype="<i8").tobytes())
    return h.hexdigest()[:16]


def document_slices(pool: streams.DocPool, lo: int, hi: int) -> tuple[list[str], Any, Any, Any]:
    """The memmap slices holding tokens ``[lo, hi)`` of ``pool``'s stream (positions across epochs)."""
    files = [s.tokens.base.filename for s in pool.shards]  # type: ignore[union-attr]
    shard, starts, stops = [], [], []
    while lo < hi:
        epoch, at = divmod(lo, pool.total)
        ep = pool._epoch(epoch)
        stop = min(hi - epoch * pool.total, pool.total)
        d = int(ep.ends.searchsorted(at, side="right"))
        while at < stop:
            end = int(ep.ends[d])
            starts.append(int(ep.stops[d]) - (end - at))
            stops.append(int(ep.stops[d]) - max(0, end - stop))
            shard.append(0 if ep.shard is None else int(ep.shard[d]))
            at, d = min(end, stop), d + 1
        lo = epoch * pool.total + stop
    sh = None if len(files) == 1 else np.array(shard, dtype=np.int64)
    return files, sh, np.array(starts, dtype=np.int64), np.array(stops, dtype=np.int64)


class Maps:
    """Memory maps of the shards: new ones on every request (``keep=False``, as a newly built sampler
    maps its shards), or the same ones every time (``keep=True``: pages already mapped)."""

    def __init__(self, keep: bool) -> None:
        self.keep = keep
        self.views: dict[str, memoryview] = {}
        self.arrays: dict[tuple[str, str], streams.ShardArrays] = {}

    def view(self, path: str) -> memoryview:
        if not self.keep or path not in self.views:
            self.views[path] = memoryview(np.memmap(path, dtype=np.uint16, mode="r"))  # type: ignore[arg-type]
        return self.views[path]

    def sampler(self, build: Callable[[], MixtureSampler]) -> MixtureSampler:
        """``build()``, with its shards opened through these maps."""
        if not self.keep:
            return build()
        orig = streams.ShardArrays.open

        def cached(shard_dir: Path, prefix: str) -> streams.ShardArrays:
            key = (str(shard_dir), prefix)
            if key not in self.arrays:
                self.arrays[key] = orig(shard_dir, prefix)
            return self.arrays[key]

        streams.ShardArrays.open = cached  # type: ignore[method-assign,assignment]
        try:
            return build()
        finally:
            streams.ShardArrays.open = orig  # type: ignore[method-assign]


def bind(reads: list[list[Read]], as_python: bool, maps: Maps) -> list[list[tuple[Any, ...]]]:
    """``reads`` with the files mapped by ``maps``; ``as_python``: as ready-made ``(memoryview, start,
    stop)`` tuples instead of the int64 offset arrays a loader gets from an index."""
    views: dict[str, memoryview] = {}
    out: list[list[tuple[Any, ...]]] = []
    for plan in reads:
        bound: list[tuple[Any, ...]] = []
        for rows, files, sh, a, b in plan:
            for f in files:
                if f not in views:
                    views[f] = maps.view(f)
            mvs = [views[f] for f in files]
            if as_python:
                ids = [0] * a.size if sh is None else sh.tolist()
                bound.append(
                    (rows, [(mvs[i], x, y) for i, x, y in zip(ids, a.tolist(), b.tolist(), strict=True)])
                )
            else:
                bound.append((rows, mvs, sh, a, b))
        out.append(bound)
    return out


def trace(
    shard_dir: Path, args: argparse.Namespace, phase_tokens: int
) -> tuple[list[MixtureBatch], list[list[Read]]]:
    """One sampler run: its batches, and for each batch its reads (rows, document slices)."""
    S = args.seq_len
    takes: list[tuple[streams.DocPool, int, int]] = []
    orig_take = streams.DocPool.take

    def take(self: streams.DocPool, k: int, *a: Any, **kw: Any) -> Any:
        takes.append((self, self.epoch * self.total + self.offset, k))
        return orig_take(self, k, *a, **kw)

    streams.DocPool.take = take  # type: ignore[method-assign]
    batches: list[MixtureBatch] = []
    reads: list[list[Read]] = []
    try:
        s = make_sampler(shard_dir, S, phase_tokens)
        for _ in range(args.batches):
            takes.clear()
            batch = s.next_batch(args.batch_size)
            batches.append(batch)
            free: dict[bytes, list[int]] = {}  # where each window landed: match by content
            for i, row in enumerate(batch.tokens):
                free.setdefault(row.tobytes(), []).append(i)
            plan: list[Read] = []
            for pool, lo, k in takes:
                files, sh, a, b = document_slices(pool, lo, lo + k * S + 1)
                mms = [np.memmap(f, dtype=np.uint16, mode="r") for f in files]
                ids = [0] * a.size if sh is None else sh.tolist()
                flat = np.concatenate([mms[i][x:y] for i, x, y in zip(ids, a, b, strict=True)]).astype(
                    np.int64
                )
                rows = [free[flat[j * S : j * S + S + 1].tobytes()].pop(0) for j in range(k)]
                consecutive = rows == list(range(rows[0], rows[0] + k))
                plan.append((slice(rows[0], rows[0] + k) if consecutive else np.array(rows), files, sh, a, b))
            reads.append(plan)
    finally:
        streams.DocPool.take = orig_take  # type: ignore[method-assign]
    return batches, reads


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens-per-shard", type=int, default=DEFAULTS["tokens_per_shard"])
    ap.add_argument("--batches", type=int, default=DEFAULTS["batches"])
    ap.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    ap.add_argument("--seq-len", type=int, default=DEFAULTS["seq_len"])
    ap.add_argument("--repeats", type=int, default=21)
    args = ap.parse_args()
    S, B = args.seq_len, args.batch_size
    total = args.batches * B * S
    phase_tokens = total // 3  # the run crosses all three phases and both blend windows
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        write_shards(d, args.tokens_per_shard)
        batches, reads = trace(d, args, phase_tokens)
        digest = stream_digest(batches)

        def baseline(bound: list[list[tuple[Any, ...]]], keep: bool = False) -> list[np.ndarray]:
            """From int64 offsets, as a loader reading an index: to Python ints, slices, join, cast."""
            out = []  # kept for the check only: a trainer drops each batch before taking the next
            for plan in bound:
                tokens_BS1 = np.empty((B, S + 1), dtype=np.int64)
                for rows, mvs, sh, a, b in plan:
                    if sh is None:
                        mv = mvs[0]
                        buf = b"".join([mv[x:y] for x, y in zip(a.tolist(), b.tolist(), strict=True)])
                    else:
                        it = zip(sh.tolist(), a.tolist(), b.tolist(), strict=True)
                        buf = b"".join([mvs[i][x:y] for i, x, y in it])
                    k = (len(buf) // 2 - 1) // S
                    tokens_BS1[rows] = np.ndarray((k, S + 1), np.uint16, buf, 0, (2 * S, 2))
                if keep:
                    out.append(tokens_BS1)
            return out

        def baseline_py(bound: list[list[tuple[Any, ...]]], keep: bool = False) -> list[np.ndarray]:
            """The same from ready-made (memoryview, start, stop) tuples: no index conversion at all."""
            out = []
            for plan in bound:
                tokens_BS1 = np.empty((B, S + 1), dtype=np.int64)
                for rows, pieces in plan:
                    buf = b"".join([mv[x:y] for mv, x, y in pieces])
                    k = (len(buf) // 2 - 1) // S
                    tokens_BS1[rows] = np.ndarray((k, S + 1), np.uint16, buf, 0, (2 * S, 2))
                if keep:
                    out.append(tokens_BS1)
            return out

        for fn, py in ((baseline, False), (baseline_py, True)):
            got = fn(bind(reads, py, Maps(False)), keep=True)
            bad = [i for i, (x, y) in enumerate(zip(got, batches, strict=True)) if not (x == y.tokens).all()]
            if bad:
                raise SystemExit(f"{fn.__name__} does not reproduce the sampler's batches {bad[:5]}")
            del got
        fresh = make_sampler(d, S, phase_tokens)
        if stream_digest([fresh.next_batch(B) for _ in range(args.batches)]) != digest:
            raise SystemExit("the sampler is not deterministic: two runs gave different streams")

        def prepare_sampler(maps: Maps, warm: bool) -> Callable[[], object]:
            s = maps.sampler(lambda: make_sampler(d, S, phase_tokens))
            if warm:
                for pools in s.pools:
                    for pool in pools:
                        pool._epoch(pool.epoch)

            def run() -> None:
                for _ in range(args.batches):
                    s.next_batch(B)

            return run

        def prepare_baseline(maps: Maps, py: bool) -> Callable[[], object]:
            bound = bind(reads, py, maps)
            return (lambda: baseline_py(bound)) if py else (lambda: baseline(bound))

        def prepare_floor(maps: Maps) -> Callable[[], object]:
            mm = np.frombuffer(maps.view(str(d / "web_ar__ar__b0.bin")), dtype=np.uint16)

            def run() -> None:
                for b in range(args.batches):
                    tokens_BS1 = np.empty((B, S + 1), dtype=np.int64)
                    for i in range(B):
                        a = ((b * B + i) * S) % (mm.size - S - 1)
                        tokens_BS1[i] = mm[a : a + S + 1]

            return run

        def prepare_epoch_setup(maps: Maps) -> Callable[[], object]:
            s = maps.sampler(lambda: make_sampler(d, S, phase_tokens))
            return lambda: [pool._epoch(0) for pools in s.pools for pool in pools]

        results: dict[str, tuple[dict[str, list[float]], dict[str, list[float]]]] = {}
        for mode, maps in (("fresh maps", Maps(False)), ("mapped", Maps(True))):
            fns: dict[str, Callable[[], Callable[[], object]]] = {
                "sampler": partial(prepare_sampler, maps, False),
                "sampler_warm": partial(prepare_sampler, maps, True),
                "baseline": partial(prepare_baseline, maps, False),
                "baseline_py": partial(prepare_baseline, maps, True),
                "floor": partial(prepare_floor, maps),
                "epoch_setup": partial(prepare_epoch_setup, maps),
            }
            names = list(fns)
            wall: dict[str, list[float]] = {k: [] for k in fns}
            cpu: dict[str, list[float]] = {k: [] for k in fns}
            for r in range(-1, args.repeats):  # round -1 warms the page cache and the allocator
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    run = fns[name]()  # set-up (building a sampler, mapping shards) is not timed
                    t0, c0 = time.perf_counter(), time.thread_time()
                    run()
                    if r >= 0:
                        wall[name].append(time.perf_counter() - t0)
                        cpu[name].append(time.thread_time() - c0)
            results[mode] = (wall, cpu)
    pools = sorted({p.name: p.lengths.size for ps in fresh.pools for p in ps}.items())
    pieces = sum(r[3].size for plan in reads for r in plan)
    print(f"{args.batches} batches x {B} x {S + 1} tokens ({total / 1e6:.1f}M tokens), {args.repeats} rounds")
    print(f"reads: {sum(len(p) for p in reads)}, document slices: {pieces}, pools: {len(pools)} of ", end="")
    print(f"{pools[0][1]} documents; medians, ratio = ratio of medians (median of per-round ratios)")
    for mode, (wall, cpu) in results.items():
        print(f"{mode}:")
        med = {k: statistics.median(v) for k, v in wall.items()}
        med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
        for k in ("sampler", "sampler_warm", "baseline", "baseline_py", "floor", "epoch_setup"):
            line = f"  {k:12s} wall {med[k] * 1e3:6.2f} ms  cpu {med_cpu[k] * 1e3:6.2f} ms"
            if k != "epoch_setup":
                line += f"  {total / med[k] / 1e6:7.1f} M tok/s"
            if k.startswith("sampler"):
                for ref in ("baseline", "baseline_py"):
                    paired = statistics.median(x / y for x, y in zip(wall[k], wall[ref], strict=True))
                    line += f"  /{ref}: {med[k] / med[ref]:.3f} ({paired:.3f})"
            print(line)
    defaults = all(getattr(args, k) == v for k, v in DEFAULTS.items())
    print(f"stream sha256 {digest}" + (f" (pinned: {PINNED_SHA256})" if defaults else ""))
    if defaults and digest != PINNED_SHA256:
        raise SystemExit("the stream differs from the one pinned before the read path was optimised")


if __name__ == "__main__":
    main()
