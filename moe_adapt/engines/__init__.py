"""Training engines behind one contract (:class:`moe_adapt.engines.base.Engine`): ``megatron``
(megatron-core, GPU at scale) and ``hf`` (transformers). The shared kit: :mod:`.optim` (AdamW and the LR
schedule), :mod:`.kd` (reference and teacher models, token-KD terms), :mod:`.batch` (``TrainBatch``),
:mod:`.objectives`, :mod:`.router_health`, :mod:`.data_parallel`.

megatron-core is imported only inside :mod:`moe_adapt.engines.megatron` (style rule 7).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from moe_adapt.engines.base import ENGINES, EngineConfig
from moe_adapt.engines.hf.config import HFConfig
from moe_adapt.engines.megatron.config import MegatronConfig
from moe_adapt.errors import MoEAdaptConfigError

if TYPE_CHECKING:
    from moe_adapt.engines.base import Engine

log = logging.getLogger(__name__)

MEGATRON_ONLY: dict[str, Any] = {"expert_parallel": 1, "tensor_parallel": 1, "distributed_optimizer": False}
"""The megatron layout settings that change training, at the values the hf engine trains with."""


@dataclass
class AutoConfig(MegatronConfig, HFConfig):
    """Settings of ``engine=auto`` (conf/engine/auto.yaml): what both engines need, since the engine is
    chosen when the stage starts (:func:`resolve_engine_name`). Falling back to hf, the megatron
    layout settings are dropped with a warning."""

    NAME: ClassVar[str] = "auto"

    name: str = "auto"
    """The engine: auto (set by engine=auto)."""


def as_auto(cfg: EngineConfig) -> AutoConfig:
    """``cfg``'s settings under ``engine=auto`` (the megatron layout at its defaults where ``cfg`` has
    none): for a stage that picks its own engine, e.g. the dense teacher."""
    names = {f.name for f in dataclasses.fields(AutoConfig)} - {"name"}
    return AutoConfig(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name in names})


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


def build_engine(cfg: EngineConfig, checkpoint: str | Path, **kw: Any) -> Engine:
    """The training engine ``cfg.name`` (hf | megatron | auto, see :func:`resolve_engine_name`) built
    from an HF checkpoint folder with ``cfg``'s settings.

    ``kw`` goes to the engine (``device``, ``lr_multiplier``, ``kd``, ``teacher``, ``lora``; LoRA trains
    on the hf engine only: engine=megatron with it is refused, engine=auto picks hf). For ``megatron``,
    torch.distributed and megatron's parallel_state are started first when they are not running (one
    process, or torchrun's environment) with ``cfg.expert_parallel`` expert-parallel and
    ``cfg.tensor_parallel`` tensor-parallel ranks.
    """
    import torch

    lora = kw.get("lora")
    if lora is not None and lora.enabled and cfg.name == "megatron":
        from moe_adapt.engines.lora import refuse_megatron

        refuse_megatron(lora)
    name = resolve_engine_name(cfg.name, checkpoint)
    if name == "megatron" and lora is not None and lora.enabled:  # engine=auto: LoRA is the hf engine's
        log.info("engine=auto: LoRA trains on the hf engine")
        name = "hf"
    if name == "hf":
        from moe_adapt.engines.hf import HFEngine

        if not isinstance(cfg, HFConfig):
            raise MoEAdaptConfigError(
                f"engine={cfg.name} cannot train with the hf engine: use engine=hf or auto"
            )
        if isinstance(cfg, AutoConfig):
            changed = {k: getattr(cfg, k) for k, off in MEGATRON_ONLY.items() if getattr(cfg, k) != off}
            if changed:
                # auto chose hf (no CUDA, or a stage that runs on one process): the same training without
                # the megatron-only layout settings
                log.warning(
                    "this stage trains on the hf engine, which ignores the megatron-only %s",
                    ", ".join(f"engine.{k}={v}" for k, v in changed.items()),
                )
                cfg = dataclasses.replace(cfg, **{k: MEGATRON_ONLY[k] for k in changed})
        kw.setdefault("device", "cuda" if torch.cuda.is_available() else "cpu")
        return HFEngine(checkpoint, cfg, **kw)
    from moe_adapt.engines.megatron import MegatronEngine, init_parallel

    assert isinstance(cfg, MegatronConfig)  # resolve_engine_name gives megatron for megatron or auto
    kw.pop("lora", None)  # off (rank 0) here
    init_parallel(expert_parallel=cfg.expert_parallel, tensor_parallel=cfg.tensor_parallel)
    return MegatronEngine(checkpoint, cfg, **kw)
