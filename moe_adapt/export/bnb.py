"""``int8`` (LLM.int8) and ``nf4`` (QLoRA's 4-bit NormalFloat) through bitsandbytes, as transformers
applies them (``BitsAndBytesConfig``), saved with ``save_pretrained`` so transformers reloads them
quantized: ``<stage>/<method>/model/``.

bitsandbytes replaces ``nn.Linear`` modules only. In transformers 5 the routed experts of Mixtral,
Qwen2-MoE and Qwen3-MoE are fused 3-D parameters (``experts.gate_up_proj``, ``experts.down_proj``),
not Linear modules, so they stay in float; so do the router (``mlp.gate``, a Linear subclass left out
by transformers), the embeddings and ``lm_head``. What is quantized is reported
(:func:`quantized_share`): on an MoE it is mostly attention, a small share of the parameters.

bitsandbytes runs on CPU from its 0.49-era releases on (0.50.2 tested here); where its backend does
not run on the measuring device, :func:`check_backend` refuses the method before anything is written.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from moe_adapt.checkpoint.hf import SIDE_FILES
from moe_adapt.errors import MoEAdaptError

log = logging.getLogger(__name__)

__all__ = ["BNB_METHODS", "check_backend", "quantize_bnb", "quantized_share"]

BNB_METHODS = ("int8", "nf4")
"""The export methods done by bitsandbytes."""

_EXTRA_FILES = ("router_bias.json",)
"""Files of our checkpoints that transformers does not write and our loader reads."""


def _bnb_config(method: str) -> Any:
    from transformers import BitsAndBytesConfig

    if method == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    if method == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
        )
    raise MoEAdaptError(f"export: {method!r} is not a bitsandbytes method ({', '.join(BNB_METHODS)})")


def check_backend(method: str, device: torch.device) -> str:
    """Quantize and run one small Linear with ``method`` on ``device``; returns the bitsandbytes version.

    Raises:
        MoEAdaptError: bitsandbytes is not installed, or its backend cannot run ``method`` on ``device``
            (one line naming the method, the device and what it needs).
    """
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise MoEAdaptError(
            f"export.methods: {method} needs bitsandbytes ({err}); pip install 'moe-adapt[bnb]'"
        ) from None
    version = str(getattr(bnb, "__version__", "?"))
    try:
        torch.manual_seed(0)
        ref = torch.nn.Linear(64, 64)
        layer: torch.nn.Module
        if method == "int8":
            layer = bnb.nn.Linear8bitLt(64, 64, has_fp16_weights=False, threshold=6.0)
        else:
            layer = bnb.nn.Linear4bit(64, 64, quant_type="nf4", compute_dtype=torch.float32)
        layer.load_state_dict(ref.state_dict())
        layer = layer.to(device)
        x = torch.randn(2, 64, device=device)
        with torch.no_grad():
            y = layer(x).float()
        if not torch.isfinite(y).all():
            raise RuntimeError("non-finite output")
    except Exception as err:
        raise MoEAdaptError(
            f"export.methods: {method} (bitsandbytes {version}) does not run on {device}: "
            f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}; it needs a CUDA GPU "
            "(export.device=cuda) or a bitsandbytes release whose CPU backend runs it"
        ) from None
    return version


def quantized_share(model: torch.nn.Module) -> dict[str, Any]:
    """Parameters of ``model`` (loaded with a bitsandbytes config) held quantized, and what stayed in
    float by kind: ``{quantized, total, share, expert_params, expert_params_quantized, float_by_kind}``."""
    import bitsandbytes as bnb

    quantized = 0
    qnames: set[str] = set()
    qexperts = 0
    for name, mod in model.named_modules():
        if isinstance(mod, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)):
            n = int(mod.in_features) * int(mod.out_features)
            quantized += n
            qnames.add(f"{name}.weight")
            if ".experts." in f"{name}.":
                qexperts += n
    float_by_kind: dict[str, int] = {}
    experts = qexperts
    for name, p in model.named_parameters():
        if name in qnames:
            continue
        if ".experts." in name:
            kind = "experts"
        elif ".gate." in name:
            kind = "router"
        elif "embed" in name or "lm_head" in name:
            kind = "embeddings/lm_head"
        else:
            kind = "norms" if "norm" in name else "other"
        if kind == "experts":
            experts += p.numel()
        float_by_kind[kind] = float_by_kind.get(kind, 0) + p.numel()
    total = quantized + sum(float_by_kind.values())
    return {
        "quantized": quantized,
        "total": total,
        "share": quantized / total if total else 0.0,
        "expert_params": experts,
        "expert_params_quantized": qexperts,
        "float_by_kind": float_by_kind,
    }


def quantize_bnb(src: str | Path, dst: str | Path, method: str, device: torch.device) -> dict[str, Any]:
    """Load ``src`` quantized with ``method`` on ``device`` and save it at ``dst`` (written to a temp
    folder beside it, then renamed); returns ``{method, bitsandbytes, quantized_share}``."""
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM

    src, dst = Path(src), Path(dst)
    model = AutoModelForCausalLM.from_pretrained(
        str(src),
        quantization_config=_bnb_config(method),
        device_map={"": str(device)},
        dtype=torch.float32,
        local_files_only=True,
        use_safetensors=True,
    )
    try:
        share = quantized_share(model)
        dst.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=dst.parent, prefix=f".{dst.name}."))
        try:
            model.save_pretrained(str(tmp), safe_serialization=True)
            for name in (*SIDE_FILES, *_EXTRA_FILES):
                if (src / name).is_file():
                    shutil.copy2(src / name, tmp / name)
            if dst.exists():
                shutil.rmtree(dst)
            os.replace(tmp, dst)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    finally:
        del model
        gc.collect()
    log.info(
        "export: %s quantized %.1f%% of the parameters (%d of %d; experts %d of %d)",
        method,
        100 * share["share"],
        share["quantized"],
        share["total"],
        share["expert_params_quantized"],
        share["expert_params"],
    )
    return {"method": method, "bitsandbytes": str(bnb.__version__), "quantized_share": share}
