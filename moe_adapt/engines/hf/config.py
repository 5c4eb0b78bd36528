"""Settings of the ``hf`` engine (``engine=hf``, conf/engine/hf.yaml): the shared
:class:`~moe_adapt.engines.base.EngineConfig` plus how the engine spreads over processes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from moe_adapt.engines.base import EngineConfig, fail

PARALLEL = ("auto", "none", "ddp", "fsdp2")


@dataclass
class HFConfig(EngineConfig):
    """Settings of the ``hf`` engine: the shared optimizer, schedule and loss settings and the
    multi-process layout."""

    NAME: ClassVar[str] = "hf"

    name: str = "hf"
    """The engine: hf (set by engine=hf)."""

    parallel: str = "auto"
    """How the engine spreads over several processes (torchrun): ddp (each process holds the whole
    model; gradients are averaged), fsdp2 (parameters, gradients and optimizer state sharded over the
    processes, one FSDP unit per decoder layer: models that do not fit one device), none (one process)
    or auto (ddp with several processes, none with one). With one process every value trains as none."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.parallel not in PARALLEL:
            fail("parallel", self.parallel, f"choose one of {', '.join(PARALLEL)}")
