"""Measure the exactness table of docs/upcycle.md (dtype x S x family); not run in CI.

    PYTHONPATH=$PWD python tests/benchmarks/bf16_exactness.py

For each source dtype / ``upcycle.dtype``, granularity, shared shards and target it upcycles a tiny
dense model with ``allow_inexact=true`` (so refused settings are measured too) and prints the largest
relative logit difference between the MoE and the dense model cast to the output dtype, both run in
fp32, and whether the stage accepts the setting without ``allow_inexact``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from moe_adapt.errors import MoEAdaptConfigError
from moe_adapt.upcycle.config import UpcycleConfig
from moe_adapt.upcycle.convert import Upcycler
from moe_adapt.upcycle.verify import compare_logits, load_fp32, probe_tokens
from tests.conftest import build_dense

FAMILIES = {"mixtral": "llama", "qwen3_moe": "qwen3", "qwen2_moe": "qwen2"}
# (source dtype, upcycle.dtype)
DTYPES = [
    ("bfloat16", "auto"),
    ("float16", "auto"),
    ("float32", "bfloat16"),
    ("bfloat16", "float32"),
    ("float32", "auto"),
]
# (granularity, shared shards); shared only for qwen2_moe
SHARDS = [(1, 0), (2, 0), (3, 0), (4, 0), (6, 0), (3, 1), (4, 1), (6, 2)]


def dense_checkpoint(root: Path, family: str, dtype: str) -> Path:
    from transformers import AutoModelForCausalLM

    fp32 = root / f"{family}_float32"
    if not fp32.exists():
        build_dense(fp32, family, intermediate_size=192)  # divisible by 1, 2, 3, 4, 6
    if dtype == "float32":
        return fp32
    path = root / f"{family}_{dtype}"
    if not path.exists():
        model = AutoModelForCausalLM.from_pretrained(fp32, dtype=getattr(torch, dtype))
        model.save_pretrained(path)
    return path


def measure(dense: Path, out: Path, target: str, g: int, shared: int, dtype: str) -> tuple[str, float]:
    kw = dict(method="fine_grained", target=target, granularity=g, shared_experts=shared, dtype=dtype)
    routed = g - shared
    kw.update(num_experts=2 * routed, top_k=routed)
    try:
        Upcycler(str(dense), UpcycleConfig(**kw), seed=0).close()  # type: ignore[arg-type]
        accepted = "exact"
    except MoEAdaptConfigError as e:
        accepted = "refused: " + str(e).split(":", 1)[0]
    up = Upcycler(str(dense), UpcycleConfig(allow_inexact=True, **kw), seed=0)  # type: ignore[arg-type]
    out.mkdir(parents=True)
    try:
        up.write(out, progress=False)
    finally:
        up.close()
    ref = load_fp32(dense)
    out_dtype = getattr(torch, up.dtype_name)
    with torch.no_grad():  # the dense model's weights rounded to the output dtype (not its buffers)
        for param in ref.parameters():
            param.copy_(param.to(out_dtype))
    moe = load_fp32(out)
    tokens = probe_tokens(ref.config.vocab_size, 3, 24, seed=1)
    return accepted, compare_logits(ref, moe, tokens)["max_rel_diff"]


def main() -> None:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        print("| source | upcycle.dtype | target | G | shared | S | max rel diff | stage |")
        print("|---|---|---|---|---|---|---|---|")
        i = 0
        for src_dtype, out_dtype in DTYPES:
            for target, family in FAMILIES.items():
                dense = dense_checkpoint(root, family, src_dtype)
                for g, shared in SHARDS:
                    if shared and target != "qwen2_moe":
                        continue
                    i += 1
                    acc, rel = measure(dense, root / f"moe{i}", target, g, shared, out_dtype)
                    print(
                        f"| {src_dtype} | {out_dtype} | {target} | {g} | {shared} | {g - shared} "
                        f"| {rel:.1e} | {acc} |",
                        flush=True,
                    )


if __name__ == "__main__":
    main()
