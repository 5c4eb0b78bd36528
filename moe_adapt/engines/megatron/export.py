"""The megatron engine's weights back in HF form: the whole model gathered over the expert- and
tensor-parallel ranks, mapped to HF names (:mod:`.mapping`), as a transformers model
(:func:`build_hf_model`) or an HF checkpoint folder (:func:`save_hf`).
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from moe_adapt.checkpoint import router_bias as bias_file
from moe_adapt.checkpoint.hf import DTYPES, TOKENIZER_FILES
from moe_adapt.engines.megatron.mapping import (
    MegatronShard,
    gather_megatron_shards,
    megatron_to_hf,
    unpack_experts,
)
from moe_adapt.engines.megatron.state import model_tensors
from moe_adapt.fs import atomic_dir

if TYPE_CHECKING:
    from moe_adapt.engines.megatron.engine import MegatronEngine

_EXPERT_KEY = re.compile(r"^(.*\.local_experts\.)(\d+)(\..*)$")


def full_model_tensors(engine: MegatronEngine) -> dict[str, torch.Tensor]:
    """The whole model's megatron state on every rank (experts gathered over EP and numbered
    globally, in the sequential layout; tensor-parallel slices gathered and merged)."""
    local = unpack_experts(model_tensors(engine), engine._arch, engine.moe[0] // engine.ep_size)
    if engine.ep_size == 1 and engine.tp_size == 1:
        return local
    from megatron.core import parallel_state

    full: dict[str, torch.Tensor] = {}
    experts: dict[str, torch.Tensor] = {}
    per_rank = engine.moe[0] // engine.ep_size
    for key in sorted(local):
        match = _EXPERT_KEY.match(key)
        if match is None:
            full[key] = local[key]
            continue
        parts = [local[key]]
        if engine.ep_size > 1:
            parts = [torch.empty_like(local[key]) for _ in range(engine.ep_size)]
            dist.all_gather(
                parts, local[key].contiguous(), group=parallel_state.get_expert_model_parallel_group()
            )
        head, index, tail = match.group(1), int(match.group(2)), match.group(3)
        for rank, part in enumerate(parts):
            experts[f"{head}{rank * per_rank + index}{tail}"] = part
    if engine.tp_size == 1:
        return full | experts
    group = parallel_state.get_tensor_model_parallel_group()
    slices: list[dict[str, torch.Tensor]] = [{} for _ in range(engine.tp_size)]
    for key, tensor in full.items():  # every experts is whole on its rank (ETP = 1)
        parts = [torch.empty_like(tensor) for _ in range(engine.tp_size)]
        dist.all_gather(parts, tensor.contiguous(), group=group)
        for rank, part in enumerate(parts):
            slices[rank][key] = part
    shards = [
        (MegatronShard(tp_rank=rank, tp_size=engine.tp_size), part | experts)
        for rank, part in enumerate(slices)
    ]
    return gather_megatron_shards(shards, engine.hf_config)


def hf_state(engine: MegatronEngine) -> dict[str, torch.Tensor]:
    """The current weights in the HF in-memory layout, on the CPU, sharing nothing with training."""
    full = full_model_tensors(engine)
    return megatron_to_hf({k: v.detach().to("cpu", copy=True) for k, v in full.items()}, engine.hf_config)


def build_hf_model(
    engine: MegatronEngine, weights: dict[str, torch.Tensor]
) -> tuple[Any, bias_file.RouterBias | None]:
    """A transformers model holding ``weights`` (HF names, from :func:`hf_state`), with the router
    biases installed when there are any."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with no_init_weights():  # every weight is assigned below; buffers (RoPE) are built as usual
        hf_model = AutoModelForCausalLM.from_config(engine.hf_config, dtype=DTYPES[engine.cfg.dtype])
    hf_model.load_state_dict(weights, strict=True, assign=True)
    if engine.tied_embeddings:
        hf_model.tie_weights()
    bias = None
    if engine.expert_bias_LE is not None:
        bias = bias_file.RouterBias.install(hf_model, engine.cfg.bias_update_rate or 1e-3)
        bias.load_state_dict({"expert_bias_LE": engine.expert_bias_LE.cpu()})
    return hf_model, bias


def save_hf(engine: MegatronEngine, path: str | Path) -> Path:
    """Write the model as an HF checkpoint folder (safetensors) atomically, with the source's
    tokenizer files (and ``router_bias.json`` with aux-loss-free balancing); vanilla
    ``transformers`` loads it.

    Collective under expert parallel (the experts are gathered); global rank 0 writes.
    """
    final = Path(path)
    weights = hf_state(engine)
    if not dist.is_initialized() or dist.get_rank() == 0:
        hf_model, bias = build_hf_model(engine, weights)
        with atomic_dir(final) as tmp:
            hf_model.save_pretrained(str(tmp))
            if bias is not None:
                bias_file.save_router_bias(bias, tmp)
            for name in (*TOKENIZER_FILES, "generation_config.json"):
                if (engine.source / name).is_file():
                    shutil.copy2(engine.source / name, tmp / name)
    if dist.is_initialized() and (dist.get_world_size() if dist.is_initialized() else 1) > 1:
        dist.barrier()
    return final
