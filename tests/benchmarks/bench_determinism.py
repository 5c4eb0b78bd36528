"""The cost of ``deterministic=true``: hf-engine step time with torch's deterministic kernels vs its
default ones, on the same model and batches (not run in CI).

    python tests/benchmarks/bench_determinism.py [--hidden 64 --layers 2 --experts 16 --top-k 4 ...]

The defaults are the CPU demo's cpt stage: the upcycled Mixtral (hidden 64, 2 layers, 16 experts of
width 64, top-4, vocabulary 4096), 8 sequences of 256 tokens a step. Each repeat trains a fresh
engine for ``--steps`` steps in each mode (order alternating) after two warm-up steps, and checks
whether the mode's losses and weights came out the same as in its first repeat; prints median ms/step
per mode and the ratio deterministic / default. Run it at the thread count you train with.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, MixtralConfig

from moe_adapt.engines.hf import HFConfig, HFEngine
from moe_adapt.runner import deterministic_kernels


def train(path: Path, batches: list[torch.Tensor], deterministic: bool) -> tuple[float, list[float], float]:
    """Seconds per step after two warm-up steps, the losses, and a checksum of the final weights."""
    with deterministic_kernels(deterministic):
        engine = HFEngine(path, HFConfig(lr=3e-3, warmup_steps=0))
        losses = [engine.step(tokens)["loss"] for tokens in batches[:2]]
        start = time.perf_counter()
        losses += [engine.step(tokens)["loss"] for tokens in batches[2:]]
        seconds = (time.perf_counter() - start) / (len(batches) - 2)
    checksum = sum(float(p.detach().double().sum()) for p in engine.model.parameters())
    return seconds, losses, checksum


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    config = MixtralConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=args.experts,
        num_experts_per_tok=args.top_k,
    )
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model"
        AutoModelForCausalLM.from_config(config).save_pretrained(path)
        gen = torch.Generator().manual_seed(1)
        batches = [
            torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), generator=gen)
            for _ in range(args.steps + 2)
        ]
        times: dict[bool, list[float]] = {True: [], False: []}
        first: dict[bool, tuple[list[float], float]] = {}
        same: dict[bool, int] = {True: 0, False: 0}
        for r in range(args.repeats):
            for mode in (True, False) if r % 2 == 0 else (False, True):
                seconds, losses, checksum = train(path, batches, mode)
                times[mode].append(seconds)
                first.setdefault(mode, (losses, checksum))
                same[mode] += first[mode] == (losses, checksum)
            print(
                f"repeat {r}: deterministic {times[True][-1] * 1e3:.1f} ms/step, "
                f"default {times[False][-1] * 1e3:.1f} ms/step"
            )
        det, default = statistics.median(times[True]), statistics.median(times[False])
        print(f"batch {args.batch} x {args.seq_len} tokens, {torch.get_num_threads()} threads")
        print(
            f"repeats equal to the first (losses and weights): deterministic {same[True]}/{args.repeats}, "
            f"default {same[False]}/{args.repeats}"
        )
        print(
            f"median deterministic {det * 1e3:.1f} ms/step, median default {default * 1e3:.1f} ms/step, "
            f"ratio {det / default:.3f}"
        )


if __name__ == "__main__":
    main()
