"""Training engines behind one contract (:class:`moe_adapt.engines.base.Engine`): ``megatron``
(megatron-core, GPU at scale) and ``hf`` (transformers). The shared kit: :mod:`.optim` (AdamW and the LR
schedule), :mod:`.kd` (reference and teacher models, token-KD terms), :mod:`.batch` (``TrainBatch``),
:mod:`.objectives`, :mod:`.router_health`, :mod:`.data_parallel`.

megatron-core is imported only inside :mod:`moe_adapt.engines.megatron` (style rule 7).
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moe_adapt.errors import MoEAdaptConfigError

if TYPE_CHECKING:
    from moe_adapt.engines.base import Engine
    from moe_adapt.engines.hf.config import HFConfig

log = logging.getLogger(__name__)

ENGINES = ("auto", "hf", "megatron")


def resolve_engine_name(engine_name: str, checkpoint: str | Path) -> str:
    """``hf`` or ``megatron`` for ``engine=auto|hf|megatron``.

    ``auto`` picks ``megatron`` only where it can run and train the job: CUDA is present, megatron-core
    imports and the checkpoint is an architecture the weight mapping covers (Mixtral, Qwen2-MoE,
    Qwen3-MoE); ``hf`` otherwise.
    """
    import torch

    if engine_name not in ENGINES:
        raise MoEAdaptConfigError(f"engine={engine_name!r} is invalid: choose one of {', '.join(ENGINES)}")
    from moe_adapt import distributed

    group = torch.distributed.is_available() and torch.distributed.is_initialized()
    if group and torch.distributed.get_world_size() > 1 and not distributed.current().is_distributed:
        # a stage rank 0 runs alone under torchrun: megatron would start collectives the others never join
        if engine_name == "megatron":
            raise MoEAdaptConfigError(
                "engine=megatron cannot train in a stage that runs on one process of a torchrun job "
                "(its groups are collective): use engine=hf there, or run that stage without torchrun"
            )
        return "hf"
    if engine_name != "auto":
        return engine_name
    if not torch.cuda.is_available():
        return "hf"
    try:
        import megatron.core  # noqa: F401
        from transformers import AutoConfig

        from moe_adapt.engines.megatron.hf_arch import read_hf_arch

        read_hf_arch(AutoConfig.from_pretrained(str(checkpoint), trust_remote_code=False))
    except (ImportError, MoEAdaptConfigError, OSError, ValueError):
        return "hf"
    return "megatron"


def build_engine(engine_name: str, checkpoint: str | Path, cfg: HFConfig | None = None, **kw: Any) -> Engine:
    """The training engine ``engine_name`` (hf | megatron | auto) built from an HF checkpoint folder.

    ``kw`` goes to the engine (``device``, ``lr_multiplier``, ``kd``, ``teacher``). For ``megatron``,
    torch.distributed and megatron's parallel_state are started first when they are not running (one
    process, or torchrun's environment) with ``cfg.expert_parallel`` expert-parallel and
    ``cfg.tensor_parallel`` tensor-parallel ranks.
    """
    import torch

    expert_parallel = getattr(cfg, "expert_parallel", 1)
    name = resolve_engine_name(engine_name, checkpoint)
    if name == "hf":
        from moe_adapt.engines.hf import HFEngine

        if engine_name == "hf":
            for key in ("expert_parallel", "tensor_parallel"):
                if getattr(cfg, key, 1) != 1:
                    raise MoEAdaptConfigError(
                        f"engine.{key}={getattr(cfg, key)} is invalid with the hf engine: it does not shard "
                        "that way (use the megatron engine, or 1; engine.parallel=fsdp2 shards the hf engine)"
                    )
        megatron_only: dict[str, Any] = {
            "expert_parallel": 1,
            "tensor_parallel": 1,
            "distributed_optimizer": False,
        }
        changed = {k: getattr(cfg, k) for k, off in megatron_only.items() if getattr(cfg, k, off) != off}
        if changed and engine_name != "hf" and cfg is not None:
            # auto chose hf (no CUDA, or a stage that runs on one process): the same training without
            # the megatron-only layout settings
            log.warning(
                "this stage trains on the hf engine, which ignores the megatron-only %s",
                ", ".join(f"engine.{k}={v}" for k, v in changed.items()),
            )
            cfg = dataclasses.replace(cfg, **{k: megatron_only[k] for k in changed})
        kw.setdefault("device", "cuda" if torch.cuda.is_available() else "cpu")
        return HFEngine(checkpoint, cfg, **kw)
    from moe_adapt.engines.megatron import MegatronEngine, init_parallel

    init_parallel(expert_parallel=expert_parallel, tensor_parallel=getattr(cfg, "tensor_parallel", 1))
    return MegatronEngine(checkpoint, cfg, **kw)
