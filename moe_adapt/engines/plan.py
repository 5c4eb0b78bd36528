"""The training plan: what a training phase will hold in memory, computed before any weight is loaded.

Every training phase (the ``cpt`` stage, each distill training phase, the ``teacher`` stage and
init_dense's pretraining) calls :func:`plan_training` before it builds its engine. The plan reads the
model's ``config.json`` only (the model is built on torch's ``meta`` device, which allocates nothing,
so it takes about a second at any size) and the engine settings, and gives:

- parameters: total, and active per token (MoE: every non-expert weight plus ``top_k / num_experts``
  of the routed experts' weights, with ``num_experts`` and ``top_k`` read from the model config);
- memory per rank for weights, gradients and optimizer state under the engine's layout, in bytes;
- tokens per step (global batch x seq_len), steps and total tokens.

:meth:`TrainingPlan.check` refuses, with one line and the numbers, a plan that cannot fit the device
(``engine.check_memory=false`` skips it). The memory model, per rank (``P`` parameters, ``b`` bytes per
parameter of ``engine.dtype``, ``W`` processes):

- both engines keep parameters, gradients and torch AdamW's two moments in ``engine.dtype``: no fp32
  master copy (the hf engine never makes one; megatron's only with its distributed optimizer);
- hf, one process: weights ``P b``, gradients ``P b``, optimizer ``2 P b``;
- hf ``ddp``: the same on every rank, plus DDP's gradient buckets (``P b``; the buckets are not views
  of the gradients), counted with the gradients;
- hf ``fsdp2``: weights, gradients and optimizer state divided by ``W``, plus a working set of
  gathered parameters: the root module's (embeddings, head, final norm: not resharded after the
  forward) and two decoder layers (the one computing and the one prefetched), the largest;
- megatron: every 2-d non-expert matrix (attention, dense MLP, embeddings, head) divided by
  ``engine.tensor_parallel``; routers, norms and other 1-d weights whole; routed experts divided by
  ``engine.expert_parallel``. Gradients in megatron's buffer in the parameter dtype. Without the
  distributed optimizer, AdamW's moments ``2 b`` per local parameter; with it, fp32 moments (8 bytes)
  and, below fp32, fp32 main parameters and their gradients (8 bytes) per parameter of this rank's
  shard: dense parameters over the ``W / tensor_parallel`` data-parallel ranks, experts over the
  ``W / expert_parallel`` expert-data-parallel ranks;
- the L2 anchor keeps a copy of this rank's trained weights; the KL anchor's reference and token KD's
  online teacher are whole frozen models on every rank, in ``engine.dtype``;
- LoRA (``distill.<phase>.lora``, hf engine, one process or ddp): the frozen base ``P b`` has no
  gradients and no optimizer state; the ``A`` adapter parameters (peft's ``r (in + out)`` per targeted
  ``nn.Linear``, ``r E (a + b)`` per fused ``E x a x b`` expert weight) are fp32 whatever
  ``engine.dtype`` (peft keeps adapters in fp32): weights ``P b + 4 A``, gradients ``4 A`` (ddp:
  ``8 A``), AdamW ``8 A``, the L2 anchor ``4 A``;
- QLoRA (``lora.quantize=4bit``): bitsandbytes stores every ``nn.Linear`` weight but the output head
  in NF4 with double quantisation (half a byte per parameter, one uint8 scale per 64 and one fp32
  scale per 256 of those); every other base weight (embeddings, head, norms, routers and the fused 3-D
  experts of transformers 5 MoE blocks, which are not ``nn.Linear``) is upcast to fp32 by peft's
  ``prepare_model_for_kbit_training``: 4 bytes each.

Compute is given as training FLOPs per token: ``6 N`` for ``N`` active parameters (forward ``2 N``,
backward ``4 N``); with LoRA ``4 N + 6 A_active``, the backward computing activation gradients but
no weight gradients for the frozen base (``A_active``: the adapters one token passes through, expert
adapters scaled by ``top_k / num_experts``). An approximation: attention over the sequence, and peft's
per-step merge of the fused expert adapters, are not counted.

Activations are not counted (they depend on kernels, recomputation and the attention
implementation); the plan shows the logits alone (one fp32 copy of this rank's rows x seq_len x
vocab) as a floor. On a CUDA device the check compares one rank's need with the device's total
memory; on the CPU it compares the need of every process on this machine with its available memory.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moe_adapt.engines.base import EngineConfig
from moe_adapt.errors import MoEAdaptConfigError, invalid

if TYPE_CHECKING:
    from moe_adapt.engines.lora import LoRAConfig

log = logging.getLogger(__name__)

GiB = 1024**3

_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
_LAYER = re.compile(r"\.layers\.(\d+)\.")


@dataclass(frozen=True)
class ParamCount:
    """Parameters of one model, from its config (tied weights counted once)."""

    total: int
    """Every parameter."""

    active: int
    """Parameters one token passes through (MoE: ``top_k`` of the ``num_experts`` routed experts)."""

    experts: int = 0
    """Parameters of the routed experts (all of them, every layer)."""

    num_experts: int = 0
    """Routed experts per MoE layer (0: a dense model)."""

    top_k: int = 0
    """Routed experts each token uses."""

    matrices: int = 0
    """Non-expert 2-d weights megatron's tensor parallel splits (all but routers and gates)."""

    root: int = 0
    """Parameters outside the decoder layers (embeddings, head, final norm)."""

    largest_layer: int = 0
    """Parameters of the largest decoder layer."""


def num_experts_of(config: Any) -> tuple[int, int]:
    """``(num_experts, top_k)`` of an HF model config; ``(0, 0)`` for a dense model. The one place that
    reads the MoE shape: Mixtral's ``num_local_experts``, Qwen's ``num_experts``, DeepSeek's
    ``n_routed_experts``, and ``num_experts_per_tok``."""
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):
        n = getattr(config, key, None)
        if isinstance(n, int) and n > 0:
            return n, int(getattr(config, "num_experts_per_tok", 0) or 0)
    return 0, 0


def count_params(config: Any) -> ParamCount:
    """Count the parameters of the causal LM ``config`` (a transformers ``PretrainedConfig``) by
    building it on the meta device: exact for every family transformers knows, no memory used."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    num_experts, top_k = num_experts_of(config)
    total = experts = matrices = root = 0
    layers: dict[int, int] = {}
    for name, p in model.named_parameters():  # tied parameters come once
        n = p.numel()
        total += n
        hit = _LAYER.search(name)
        if hit is None:
            root += n
        else:
            layers[int(hit.group(1))] = layers.get(int(hit.group(1)), 0) + n
        if num_experts and ".experts." in name:
            experts += n
        elif p.dim() >= 2 and not name.endswith("gate.weight"):  # routers / shared-expert gates stay whole
            matrices += n
    active = total - experts + (experts * top_k) // num_experts if num_experts else total
    return ParamCount(
        total=total,
        active=active,
        experts=experts,
        num_experts=num_experts,
        top_k=top_k,
        matrices=matrices,
        root=root,
        largest_layer=max(layers.values(), default=0),
    )


@dataclass(frozen=True)
class AdapterCount:
    """What LoRA trains and QLoRA quantizes in one model, counted from its config the way
    :func:`moe_adapt.engines.lora.wrap` and bitsandbytes select them."""

    rank: int
    """The adapters' rank r."""

    trainable: int
    """Adapter parameters: r (in + out) per targeted nn.Linear, r E (a + b) per fused E x a x b expert
    weight (peft's shapes)."""

    active: int
    """Adapter parameters one token passes through (expert adapters scaled by top_k / num_experts)."""

    quantized: int = 0
    """Base parameters stored in NF4 (QLoRA: every nn.Linear weight but the output head; 0 for LoRA)."""

    quantized_bytes: int = 0
    """Their bytes: half a byte each plus the double-quantised scales."""


def nf4_bytes(n: int) -> int:
    """Bytes bitsandbytes holds for an ``n``-element weight in NF4 with double quantisation: two values
    per byte, one uint8 scale per block of 64, one fp32 scale per 256 of those blocks."""
    blocks = -(-n // 64)
    return -(-n // 2) + blocks + 4 * -(-blocks // 256)


def count_adapters(config: Any, lora: LoRAConfig) -> AdapterCount:
    """Count ``lora``'s adapters (and, with ``quantize=4bit``, the NF4 base) on the causal LM
    ``config``, built on the meta device (no memory used)."""
    import torch
    from transformers import AutoModelForCausalLM

    from moe_adapt.engines.lora import EXPERT_PARAMETERS

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    num_experts, top_k = num_experts_of(config)
    head = model.get_output_embeddings()
    linear = {name: m for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    targets = set(lora.target_modules)
    trainable = active = quantized = quantized_bytes = 0
    for name, m in linear.items():
        if name.rsplit(".", 1)[-1] in targets:
            n = lora.rank * (m.in_features + m.out_features)
            trainable, active = trainable + n, active + n
        if lora.quantize == "4bit" and m is not head:
            quantized += m.weight.numel()
            quantized_bytes += nf4_bytes(m.weight.numel())
    if lora.experts:
        for name, p in model.named_parameters():
            parts = name.split(".")
            if p.dim() == 3 and len(parts) >= 3 and parts[-2] == "experts" and parts[-1] in EXPERT_PARAMETERS:
                e, a, b = p.shape
                n = lora.rank * e * (a + b)
                trainable += n
                active += n * top_k // num_experts if num_experts else n
    return AdapterCount(lora.rank, trainable, active, quantized, quantized_bytes)


def read_config(folder: str | Path, key: str) -> Any:
    """The transformers config of the checkpoint ``folder`` (config.json only; no weights, no remote
    code). ``key`` names the setting in the error."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    except (OSError, ValueError, KeyError) as e:
        raise MoEAdaptConfigError(f"{key}={str(folder)!r}: cannot read its config.json ({e})") from None


@dataclass(frozen=True)
class Layout:
    """How the engine spreads the model over ``world_size`` processes."""

    engine: str
    """hf or megatron (engine=auto resolved)."""

    world_size: int = 1
    parallel: str = "none"
    """hf: none, ddp or fsdp2 (engine.parallel resolved for world_size)."""

    tensor_parallel: int = 1
    expert_parallel: int = 1
    distributed_optimizer: bool = False

    def describe(self) -> str:
        if self.engine == "hf":
            if self.parallel == "none":
                return "hf engine, one process"
            return f"hf engine, {self.parallel} over {self.world_size} processes"
        opt = "distributed optimizer" if self.distributed_optimizer else "AdamW on every rank"
        return (
            f"megatron engine over {self.world_size} {'process' if self.world_size == 1 else 'processes'}: "
            f"tensor parallel {self.tensor_parallel}, "
            f"expert parallel {self.expert_parallel}, {opt}"
        )


def resolve_layout(cfg: EngineConfig, engine: str, world_size: int) -> Layout:
    """The layout ``cfg`` trains with on ``world_size`` processes, for ``engine`` (hf | megatron)."""
    if engine == "hf":
        parallel = str(getattr(cfg, "parallel", "auto"))
        if world_size <= 1:
            parallel = "none"
        elif parallel == "auto":
            parallel = "ddp"
        return Layout("hf", max(world_size, 1), parallel)
    return Layout(
        "megatron",
        max(world_size, 1),
        "megatron",
        tensor_parallel=int(getattr(cfg, "tensor_parallel", 1)),
        expert_parallel=int(getattr(cfg, "expert_parallel", 1)),
        distributed_optimizer=bool(getattr(cfg, "distributed_optimizer", False)),
    )


@dataclass(frozen=True)
class Memory:
    """Bytes one rank holds for training (activations not counted)."""

    weights: int
    gradients: int
    optimizer: int
    """AdamW's two moments (and, with megatron's distributed optimizer below fp32, the fp32 main
    parameters and their gradients)."""
    extra: dict[str, int] = field(default_factory=dict)
    """Anything else counted: FSDP2's gathered working set, the L2 anchor's copy, frozen models."""

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + sum(self.extra.values())


def memory_per_rank(
    params: ParamCount, dtype: str, layout: Layout, adapters: AdapterCount | None = None
) -> Memory:
    """Bytes per rank for weights, gradients and optimizer state (see the module docstring);
    ``adapters``: LoRA's (the hf engine, one process or ddp)."""
    b = _DTYPE_BYTES[dtype]
    p, w = params.total, layout.world_size
    extra: dict[str, int] = {}
    if adapters is not None:
        a = adapters.trainable * 4  # peft keeps the adapters in fp32
        # QLoRA: NF4 linear weights, the rest of the base upcast to fp32
        base = adapters.quantized_bytes + (p - adapters.quantized) * 4 if adapters.quantized else p * b
        return Memory(base + a, a * (2 if layout.parallel == "ddp" else 1), 2 * a, extra)
    if layout.engine == "hf":
        if layout.parallel == "fsdp2":
            shard = -(-p // w)
            extra["fsdp2 gathered"] = (params.root + 2 * params.largest_layer) * b
            return Memory(shard * b, shard * b, 2 * shard * b, extra)
        grads = p * b * (2 if layout.parallel == "ddp" else 1)
        return Memory(p * b, grads, 2 * p * b, extra)
    tp, ep = layout.tensor_parallel, layout.expert_parallel
    dense = -(-params.matrices // tp) + (p - params.experts - params.matrices)
    experts = -(-params.experts // ep)
    local = dense + experts
    if not layout.distributed_optimizer:
        return Memory(local * b, local * b, 2 * local * b, extra)
    per_param = 8 + (8 if b < 4 else 0)  # fp32 moments (+ fp32 main parameters and their gradients)
    dp, edp = max(w // tp, 1), max(w // ep, 1)
    optimizer = (-(-dense // dp) + -(-experts // edp)) * per_param
    return Memory(local * b, local * b, optimizer, extra)


@dataclass
class TrainingPlan:
    """What a training phase will use, computed before its engine is built."""

    name: str
    """The phase (cpt, teacher, sft, ...)."""

    params: ParamCount
    dtype: str
    layout: Layout
    memory: Memory
    steps: int
    batch_size: int
    """Sequences per step (global batch)."""
    seq_len: int
    logits_bytes: int
    """One fp32 copy of this rank's logits: a floor for activations, not in the total."""
    adapters: AdapterCount | None = None
    """LoRA's adapters (None: every weight trains)."""
    device: str = ""
    """Where the check looked (e.g. ``cuda:0 total``, ``cpu available``); empty before :meth:`check`."""
    available: int | None = None
    """Bytes the device offers (None: unknown)."""
    processes_here: int = 1
    """Processes sharing the device's memory (the CPU: every process of this machine)."""

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @property
    def total_tokens(self) -> int:
        return self.tokens_per_step * self.steps

    @property
    def trainable(self) -> int:
        """Parameters that get gradients and optimizer state."""
        return self.adapters.trainable if self.adapters is not None else self.params.total

    @property
    def flops_per_token(self) -> int:
        """Training FLOPs per token, approximately: 6 x active parameters; with LoRA 4 x active
        (no weight gradients for the frozen base) + 6 x the active adapters."""
        if self.adapters is None:
            return 6 * self.params.active
        return 4 * self.params.active + 6 * self.adapters.active

    @property
    def needed(self) -> int:
        """Bytes the device must hold: one rank's total times the processes sharing it."""
        return self.memory.total * self.processes_here

    def as_dict(self) -> dict[str, Any]:
        """The plan as JSON values (for a stage's summary; the device's free memory stays out, so the
        same settings give the same summary on any machine)."""
        m = self.memory
        return {
            "params_total": self.params.total,
            "params_active": self.params.active,
            "num_experts": self.params.num_experts,
            "top_k": self.params.top_k,
            "params_trainable": self.trainable,
            "lora": asdict(self.adapters) if self.adapters is not None else None,
            "dtype": self.dtype,
            "layout": asdict(self.layout),
            "bytes_per_rank": {
                "weights": m.weights,
                "gradients": m.gradients,
                "optimizer": m.optimizer,
                **{k.replace(" ", "_"): v for k, v in m.extra.items()},
                "total": m.total,
            },
            "activations": "not counted",
            "logits_bytes_per_rank": self.logits_bytes,
            "tokens_per_step": self.tokens_per_step,
            "steps": self.steps,
            "total_tokens": self.total_tokens,
            "train_flops_per_token": self.flops_per_token,
        }

    def describe(self) -> str:
        """The plan as a readable block of lines."""
        p, m = self.params, self.memory
        moe = f" ({p.num_experts} experts, top-{p.top_k})" if p.num_experts else " (dense)"
        lines = [
            f"{self.name}: training plan",
            f"  parameters  {_count(p.total)} total, {_count(p.active)} active per token{moe}",
            f"  layout      {self.layout.describe()}, {self.dtype}",
            *self._lora_lines(),
            f"  per rank    weights {_gib(m.weights)} + gradients {_gib(m.gradients)} "
            f"+ optimizer {_gib(m.optimizer)}"
            + "".join(f" + {k} {_gib(v)}" for k, v in m.extra.items())
            + f" = {_gib(m.total)}",
            f"  activations not counted (the logits alone: {_gib(self.logits_bytes)} per rank)",
            f"  tokens      {self.batch_size} x {self.seq_len} = {self.tokens_per_step:,} per step, "
            f"{self.steps:,} steps, {_count(self.total_tokens)} tokens",
            f"  compute     ~{_count(self.flops_per_token)} FLOPs per token "
            f"({'4 x active + 6 x adapters' if self.adapters else '6 x active'}), "
            f"{_count(self.flops_per_token * self.total_tokens)} in all",
        ]
        if self.device:
            have = _gib(self.available) if self.available is not None else "unknown"
            shared = f" for {self.processes_here} processes" if self.processes_here > 1 else ""
            lines.append(f"  device      {self.device} {have}; needs {_gib(self.needed)}{shared}")
        return "\n".join(lines)

    def _lora_lines(self) -> list[str]:
        a = self.adapters
        if a is None:
            return []
        base = (
            f"{_count(a.quantized)} of its weights in NF4 ({_gib(a.quantized_bytes)}), the rest fp32"
            if a.quantized
            else f"in {self.dtype}"
        )
        return [
            f"  lora        r={a.rank}: {_count(a.trainable)} adapter parameters train in fp32 "
            f"({100 * a.trainable / max(self.params.total, 1):.2f}% of the base); the base is frozen "
            f"(no gradients, no optimizer state), {base}"
        ]

    def check(self, device: str, enabled: bool = True) -> None:
        """Compare the need with the memory of ``device`` (cuda or cpu); record what was found.

        Raises:
            MoEAdaptConfigError: ``enabled`` and the plan needs more than the device has (one line with
                the numbers and the override).
        """
        self.device, self.available, self.processes_here = device_memory(device)
        if not enabled or self.available is None or self.needed <= self.available:
            return
        m = self.memory
        parts = f"weights {_gib(m.weights)} + gradients {_gib(m.gradients)} + optimizer {_gib(m.optimizer)}"
        parts += "".join(f" + {k} {_gib(v)}" for k, v in m.extra.items())
        shared = f" x {self.processes_here} processes" if self.processes_here > 1 else ""
        bf16 = ", train in bfloat16" if self.dtype == "float32" else ""
        raise MoEAdaptConfigError(
            f"{self.name}: training {_count(self.params.total)} parameters in {self.dtype} "
            f"({self.layout.describe()}) needs {_gib(m.total)} per rank ({parts}){shared}, activations not "
            f"counted, but {self.device} has {_gib(self.available)}: shard it (engine.parallel=fsdp2, "
            f"engine.distributed_optimizer, expert/tensor parallel){bf16}, or set "
            "engine.check_memory=false to try anyway"
        )


def device_memory(device: str) -> tuple[str, int | None, int]:
    """``(what, bytes, processes sharing them)`` for ``device``: a CUDA device's total memory (one rank
    each), or the CPU's available memory shared by every process on this machine."""
    if device.startswith("cuda"):
        import torch

        index = torch.cuda.current_device()
        return f"cuda:{index} total", int(torch.cuda.get_device_properties(index).total_memory), 1
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
    return "cpu available", available_memory_bytes(), max(local, 1)


def available_memory_bytes() -> int | None:
    """The machine's available memory: psutil when installed, else MemAvailable from /proc/meminfo
    (None where neither answers)."""
    try:
        import psutil  # type: ignore[import-untyped]

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def plan_training(
    name: str,
    cfg: EngineConfig,
    checkpoint: str | Path,
    *,
    steps: int,
    batch_size: int,
    seq_len: int,
    world_size: int = 1,
    teacher: str | Path | None = None,
    key: str = "init_from",
    lora: LoRAConfig | None = None,
) -> TrainingPlan:
    """The plan of training ``checkpoint`` with ``cfg`` for ``steps`` steps of ``batch_size``
    sequences of ``seq_len`` tokens on ``world_size`` processes (``teacher``: token KD's online teacher,
    held whole on every rank; ``lora``: the phase's LoRA / QLoRA settings, trained on the hf engine).
    Reads config.json files only. ``key`` names ``checkpoint`` in errors."""
    from moe_adapt.engines import resolve_engine_name

    config = read_config(checkpoint, key)
    params = count_params(config)
    adapters = None
    if lora is not None and lora.enabled:
        from moe_adapt.engines.lora import refuse_megatron

        if cfg.name == "megatron":
            refuse_megatron(lora)
        engine = "hf"  # engine=auto: LoRA is the hf engine's
        adapters = count_adapters(config, lora)
    else:
        engine = resolve_engine_name(cfg.name, checkpoint)
    layout = resolve_layout(cfg, engine, world_size)
    if adapters is not None and layout.parallel == "fsdp2":
        invalid(
            "engine.parallel", "fsdp2", "LoRA trains with engine.parallel=ddp or none (its base is frozen)"
        )
    memory = memory_per_rank(params, cfg.dtype, layout, adapters)
    b = _DTYPE_BYTES[cfg.dtype]
    if cfg.l2_anchor_coef > 0:  # a copy of what trains (with LoRA: the fp32 adapters)
        memory.extra["l2 anchor"] = adapters.trainable * 4 if adapters is not None else memory.weights
    frozen = {"kl reference": cfg.reference if cfg.kl_anchor_coef > 0 else None, "kd teacher": teacher}
    for what, path in frozen.items():
        if path and Path(path, "config.json").is_file():  # a hub name or a missing folder: not counted
            memory.extra[what] = count_params(read_config(path, what)).total * b
    dp = max(world_size // layout.tensor_parallel, 1) if engine == "megatron" else max(world_size, 1)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    logits = -(-batch_size // dp) * seq_len * vocab * 4
    return TrainingPlan(
        name, params, cfg.dtype, layout, memory, steps, batch_size, seq_len, logits, adapters=adapters
    )


def announce(
    plan: TrainingPlan, *, check: bool, main: bool = True, device: str | None = None
) -> TrainingPlan:
    """Check ``plan`` against ``device`` (default: CUDA when present, else the CPU, where the engines
    train; see :meth:`TrainingPlan.check`) and log it as a block of lines (on the main process, also
    before a refusal); returns it."""
    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        plan.check(device, enabled=check)
    finally:
        if main:
            log.info("%s", plan.describe())
    if not check and main and plan.available is not None and plan.needed > plan.available:
        log.warning(
            "%s: the plan needs %s but %s has %s; training anyway (engine.check_memory=false)",
            plan.name,
            _gib(plan.needed),
            plan.device,
            _gib(plan.available),
        )
    return plan


def _gib(n: int | None) -> str:
    if n is None:
        return "unknown"
    for unit, scale in (("GiB", GiB), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


def _count(n: int) -> str:
    for unit, scale in (("P", 10**15), ("T", 10**12), ("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)
