"""LoRA / QLoRA students via ``peft``: low-rank adapters on a frozen base, merged into a plain HF
checkpoint when the model is saved.

:class:`LoRAConfig` is ``distill.<phase>.lora``; the hf engine calls :func:`wrap` on the model it
loaded (only the adapters train) and :func:`save_merged` when it writes the model: the adapter folder
(``adapter_config.json`` + ``adapter_model.safetensors``, what ``peft`` loads) beside the model, and
the base with the adapters merged in as an ordinary checkpoint that vanilla ``transformers`` loads.

In transformers 5 the experts of an MoE block are fused 3-D parameters (``experts.gate_up_proj``
``E×2F×H``, ``experts.down_proj`` ``E×H×F``), not ``nn.Linear``; ``experts: true`` adapts them with
peft's ``target_parameters`` (one low-rank update per fused parameter). The router and attention are
``nn.Linear`` and are adapted through ``target_modules``.

QLoRA (``quantize: 4bit``) loads the frozen base in bitsandbytes NF4; the merge reloads the base in
full precision, so the saved model is not quantized. peft is an optional extra (``pip install
moe_adapt[lora]``).
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from moe_adapt.errors import MoEAdaptConfigError, invalid
from moe_adapt.fs import atomic_dir

log = logging.getLogger(__name__)

EXPERT_PARAMETERS = ("gate_up_proj", "down_proj", "gate_proj", "up_proj", "w1", "w2", "w3")
"""Names of fused 3-D expert parameters (``...mlp.experts.<name>``) in transformers 5 MoE blocks."""

QUANTIZE = ("none", "4bit")


@dataclass
class LoRAConfig:
    """LoRA on a training phase's student (``distill.<phase>.lora``); rank 0 trains every weight."""

    rank: int = 0
    """Rank r of every adapter (0: off, full fine-tuning)."""

    alpha: float = 16.0
    """Scale numerator: the update is (alpha / rank) · B·A."""

    dropout: float = 0.0
    """Dropout on the adapters' input, in [0, 1)."""

    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    """Names (last path component) of the nn.Linear layers that get adapters; in an MoE model these
    are attention and any dense or shared-expert FFN (fused experts are not nn.Linear: see experts)."""

    experts: bool = False
    """MoE: also adapt the fused 3-D expert weights (peft target_parameters); false: experts frozen."""

    quantize: str = "none"
    """none, or 4bit: QLoRA, the frozen base in bitsandbytes NF4 (the merged model is saved unquantized)."""

    def validate(self, key: str) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 0:
            invalid(f"{key}.rank", self.rank, "must be an integer >= 0 (0: off)")
        if not self.alpha > 0:
            invalid(f"{key}.alpha", self.alpha, "must be > 0")
        if not 0 <= self.dropout < 1:
            invalid(f"{key}.dropout", self.dropout, "must be in [0, 1)")
        if self.quantize not in QUANTIZE:
            invalid(f"{key}.quantize", self.quantize, f"choose one of {', '.join(QUANTIZE)}")
        if self.rank == 0:
            return
        if not self.target_modules and not self.experts:
            invalid(
                f"{key}.target_modules", list(self.target_modules), "list a layer name, or set experts=true"
            )
        if importlib.util.find_spec("peft") is None:
            invalid(f"{key}.rank", self.rank, "LoRA needs peft: pip install 'moe_adapt[lora]'")

    @property
    def enabled(self) -> bool:
        return self.rank > 0


def check_quantization(cfg: LoRAConfig, device: torch.device, key: str = "lora") -> None:
    """QLoRA needs bitsandbytes' 4-bit kernels on ``device`` (bitsandbytes >= 0.46 runs them on the CPU
    and on CUDA)."""
    if cfg.quantize != "4bit":
        return
    if importlib.util.find_spec("bitsandbytes") is None:
        invalid(f"{key}.quantize", cfg.quantize, "needs bitsandbytes: pip install bitsandbytes")
    if device.type not in ("cpu", "cuda"):
        invalid(f"{key}.quantize", cfg.quantize, f"bitsandbytes 4-bit runs on cpu or cuda, not {device.type}")


def load_quantized(path: str | Path, dtype: torch.dtype, device: torch.device) -> Any:
    """The causal LM at ``path`` on ``device`` with its linear layers in NF4 (compute in ``dtype``),
    ready for LoRA (bitsandbytes places 4-bit weights when they load; they are not moved after)."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_use_double_quant=True,
    )
    model = AutoModelForCausalLM.from_pretrained(
        str(path), quantization_config=quant, dtype=dtype, device_map={"": str(device)}
    )
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def expert_parameters(model: Any) -> list[str]:
    """Suffixes (``mlp.experts.gate_up_proj``) of the fused 3-D expert parameters of ``model``."""
    found = set()
    for name, param in model.named_parameters():
        parts = name.split(".")
        if param.dim() == 3 and len(parts) >= 3 and parts[-2] == "experts" and parts[-1] in EXPERT_PARAMETERS:
            found.add(".".join(parts[-3:]))
    return sorted(found)


def wrap(model: Any, cfg: LoRAConfig, key: str = "lora") -> Any:
    """``model`` as a peft model with ``cfg``'s adapters; only the adapters require gradients."""
    from peft import LoraConfig, get_peft_model

    linear = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    targets = [t for t in cfg.target_modules if t in linear]
    parameters: list[str] = []
    if cfg.experts:
        parameters = expert_parameters(model)
        if not parameters:
            invalid(
                f"{key}.experts",
                True,
                f"{type(model).__name__} has no fused expert weights (a dense model): set experts=false",
            )
    if not targets and not parameters:
        invalid(
            f"{key}.target_modules",
            list(cfg.target_modules),
            f"matches no nn.Linear of {type(model).__name__} (it has {', '.join(sorted(linear))})",
        )
    peft_cfg = LoraConfig(
        r=cfg.rank,
        lora_alpha=cfg.alpha,  # type: ignore[arg-type]  # annotated int; peft scales by alpha / r
        lora_dropout=cfg.dropout,
        target_modules=targets or None,
        target_parameters=parameters or None,
        bias="none",
        task_type="CAUSAL_LM",
    )
    wrapped = get_peft_model(model, peft_cfg)
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    total = sum(p.numel() for p in wrapped.parameters())
    log.info(
        "LoRA r=%d alpha=%g on %s%s: %d of %d parameters train (%.2f%%)",
        cfg.rank,
        cfg.alpha,
        ", ".join(targets) or "no linear layer",
        f" and experts ({', '.join(parameters)})" if parameters else "",
        trainable,
        total,
        100 * trainable / max(total, 1),
    )
    return wrapped


def merged(base: str | Path, adapter: str | Path, dtype: torch.dtype) -> Any:
    """The full-precision base at ``base`` with the adapter folder ``adapter`` merged into its weights."""
    from peft import PeftModel

    from moe_adapt.checkpoint.hf import load_causal_lm

    model = load_causal_lm(base, dtype, router_bias=False)
    return PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()


def save_merged(peft_model: Any, base: str | Path, adapter_dir: Path, into: Path, dtype: torch.dtype) -> None:
    """Write ``peft_model``'s adapters to ``adapter_dir`` (atomically) and ``base`` with them merged into
    the folder ``into`` (the caller's temporary model folder, which it completes with the tokenizer)."""
    with atomic_dir(adapter_dir) as tmp:
        peft_model.save_pretrained(str(tmp))
    merged(base, adapter_dir, dtype).save_pretrained(str(into))


def refuse_megatron(cfg: LoRAConfig | None, key: str = "lora") -> None:
    """The megatron engine has no LoRA path: one line naming the fix."""
    if cfg is not None and cfg.enabled:
        raise MoEAdaptConfigError(
            f"{key}.rank={cfg.rank} is invalid with engine=megatron: LoRA trains on the hf engine only; "
            "set engine=hf (or auto), or lora.rank=0"
        )
