"""Expert parallel over 2 gloo processes (alltoall dispatcher) gives the loss and router gradient of EP=1."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.engines.conftest import tiny_hf_model

pytest.importorskip("megatron.core")

from moe_adapt.engines.megatron.mapping import hf_to_megatron
from moe_adapt.engines.megatron.model import build_gpt_model, load_megatron_state

FAMILY = "qwen2_moe"  # routed experts + a gated shared expert
WORLD = 2


def _loss_and_router_grad(ep_rank: int, ep_size: int) -> dict[str, torch.Tensor]:
    """One forward/backward of the megatron model on a fixed batch; every rank sees the same batch."""
    hf_model = tiny_hf_model(FAMILY)
    model = build_gpt_model(hf_model.config, expert_parallel=ep_size, dispatcher="alltoall")
    sd = hf_to_megatron(hf_model.state_dict(), hf_model.config, ep_rank=ep_rank, ep_size=ep_size)
    load_megatron_state(model, sd)
    gen = torch.Generator().manual_seed(7)
    ids_BT = torch.randint(0, hf_model.config.vocab_size, (2, 16), generator=gen)
    labels_BT = torch.randint(0, hf_model.config.vocab_size, (2, 16), generator=gen)
    pos_BT = torch.arange(16).expand_as(ids_BT)
    loss = model(ids_BT, pos_BT, attention_mask=None, labels=labels_BT).mean()
    loss.backward()
    router = model.decoder.layers[1].mlp.router.weight
    return {"loss": loss.detach(), "router_grad": router.grad.detach().clone()}


def _worker(rank: int, port: int, out_dir: str) -> None:
    from tests.engines.megatron_cpu import megatron_on_cpu

    torch.set_num_threads(1)
    with megatron_on_cpu(rank=rank, world_size=WORLD, port=port, expert_parallel=WORLD):
        result = _loss_and_router_grad(rank, WORLD)
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")


def _spawn(out_dir: Path, timeout_s: float = 120.0) -> None:
    import torch.multiprocessing as mp

    from tests.engines.megatron_cpu import free_port

    context: Any = mp.spawn(_worker, args=(free_port(), str(out_dir)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for proc in context.processes:
                proc.terminate()
            pytest.fail(f"expert-parallel workers did not finish in {timeout_s:.0f} s")


@pytest.mark.slow
def test_ep2_alltoall_matches_ep1(megatron_cpu: None, tmp_path: Path) -> None:
    reference = _loss_and_router_grad(ep_rank=0, ep_size=1)
    _spawn(tmp_path)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        torch.testing.assert_close(got["loss"], reference["loss"], rtol=1e-6, atol=0)
        torch.testing.assert_close(got["router_grad"], reference["router_grad"], rtol=1e-5, atol=1e-8)
