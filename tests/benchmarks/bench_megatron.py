"""Tokens/s and MFU of the megatron engine against the hf engine on one fine-grained MoE (not run in CI).

    python tests/benchmarks/bench_megatron.py                      # one GPU, bf16
    python tests/benchmarks/bench_megatron.py --cpu --hidden 128 --layers 2 --experts 16 --seq-len 128 \\
        --batch 4 --steps 3 --repeats 2                            # a smoke run through the test shim

Both engines train a fresh copy of the same random Qwen3-MoE (saved once) on the same random batches,
with the same settings (AdamW, clipping, load-balancing and z-loss). Each repeat times ``--steps``
steps of each engine (order alternating) after two warm-up steps; the script prints median ms/step,
tokens/s, the model FLOPs utilisation of each (``--peak-tflops``, default the H100 SXM's dense bf16
peak) and the ratio megatron / hf. The defaults are a fine-grained MoE that fits one GPU: 64 experts,
8 active, expert FFN a quarter of the hidden size, so about 1/7 of the expert parameters are active.

FLOPs per token (forward + backward = 3 x forward): ``6 * N_active + 6 * L * T * d_attn`` where
``N_active`` counts the matrices a token passes through (attention, its top-k experts, the router and
the output layer; not the embedding lookup) and the second term is attention's ``QK^T`` and ``AV``
(causal masking is not subtracted: the local attention computes the full square).

``--cpu`` runs megatron-core through the tests' CPU shim (``tests/engines/megatron_cpu.py``): it
checks that the script works, its numbers say nothing about GPUs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

from moe_adapt.engines import AutoConfig
from moe_adapt.engines.hf import HFEngine
from tests.benchmarks.bench_engine import time_steps


def active_params(config: Qwen3MoeConfig) -> int:
    """Matrix parameters one token multiplies through (embedding lookup excluded)."""
    h, layers = config.hidden_size, config.num_hidden_layers
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    attention = h * q + 2 * h * kv + q * h
    experts = config.num_experts_per_tok * 3 * h * config.moe_intermediate_size
    router = h * config.num_experts
    return layers * (attention + experts + router) + h * config.vocab_size


def flops_per_token(config: Qwen3MoeConfig, seq_len: int) -> float:
    attention = 6 * config.num_hidden_layers * seq_len * config.num_attention_heads * config.head_dim
    return 6.0 * active_params(config) + attention


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32768)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the device")
    ap.add_argument("--cpu", action="store_true", help="fp32 on the CPU through the test shim (smoke run)")
    args = ap.parse_args()
    if not args.cpu and not torch.cuda.is_available():
        ap.error("no CUDA device: run on a GPU, or pass --cpu for a smoke run through the test shim")
    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        moe_intermediate_size=args.hidden // 4,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 128 if args.hidden >= 256 else 4,
        num_key_value_heads=2,
        head_dim=128 if args.hidden >= 256 else args.hidden // 4,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        norm_topk_prob=True,
    )
    dtype = "float32" if args.cpu else "bfloat16"
    cfg = AutoConfig(lr=1e-4, warmup_steps=0, dtype=dtype)
    device = "cpu" if args.cpu else "cuda"
    if args.cpu:
        from tests.engines.megatron_cpu import megatron_on_cpu

        shim: Any = megatron_on_cpu()
    else:
        shim = nullcontext()
    with tempfile.TemporaryDirectory() as tmp, shim:
        from moe_adapt.engines.megatron import MegatronEngine, init_parallel

        init_parallel()
        path = Path(tmp) / "model"
        AutoModelForCausalLM.from_config(config).save_pretrained(path)
        gen = torch.Generator().manual_seed(1)
        batches = [
            torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), generator=gen)
            for _ in range(args.steps + 2)
        ]
        times: dict[str, list[float]] = {"hf": [], "megatron": []}
        for r in range(args.repeats):
            for name in ("hf", "megatron") if r % 2 == 0 else ("megatron", "hf"):
                engine = HFEngine(path, cfg, device=device) if name == "hf" else MegatronEngine(path, cfg)
                times[name].append(time_steps(engine, batches, sync=not args.cpu))
                del engine
                if not args.cpu:
                    torch.cuda.empty_cache()
            print(f"repeat {r}: " + ", ".join(f"{k} {v[-1] * 1e3:.1f} ms/step" for k, v in times.items()))
        tokens = args.batch * args.seq_len
        total = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
        print(
            f"model {total / 1e6:.1f}M parameters, {active_params(config) / 1e6:.1f}M active matrix "
            f"parameters per token; batch {args.batch} x {args.seq_len} tokens; {dtype} on {device}"
        )
        median = {k: statistics.median(v) for k, v in times.items()}
        for name, seconds in median.items():
            rate = tokens / seconds
            mfu = rate * flops_per_token(config, args.seq_len) / (args.peak_tflops * 1e12)
            print(f"{name:9s} median {seconds * 1e3:8.1f} ms/step  {rate:12,.0f} tokens/s  MFU {mfu:.1%}")
        print(f"megatron / hf step time: {median['megatron'] / median['hf']:.3f}")


if __name__ == "__main__":
    main()
