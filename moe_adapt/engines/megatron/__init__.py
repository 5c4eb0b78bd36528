"""The megatron-core engine: a ``GPTModel`` with MoE layers and our own HF ⇄ Megatron weight mapping.

- :mod:`.hf_arch` reads an HF MoE config (mixtral / qwen2_moe / qwen3_moe) and refuses what cannot
  be reproduced exactly; it needs no megatron-core.
- :mod:`.model` builds the ``TransformerConfig`` and ``GPTModel`` (TransformerEngine-free local spec).
- :mod:`.mapping` converts state dicts both ways (pure torch; no megatron-core import).
- :mod:`.parallel` has :func:`init_parallel`, which starts megatron's ``parallel_state``, and the
  checks of the parallel layout the engine supports.
- :mod:`.engine` is the ``megatron`` training engine (:class:`MegatronEngine`, same contract as the
  ``hf`` engine).
- :mod:`.checkpoint` writes and reads its sharded training checkpoints (``dist_checkpointing``).

Importing this package does not import megatron-core: ``MegatronEngine`` and ``init_parallel`` are
loaded from :mod:`.engine` and :mod:`.parallel` on first access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from moe_adapt.engines.megatron.engine import MegatronEngine
    from moe_adapt.engines.megatron.parallel import init_parallel

__all__ = ["MegatronEngine", "init_parallel"]


def __getattr__(name: str) -> Any:
    if name == "MegatronEngine":
        from moe_adapt.engines.megatron.engine import MegatronEngine

        return MegatronEngine
    if name == "init_parallel":
        from moe_adapt.engines.megatron.parallel import init_parallel

        return init_parallel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
