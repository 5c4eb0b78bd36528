"""The ``hf`` engine: a transformers causal LM trained on one device, or one per process with DDP or
FSDP2 (:mod:`.engine`), its settings (:mod:`.config`) and how it spreads over processes
(:mod:`.parallel`)."""

from moe_adapt.engines.hf.config import HFConfig
from moe_adapt.engines.hf.engine import HFEngine

__all__ = ["HFConfig", "HFEngine"]
