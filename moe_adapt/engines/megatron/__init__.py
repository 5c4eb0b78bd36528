"""The megatron-core engine: a ``GPTModel`` with MoE layers and our own HF ⇄ Megatron weight mapping.

- :mod:`.hf_arch` reads an HF MoE config (mixtral / qwen2_moe / qwen3_moe) and refuses what cannot
  be reproduced exactly; it needs no megatron-core.
- :mod:`.model` builds the ``TransformerConfig`` and ``GPTModel`` (TransformerEngine-free local spec).
- :mod:`.mapping` converts state dicts both ways (pure torch; no megatron-core import).

Import the submodules directly; this package does not import megatron-core on its own.
"""
