"""Prove an upcycled checkpoint: load it and the dense model with vanilla transformers, compare logits.

Legend: ``P`` probe sequences, ``T`` tokens per probe, ``V`` vocabulary.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from moe_adapt.checkpoint.hf import load_causal_lm

log = logging.getLogger(__name__)


def load_fp32(path: str | Path, trust_remote_code: bool = False, what: str = "checkpoint") -> Any:
    """Load a checkpoint in fp32 for checking (safetensors only); any missing or unexpected tensor is an
    error."""
    return load_causal_lm(
        path, torch.float32, router_bias=False, trust_remote_code=trust_remote_code, strict=True, what=what
    )


def probe_tokens(vocab_size: int, probes: int, seq_len: int, seed: int) -> torch.Tensor:
    """Random token ids ``[P, T]`` drawn from a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (probes, seq_len), generator=gen)


@torch.no_grad()
def compare_logits(dense: torch.nn.Module, moe: torch.nn.Module, tokens_PT: torch.Tensor) -> dict[str, Any]:
    """Max absolute and relative logit difference, and top-1 agreement, on the probe tokens."""
    dense_PTV = dense(input_ids=tokens_PT).logits.float()
    moe_PTV = moe(input_ids=tokens_PT).logits.float()
    diff = (moe_PTV - dense_PTV).abs()
    scale = dense_PTV.abs().max().clamp_min(1e-30)
    return {
        "max_abs_diff": diff.max().item(),
        "max_rel_diff": (diff.max() / scale).item(),
        "mean_abs_diff": diff.mean().item(),
        "top1_agreement": (moe_PTV.argmax(-1) == dense_PTV.argmax(-1)).float().mean().item(),
        "probes": list(tokens_PT.shape),
    }


def verify_checkpoints(
    dense_path: str | Path,
    moe_path: str | Path,
    probes: int,
    seq_len: int,
    seed: int,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Load both checkpoints in fp32 and compare their logits on random probes."""
    dense = load_fp32(dense_path, trust_remote_code, what="model.dense")
    moe = load_fp32(moe_path, what="the upcycled checkpoint")
    tokens_PT = probe_tokens(dense.config.vocab_size, probes, seq_len, seed)
    result = compare_logits(dense, moe, tokens_PT)
    del dense, moe
    return result


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where it cannot be read)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
