"""Mixture-sampler throughput against reading the same tokens straight from the memmapped shards (not CI).

    python tests/benchmarks/bench_sampler.py [--tokens-per-shard 4000000] [--batches 60] [--repeats 5]

Writes synthetic shards (2 sources x 3 difficulty buckets, uint16, log-normal document lengths with
median ~300 tokens) with megatron-core's IndexedDatasetBuilder in a temporary folder, then times, in
the same process and with warm page cache, the median over ``--repeats`` of:

(a) ``MixtureSampler.next_batch`` (80/20 target/english, 3-phase easy-to-hard curriculum with linear
    pacing, seq_len 2048, batch 64): scheduling, curriculum, packing, int64 output;
(b) replay: exactly the document slices the sampler read, copied from the same memmaps, packed into
    the same ``[B, seq_len + 1]`` int64 windows, without any scheduling (the irreducible reading);
(b') replay_j: (b) copying the slices with ``bytes.join`` of memoryviews, as the sampler does;
(c) floor: contiguous ``seq_len + 1`` windows sliced straight from one memmap into the same array.

Prints tokens/s for each and the sampler's overhead over (b) (target: <= 5%) and over (c).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from moe_adapt.train import CurriculumConfig, MixtureConfig, MixtureSampler, streams


def write_shards(out: Path, tokens_per_shard: int) -> None:
    """Two sources x three buckets of synthetic documents (ids < 32,000, EOD 0) plus manifest.json."""
    import json

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
    cur = CurriculumConfig(phase_tokens=[phase_tokens] * 3, pacing="linear", blend_fraction=0.2)
    return MixtureSampler(shard_dir, mix, cur, seed=0)


def trace_reads(shard_dir: Path, args: argparse.Namespace, phase_tokens: int) -> list[list[Any]]:
    """Per ``DocPool.take`` call: (windows k, memmap slices read), recorded from one sampler run."""
    calls: list[list[Any]] = []
    orig_take, orig_read = streams.DocPool.take, streams.DocPool._read

    def take(self: streams.DocPool, k: int, seq_len: int, max_epochs: int | None) -> Any:
        calls.append([k, []])
        return orig_take(self, k, seq_len, max_epochs)

    def read(self: streams.DocPool, epoch: int, lo: int, hi: int, out: list[np.ndarray]) -> None:
        start = len(out)
        orig_read(self, epoch, lo, hi, out)
        for piece in out[start:]:  # record (memmap, start, stop) so that replay slices them itself
            view = np.asarray(piece)  # the sampler may hand out memoryviews
            base = next(sh.tokens for sh in self.shards if np.shares_memory(sh.tokens, view))
            a = (view.__array_interface__["data"][0] - base.__array_interface__["data"][0]) // 2
            calls[-1][1].append((base, a, a + view.size))

    streams.DocPool.take, streams.DocPool._read = take, read  # type: ignore[method-assign]
    try:
        s = make_sampler(shard_dir, args.seq_len, phase_tokens)
        for _ in range(args.batches):
            s.next_batch(args.batch_size)
    finally:
        streams.DocPool.take, streams.DocPool._read = orig_take, orig_read  # type: ignore[method-assign]
    return calls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens-per-shard", type=int, default=4_000_000)
    ap.add_argument("--batches", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    total = args.batches * args.batch_size * args.seq_len
    phase_tokens = total // 3  # the run crosses all three phases and both blend windows
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        write_shards(d, args.tokens_per_shard)
        calls = trace_reads(d, args, phase_tokens)
        S, B = args.seq_len, args.batch_size
        floor_mm = np.memmap(str(d / "web_ar__ar__b0.bin"), dtype=np.uint16, mode="r").view(np.ndarray)

        samplers = [make_sampler(d, S, phase_tokens) for _ in range(args.repeats + 1)]

        def run_sampler() -> None:
            s = samplers.pop()  # built outside the timed region (opening shards is setup, not throughput)
            for _ in range(args.batches):
                s.next_batch(B)

        def run_replay() -> None:
            out = np.empty((B, S + 1), dtype=np.int64)
            row = 0
            for k, parts in calls:
                views = [mm[a:b] for mm, a, b in parts]
                buf = views[0] if len(views) == 1 else np.concatenate(views)
                windows = np.lib.stride_tricks.sliding_window_view(buf, S + 1)[::S]
                if row + k > B:
                    out = np.empty((B, S + 1), dtype=np.int64)
                    row = 0
                out[row : row + k] = windows[: B - row] if row + k > B else windows
                row = (row + k) % B

        mvs = {id(mm): memoryview(mm) for _, parts in calls for mm, _, _ in parts}  # type: ignore[arg-type]
        calls_mv = [(k, [(mvs[id(mm)], a, b) for mm, a, b in parts]) for k, parts in calls]

        def run_replay_join() -> None:  # (b) with the sampler's copy primitive: bytes.join of memoryviews
            out = np.empty((B, S + 1), dtype=np.int64)
            row = 0
            for k, parts in calls_mv:
                buf = np.frombuffer(b"".join([mv[a:b] for mv, a, b in parts]), np.uint16)
                windows = np.ndarray((k, S + 1), buf.dtype, buf, 0, (2 * S, 2))
                if row + k > B:
                    out = np.empty((B, S + 1), dtype=np.int64)
                    row = 0
                out[row : row + k] = windows[: B - row] if row + k > B else windows
                row = (row + k) % B

        def run_floor() -> None:
            out = np.empty((B, S + 1), dtype=np.int64)
            for b in range(args.batches):
                for i in range(B):
                    a = ((b * B + i) * S) % (floor_mm.size - S - 1)
                    out[i] = floor_mm[a : a + S + 1]

        times: dict[str, list[float]] = {"sampler": [], "replay": [], "replay_j": [], "floor": []}
        fns = {"sampler": run_sampler, "replay": run_replay, "replay_j": run_replay_join, "floor": run_floor}
        for fn in fns.values():
            fn()  # warm the page cache and allocator
        for _ in range(args.repeats):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(
        f"{args.batches} batches x {B} x {S + 1} tokens ({total / 1e6:.1f}M tokens), {args.repeats} repeats"
    )
    print(f"read calls: {len(calls)}, memmap slices: {sum(len(p) for _, p in calls)}")
    for k, v in med.items():
        print(f"  {k:8s} {total / v / 1e6:8.1f} M tok/s   ({v * 1e3:.1f} ms)")
    print(f"sampler overhead vs replay of the same slices: {med['sampler'] / med['replay'] - 1:+.1%}")
    print(f"sampler overhead vs replay copying with bytes.join: {med['sampler'] / med['replay_j'] - 1:+.1%}")
    print(f"sampler overhead vs contiguous memmap windows: {med['sampler'] / med['floor'] - 1:+.1%}")


if __name__ == "__main__":
    main()
