"""Training engines behind one contract: ``megatron`` (megatron-core, GPU at scale) and ``hf`` (transformers).

megatron-core is imported only inside :mod:`moe_adapt.engines.megatron` (style rule 7).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moe_adapt.errors import MoEAdaptConfigError

ENGINES = ("auto", "hf", "megatron")


def resolve_engine_name(engine_name: str, checkpoint: str | Path, *, kd: Any = None) -> str:
    """``hf`` or ``megatron`` for ``engine=auto|hf|megatron``.

    ``auto`` picks ``megatron`` only where it can run and train the job: CUDA is present, megatron-core
    imports, the checkpoint is an architecture the weight mapping covers (Mixtral, Qwen2-MoE,
    Qwen3-MoE) and no token-level KD is asked for (the megatron engine refuses it); ``hf`` otherwise.
    """
    import torch

    if engine_name not in ENGINES:
        raise MoEAdaptConfigError(f"engine={engine_name!r} is invalid: choose one of {', '.join(ENGINES)}")
    from moe_adapt.train import distributed

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
    if not torch.cuda.is_available() or kd is not None:
        return "hf"
    try:
        import megatron.core  # noqa: F401
        from transformers import AutoConfig

        from moe_adapt.engines.megatron.hf_arch import read_hf_arch

        read_hf_arch(AutoConfig.from_pretrained(str(checkpoint), trust_remote_code=False))
    except (ImportError, MoEAdaptConfigError, OSError, ValueError):
        return "hf"
    return "megatron"


def build_engine(
    engine_name: str, checkpoint: str | Path, cfg: Any = None, *, expert_parallel: int = 1, **kw: Any
) -> Any:
    """The training engine ``engine_name`` (hf | megatron | auto) built from an HF checkpoint folder.

    ``kw`` goes to the engine (``device``, ``lr_multiplier``, ``kd``, ``teacher``). For ``megatron``,
    torch.distributed and megatron's parallel_state are started first when they are not running (one
    process, or torchrun's environment) with ``expert_parallel`` expert-parallel ranks.
    """
    import torch

    name = resolve_engine_name(engine_name, checkpoint, kd=kw.get("kd"))
    if name == "hf":
        from moe_adapt.engines.hf import HFEngine

        if expert_parallel != 1:
            raise MoEAdaptConfigError(
                f"expert_parallel={expert_parallel} is invalid with engine=hf: experts are not sharded there"
            )
        kw.setdefault("device", "cuda" if torch.cuda.is_available() else "cpu")
        return HFEngine(checkpoint, cfg, **kw)
    from moe_adapt.engines.megatron import MegatronEngine, init_parallel

    init_parallel(expert_parallel=expert_parallel)
    return MegatronEngine(checkpoint, cfg, **kw)
