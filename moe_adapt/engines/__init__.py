"""Training engines behind one contract: ``megatron`` (megatron-core, GPU at scale) and ``hf`` (transformers).

megatron-core is imported only inside :mod:`moe_adapt.engines.megatron` (style rule 7).
"""
