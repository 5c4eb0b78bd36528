"""hf-engine step time vs a bare PyTorch loop over the same model and batches (not run in CI).

    python tests/benchmarks/bench_engine.py [--hidden 256 --layers 4 --experts 16 --steps 20 --repeats 5]

Both sides train a fresh copy of the same Qwen3-MoE (random weights, saved once) on the same
random batches: forward with router logits, LM loss plus load-balancing and z-loss, backward, grad
clipping, AdamW. The bare loop is written inline here with plain torch; the engine side is
:class:`moe_adapt.engines.hf.HFEngine.step`. Each repeat times ``--steps`` steps of each (order
alternating) after two warm-up steps; prints median ms/step and the ratio engine / bare
(goal <= 1.05).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, Qwen3MoeConfig

from moe_adapt.engines import objectives
from moe_adapt.engines.hf import HFConfig, HFEngine


def bare_steps(path: Path, batches: list[torch.Tensor], cfg: HFConfig, top_k: int) -> float:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=tuple(cfg.betas),
        eps=cfg.eps,
    )

    def step(tokens: torch.Tensor) -> None:
        out = model(input_ids=tokens[:, :-1], use_cache=False, output_router_logits=True)
        logits = out.logits
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))
        router = list(out.router_logits)
        loss = loss + cfg.aux_loss_coef * objectives.load_balancing_loss(router, top_k)
        loss = loss + cfg.z_loss_coef * objectives.router_z_loss(router)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip or float("inf"), foreach=False)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for tokens in batches[:2]:
        step(tokens)
    start = time.perf_counter()
    for tokens in batches[2:]:
        step(tokens)
    return (time.perf_counter() - start) / (len(batches) - 2)


def time_steps(engine: Any, batches: list[torch.Tensor], sync: bool = False) -> float:
    """Seconds per ``engine.step`` over ``batches[2:]``, after two warm-up steps (``sync``: wait for
    the GPU before reading the clock)."""
    for tokens in batches[:2]:
        engine.step(tokens)
    if sync:
        torch.cuda.synchronize()
    start = time.perf_counter()
    for tokens in batches[2:]:
        engine.step(tokens)
    if sync:
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / (len(batches) - 2)


def engine_steps(path: Path, batches: list[torch.Tensor], cfg: HFConfig) -> float:
    return time_steps(HFEngine(path, cfg), batches)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--top-k", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    torch.manual_seed(0)
    config = Qwen3MoeConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        moe_intermediate_size=args.hidden // 2,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=args.hidden // 4,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        norm_topk_prob=True,
    )
    cfg = HFConfig(lr=1e-3, warmup_steps=0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model"
        AutoModelForCausalLM.from_config(config).save_pretrained(path)
        gen = torch.Generator().manual_seed(1)
        batches = [
            torch.randint(0, args.vocab, (args.batch, args.seq_len + 1), generator=gen)
            for _ in range(args.steps + 2)
        ]
        bare, eng = [], []
        for r in range(args.repeats):
            order = ("bare", "engine") if r % 2 == 0 else ("engine", "bare")
            for side in order:
                if side == "bare":
                    bare.append(bare_steps(path, batches, cfg, args.top_k))
                else:
                    eng.append(engine_steps(path, batches, cfg))
            print(f"repeat {r}: bare {bare[-1] * 1e3:.1f} ms/step, engine {eng[-1] * 1e3:.1f} ms/step")
        b, e = statistics.median(bare), statistics.median(eng)
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
        print(
            f"model {params / 1e6:.1f}M params, batch {args.batch} x {args.seq_len} tokens, "
            f"{torch.get_num_threads()} threads"
        )
        print(
            f"median bare {b * 1e3:.1f} ms/step, median engine {e * 1e3:.1f} ms/step, ratio {e / b:.3f} "
            "(goal <= 1.05)"
        )


if __name__ == "__main__":
    main()
