"""Upcycle throughput and memory on a synthetic ~1B-parameter dense checkpoint (not run in CI).

    python tests/benchmarks/bench_upcycle.py [--layers 16 --hidden 2048 --ffn 5504 --repeats 3]

Builds a bf16 Llama-shaped checkpoint of random weights (written tensor by tensor, so building it
needs little memory), then, ``--repeats`` times each and in the same run:

- upcycles it (fine_grained, granularity 4, 2 copies, no logit check) in a fresh process, measuring
  wall time and the process's peak RSS;
- copies the upcycled output folder with ``cp -r`` and ``sync`` (the baseline: moving the same
  bytes to disk; the upcycle fsyncs its shards too).

Each measurement starts after a ``sync``, so neither pays for the other's write-back, and both read
bytes that are in the page cache: the upcycle reads the dense checkpoint built just before (written,
so cached), ``cp`` reads the output the upcycle just wrote. The upcycle's time starts after its
process has started and imported ``moe_adapt.upcycle.convert`` (torch, transformers) and the
source's and target's configuration classes (transformers imports each model's on first use: ~1 s
on this machine, once per process, whatever the model's size; ``python -m moe_adapt`` has imported
transformers before any stage starts); those imports are printed separately. Peak RSS is the
child's own high-water mark (``VmHWM``): ``ru_maxrss`` would report the parent's resident size,
which a forked child inherits until ``exec`` (Linux keeps the larger).

Prints the medians and the ratio upcycle / cp. Goals (issue 13): ratio <= 1.5, peak RSS < 1 GiB.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from moe_adapt.checkpoint.safetensors_io import PlannedTensor, ShardedWriter

UPCYCLE = r"""
import json, resource, sys, time
t0 = time.perf_counter()
from pathlib import Path
from moe_adapt.upcycle.config import UpcycleConfig
from moe_adapt.upcycle.convert import Upcycler
from transformers import AutoConfig
for model_type in ("llama", "mixtral"):  # transformers imports a model's config classes on first use
    AutoConfig.for_model(model_type)
dense, out, experts, granularity = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
threads = int(sys.argv[5]) if int(sys.argv[5]) > 0 else None
start = time.perf_counter()
imported = start - t0
up = Upcycler(dense, UpcycleConfig(num_experts=experts, granularity=granularity, verify="none"), seed=0)
out.mkdir()
report = up.write(out, progress=False, threads=threads)
up.close()
seconds = time.perf_counter() - start
try:  # this process's own peak; ru_maxrss includes the forking parent's size
    status = Path("/proc/self/status").read_text()
    rss = int(next(l for l in status.splitlines() if l.startswith("VmHWM:")).split()[1]) * 1024
except (OSError, StopIteration):
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
result = {"seconds": seconds, "import": imported, "peak_rss": rss}
print(json.dumps({**result, "bytes": report["bytes"], "params": report["params"]}))
"""


def build_dense(path: Path, layers: int, hidden: int, ffn: int, vocab: int, heads: int, kv_heads: int) -> int:
    """Write a random bf16 Llama checkpoint; returns its parameter count."""
    from transformers import LlamaConfig

    head_dim = hidden // heads
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (hidden,),
                p + "self_attn.q_proj.weight": (heads * head_dim, hidden),
                p + "self_attn.k_proj.weight": (kv_heads * head_dim, hidden),
                p + "self_attn.v_proj.weight": (kv_heads * head_dim, hidden),
                p + "self_attn.o_proj.weight": (hidden, heads * head_dim),
                p + "post_attention_layernorm.weight": (hidden,),
                p + "mlp.gate_proj.weight": (ffn, hidden),
                p + "mlp.up_proj.weight": (ffn, hidden),
                p + "mlp.down_proj.weight": (hidden, ffn),
            }
        )
    shapes["model.norm.weight"] = (hidden,)
    shapes["lm_head.weight"] = (vocab, hidden)
    plan = [PlannedTensor(n, torch.bfloat16, s) for n, s in shapes.items()]
    path.mkdir(parents=True)
    writer = ShardedWriter(path, plan, 2 * 2**30)
    gen = torch.Generator().manual_seed(0)
    for t in plan:
        writer.write(t.name, (torch.randn(t.shape, generator=gen) * 0.02).to(torch.bfloat16))
    writer.close()
    LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        dtype="bfloat16",
    ).save_pretrained(path)
    return sum(torch.Size(s).numel() for s in shapes.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--ffn", type=int, default=5504)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--experts", type=int, default=8, help="routed experts (granularity 4: 2 copies)")
    ap.add_argument("--granularity", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0, help="writing threads (0: the upcycle's default)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a temp dir)")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_upcycle_", dir=args.workdir))
    try:
        dense = work / "dense"
        params = build_dense(dense, args.layers, args.hidden, args.ffn, args.vocab, args.heads, args.kv_heads)
        size = sum(f.stat().st_size for f in dense.iterdir()) / 2**30
        print(f"dense: {params / 1e9:.2f}B parameters, bf16, {size:.2f} GiB")
        ups, cps, rss = [], [], []
        for r in range(args.repeats):
            out, copy = work / f"moe{r}", work / f"copy{r}"
            subprocess.run(["sync"], check=True)  # start each measurement with no dirty pages pending
            proc = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    UPCYCLE,
                    str(dense),
                    str(out),
                    str(args.experts),
                    str(args.granularity),
                    str(args.threads),
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            subprocess.run(["sync"], check=True)
            start = time.perf_counter()
            subprocess.run(["cp", "-r", str(out), str(copy)], check=True)
            subprocess.run(["sync"], check=True)
            cps.append(time.perf_counter() - start)
            ups.append(result["seconds"])
            rss.append(result["peak_rss"])
            print(
                f"run {r}: upcycle {result['seconds']:.2f} s (after {result['import']:.2f} s of imports), "
                f"cp {cps[-1]:.2f} s, "
                f"peak RSS {rss[-1] / 2**30:.2f} GiB, output {result['bytes'] / 2**30:.2f} GiB, "
                f"{result['params']['total'] / 1e9:.2f}B params "
                f"({result['params']['active_fraction']:.3f} active)"
            )
            shutil.rmtree(out)
            shutil.rmtree(copy)
        up, cp = statistics.median(ups), statistics.median(cps)
        print(
            f"median upcycle {up:.2f} s, median cp {cp:.2f} s, ratio {up / cp:.2f} (goal <= 1.5); "
            f"median peak RSS {statistics.median(rss) / 2**30:.2f} GiB (goal < 1)"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
