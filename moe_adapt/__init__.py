"""moe_adapt: adapt an open dense LLM to a new language as a sparse Mixture-of-Experts.

The package mirrors the pipeline: ``config/`` (Hydra schemas), ``upcycle/`` (dense -> MoE),
``checkpoint/`` (streaming safetensors I/O), and one sub-package per later stage.
"""

__version__ = "0.1.0"
