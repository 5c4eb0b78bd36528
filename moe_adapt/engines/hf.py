"""The ``hf`` training engine: a transformers causal LM, AdamW, warmup + cosine LR, one process.

The engine owns forward, backward and the optimizer step; the trainer loop, the data and the optional
features (checkpointing, metrics, NaN guard) live in :mod:`moe_adapt.train`. Loss terms come from
:mod:`moe_adapt.engines.objectives`:

    loss = lm + aux_loss_coef · load_balancing + z_loss_coef · router_z
              + l2_anchor_coef · ||θ − θ0||² + kl_anchor_coef · KL(p_ref ‖ p)

The router terms are used only for MoE models (config with ``num_experts`` or ``num_local_experts``);
the anchors only when their coefficient is > 0. A step whose loss or gradient norm is not finite is
not applied (gradients are dropped, weights and optimizer state untouched) and reports
``skipped=1.0``; the LR schedule still advances, so it stays aligned with the data.

With ``kd`` settings the language-model term is replaced by token-level distillation
(:func:`moe_adapt.engines.objectives.token_kd_loss`) against an online teacher or stored top-k.

Several processes (torchrun; :mod:`moe_adapt.distributed`): ``engine.parallel`` picks DDP
(every rank holds the whole model, gradients are averaged) or FSDP2 (``fully_shard`` per decoder
layer: parameters, gradients and optimizer state are sharded). Every rank receives the same global
batch and trains on its own contiguous slice of rows; the loss each rank back-propagates is its share
of the global batch's loss (token-weighted, with the load-balancing loss counted over the global
batch), so a step on W processes equals a step on one, and every reported metric is the global
batch's value. ``state_dict`` is rank-independent (whole tensors, the unwrapped parameter names), so a
checkpoint written by rank 0 resumes on any number of processes.

Shape legend: ``B`` sequences, ``T`` input positions (seq_len), ``T1`` = T + 1 packed tokens,
``V`` vocabulary, ``E`` experts, ``L`` MoE layers.
"""

from __future__ import annotations

import inspect
import logging
import math
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch

from moe_adapt import distributed
from moe_adapt.checkpoint import router_bias as bias_file
from moe_adapt.checkpoint.router_bias import RouterBias
from moe_adapt.distributed import DistContext
from moe_adapt.engines import data_parallel, objectives, router_health
from moe_adapt.errors import CheckpointError, MoEAdaptConfigError, MoEAdaptError, invalid
from moe_adapt.fs import atomic_dir

log = logging.getLogger(__name__)

STATE_VERSION = 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PARALLEL = ("auto", "none", "ddp", "fsdp2")
# files of an HF checkpoint folder that are not weights or model config: copied by save_hf
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "added_tokens.json",
)


def _fail(key: str, value: object, allowed: str) -> NoReturn:
    invalid(f"engine.{key}", value, allowed)


@dataclass
class HFEngineConfig:
    """Settings of the ``hf`` engine: optimizer, LR schedule and loss coefficients."""

    lr: float = 3e-4
    """Peak learning rate (reached at the end of warmup)."""

    min_lr_ratio: float = 0.1
    """Learning rate at the end of the cosine decay, as a fraction of lr. In [0, 1]."""

    warmup_steps: int = 0
    """Linear warmup from 0 to lr over this many steps."""

    decay_steps: int | None = None
    """Steps from the start of training to the end of the cosine decay (usually the trainer's
    max_steps); null keeps lr constant after warmup."""

    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas."""

    eps: float = 1e-8
    """AdamW epsilon."""

    weight_decay: float = 0.1
    """AdamW decoupled weight decay (applied to matrices only, not to norms, biases or routers' 1-d
    parameters)."""

    grad_clip: float | None = 1.0
    """Clip the global gradient L2 norm to this value; null: no clipping (the norm is still reported)."""

    aux_loss_coef: float = 1e-2
    """Weight of the Switch load-balancing loss (MoE models only)."""

    z_loss_coef: float = 1e-3
    """Weight of the router z-loss (MoE models only)."""

    l2_anchor_coef: float = 0.0
    """Weight of Σ||θ − θ0||² to the weights the engine started from (0: off)."""

    kl_anchor_coef: float = 0.0
    """Weight of KL(p_ref ‖ p) to the reference model's next-token distribution (0: off; needs
    reference)."""

    reference: str | None = None
    """HF checkpoint folder of the frozen reference model for the KL anchor."""

    dtype: str = "float32"
    """Parameter dtype: float32, bfloat16 or float16."""

    bias_update_rate: float = 0.0
    """Aux-loss-free load balancing (DeepSeek-V3): after each applied step every router's per-expert
    selection bias moves toward balance, b_e += rate · sign(mean_load − load_e), in softmax-probability
    units (1e-3 for long runs; 0: off). MoE only (Qwen3-MoE, Qwen2-MoE, Mixtral). The bias is saved
    beside the exported weights as router_bias.json (plain transformers routes without it)."""

    capacity_factor: float | None = None
    """For the moe/dropped_* metrics only: count the top-k assignments a router with this capacity
    factor would drop (capacity = ceil(tokens·top_k/E·factor)). This engine is dropless; null logs 0,
    so both engines log the same keys."""

    parallel: str = "auto"
    """How the engine spreads over several processes (torchrun): ddp (each process holds the whole
    model; gradients are averaged), fsdp2 (parameters, gradients and optimizer state sharded over the
    processes, one FSDP unit per decoder layer: models that do not fit one device), none (one process)
    or auto (ddp with several processes, none with one). With one process every value trains as none."""

    expert_parallel: int = 1
    """megatron engine only: processes that split each MoE layer's experts (expert parallel, alltoall
    dispatcher); the number of processes must be a multiple of it and the experts divide over it. The
    hf engine does not shard experts: 1 there."""

    tensor_parallel: int = 1
    """megatron engine only: processes that split every attention, dense-MLP and embedding matrix
    (megatron's tensor parallel, with sequence parallel; experts stay whole, expert tensor parallel 1).
    The number of processes must be a multiple of it; it must divide the attention key/value heads,
    the vocabulary and the dense FFN size, and mixture.seq_len. Not combined with l2_anchor_coef.
    The hf engine does not shard this way: 1 there."""

    distributed_optimizer: bool = False
    """megatron engine only: megatron-core's DistributedOptimizer (ZeRO-1). The optimizer state (fp32
    main parameters and Adam moments) is sharded over the data-parallel ranks; gradients are
    reduce-scattered and the updated parameters all-gathered. Same metrics and skip rule as false
    (torch AdamW on every rank), and in float32 the same update (bfloat16/float16 parameters get fp32
    master copies). Its checkpoints resume at the same expert_parallel. The hf engine refuses true: it
    shards with parallel=fsdp2."""

    grouped_gemm: bool = False
    """megatron engine only: build each MoE layer's experts as megatron-core's GroupedMLP (one grouped
    GEMM per projection over all local experts) instead of SequentialMLP (a loop over the experts).
    Needs dtype=bfloat16 and the grouped_gemm package (CUDA). The hf engine's experts already run
    transformers' grouped_mm; it ignores this setting."""

    def __post_init__(self) -> None:
        if not (self.lr > 0 and math.isfinite(self.lr)):
            _fail("lr", self.lr, "must be a finite number > 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            _fail("min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        if self.warmup_steps < 0:
            _fail("warmup_steps", self.warmup_steps, "must be >= 0")
        if self.decay_steps is not None and self.decay_steps <= self.warmup_steps:
            _fail("decay_steps", self.decay_steps, f"must be > warmup_steps={self.warmup_steps}, or null")
        if self.grad_clip is not None and self.grad_clip <= 0:
            _fail("grad_clip", self.grad_clip, "must be > 0, or null for no clipping")
        for key in ("aux_loss_coef", "z_loss_coef", "l2_anchor_coef", "kl_anchor_coef", "weight_decay"):
            if getattr(self, key) < 0:
                _fail(key, getattr(self, key), "must be >= 0")
        if self.kl_anchor_coef > 0 and not self.reference:
            _fail("reference", self.reference, "set a reference checkpoint folder when kl_anchor_coef > 0")
        if self.expert_parallel < 1:
            _fail("expert_parallel", self.expert_parallel, "must be >= 1")
        if self.tensor_parallel < 1:
            _fail("tensor_parallel", self.tensor_parallel, "must be >= 1")
        if self.dtype not in DTYPES:
            _fail("dtype", self.dtype, f"choose one of {', '.join(DTYPES)}")
        if not (self.bias_update_rate >= 0 and math.isfinite(self.bias_update_rate)):
            _fail("bias_update_rate", self.bias_update_rate, "must be a finite number >= 0 (0: off)")
        if self.capacity_factor is not None and not (
            self.capacity_factor > 0 and math.isfinite(self.capacity_factor)
        ):
            _fail("capacity_factor", self.capacity_factor, "must be a finite number > 0, or null (dropless)")
        if self.parallel not in PARALLEL:
            _fail("parallel", self.parallel, f"choose one of {', '.join(PARALLEL)}")
        if not isinstance(self.grouped_gemm, bool):
            _fail("grouped_gemm", self.grouped_gemm, "must be true or false")
        if not isinstance(self.distributed_optimizer, bool):
            _fail("distributed_optimizer", self.distributed_optimizer, "must be true or false")


def lr_at(cfg: HFEngineConfig, step: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then cosine to min_lr_ratio·lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.decay_steps is None:
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / (cfg.decay_steps - cfg.warmup_steps))
    floor = cfg.min_lr_ratio
    return cfg.lr * (floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def scheduled_lr(cfg: HFEngineConfig, step: int, multiplier: Callable[[int], float] | None) -> float:
    """:func:`lr_at` times ``multiplier(step)`` (e.g. a curriculum's re-warm factor), for both engines."""
    return lr_at(cfg, step) * (multiplier(step) if multiplier is not None else 1.0)


def build_adamw(
    decay: list[torch.Tensor], no_decay: list[torch.Tensor], cfg: HFEngineConfig, device: torch.device
) -> torch.optim.AdamW:
    """AdamW with weight decay on ``decay`` (matrices) only, the schedule's first LR and cfg's betas/eps;
    both engines build their optimizer here, so they update the same way."""
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr_at(cfg, 0),
        betas=cfg.betas,
        eps=cfg.eps,
        fused=device.type == "cuda",
    )


def load_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32, *, router_bias: bool = True) -> Any:
    """A transformers causal LM from an HF checkpoint folder (safetensors only, no remote code).

    With ``router_bias`` the router biases of aux-loss-free balancing are re-installed when the folder
    has ``router_bias.json`` (the engines read that file themselves and pass False).
    """
    from transformers import AutoModelForCausalLM

    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} is not an HF checkpoint folder (no config.json)")
    if not any(folder.glob("*.safetensors")):
        raise CheckpointError(
            f"{folder} holds no .safetensors weights (only safetensors checkpoints are read)"
        )
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=dtype, use_safetensors=True, trust_remote_code=False
    )
    if router_bias:
        bias_file.load_router_bias(model, path)
    return model


def load_teacher(teacher: str | Path | Any, dtype: torch.dtype, device: torch.device, vocab_size: int) -> Any:
    """The frozen online teacher for token KD, on ``device``: an HF checkpoint folder (read with
    :func:`load_causal_lm`) or a loaded model. It must share the student's ``vocab_size``."""
    model = load_causal_lm(teacher, dtype) if isinstance(teacher, str | Path) else teacher
    model = model.to(device)
    model.eval().requires_grad_(False)
    teacher_vocab = int(model.config.vocab_size)
    if teacher_vocab != vocab_size:
        raise MoEAdaptError(
            f"token KD needs the teacher and the student to share a tokenizer: the teacher has "
            f"{teacher_vocab} vocabulary entries, the student {vocab_size}"
        )
    return model


def frozen_models(
    cfg: HFEngineConfig,
    kd: objectives.KDSettings | None,
    teacher: str | Path | Any,
    dtype: torch.dtype,
    device: torch.device,
    vocab_size: int,
) -> tuple[Any, Any]:
    """The frozen models an engine runs beside the one it trains: the KL anchor's reference (when
    ``cfg.kl_anchor_coef > 0``) and token KD's online teacher (:func:`load_teacher`); None for
    each that is not used."""
    reference = None
    if cfg.kl_anchor_coef > 0:
        assert cfg.reference is not None  # checked by the config
        reference = load_causal_lm(cfg.reference, dtype).to(device).eval()
        reference.requires_grad_(False)
    if teacher is not None and kd is None:
        raise MoEAdaptError("a teacher model was given without KD settings")
    return reference, (load_teacher(teacher, dtype, device, vocab_size) if teacher is not None else None)


def token_kd_terms(
    batch: Any,
    logits_BTV: torch.Tensor,
    labels_BT: torch.Tensor,
    kd: objectives.KDSettings,
    *,
    teacher: Any = None,
    teacher_inputs: dict[str, Any] | None = None,
    device: torch.device,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Token-KD terms of one batch, for either engine: ``kd_loss`` (what replaces the LM term),
    ``kd_ce``, ``kd_kl``, ``kd_selected`` and ``kd_selected/<lang>``; and, per language of the batch,
    how many label positions counted (the weights of ``kd_selected/<lang>`` across ranks).

    The teacher's distribution comes from ``teacher`` (an HF causal LM called with ``teacher_inputs``,
    no gradient) or, without one, from the batch's stored ``topk_ids``/``topk_logp``. ``labels_BT`` is
    -100 where nothing counts.
    """
    num_pos, vocab = labels_BT.numel(), logits_BTV.shape[-1]
    target: torch.Tensor | objectives.TeacherTopK
    if teacher is not None:
        with torch.no_grad():
            target = teacher(**(teacher_inputs or {})).logits.reshape(num_pos, -1)
    else:
        ids = batch_field(batch, "topk_ids", torch.long, device)
        logp = batch_field(batch, "topk_logp", torch.float32, device)
        if ids is None or logp is None:
            raise MoEAdaptError(
                "token KD without an online teacher needs the teacher's stored top-k log-probabilities "
                "in every batch (generate them with distill.generate.store_topk > 0)"
            )
        target = objectives.TeacherTopK(ids.reshape(num_pos, -1), logp.reshape(num_pos, -1))
    mask_N = (labels_BT != -100).reshape(-1)
    out = objectives.token_kd_loss(
        logits_BTV.reshape(num_pos, vocab),
        labels_BT.reshape(-1),
        mask_N,
        target,
        alpha=kd.alpha,
        temperature=kd.temperature,
        direction=kd.direction,
        theta=kd.theta,
    )
    selected_N = out["selected_N"].float()
    terms = {
        "kd_loss": out["loss"],
        "kd_ce": out["ce"],
        "kd_kl": out["kl"],
        "kd_selected": selected_N.sum() / mask_N.sum().clamp(min=1),
    }
    counted: dict[str, float] = {}
    lang_ids = batch_field(batch, "lang_ids", torch.long, device)
    for i, lang in enumerate(getattr(batch, "langs", None) or ()):
        if lang_ids is None:
            break
        in_lang_N = mask_N & (lang_ids.reshape(-1) == i)
        counted[lang] = float(in_lang_N.sum())
        if bool(in_lang_N.any()):
            terms[f"kd_selected/{lang}"] = (selected_N * in_lang_N).sum() / in_lang_N.sum()
    return terms, counted


def resolve_parallel(parallel: str, ctx: DistContext) -> str:
    """``engine.parallel`` for ``ctx``'s number of processes: none, ddp or fsdp2.

    Raises:
        MoEAdaptConfigError: none with several processes (each would train its own copy).
    """
    if not ctx.is_distributed:
        if parallel in ("ddp", "fsdp2"):
            log.warning(
                "engine.parallel=%s: there is one process, so it trains as engine.parallel=none", parallel
            )
        return "none"
    if parallel == "none":
        raise MoEAdaptConfigError(
            f"engine.parallel='none' is invalid with {ctx.world_size} processes: each would train its own "
            "copy of the model on the whole batch; use auto, ddp or fsdp2, or start one process"
        )
    return "ddp" if parallel == "auto" else parallel


def _decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The decoder layers of an HF causal LM (``model.model.layers``): FSDP2's units."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, torch.nn.ModuleList) or len(layers) == 0:
        raise MoEAdaptConfigError(
            f"engine.parallel='fsdp2' is invalid for {type(model).__name__}: its decoder layers are not at "
            "model.model.layers; use engine.parallel=ddp"
        )
    return list(layers)


def batch_tokens(
    tokens_BT1: torch.Tensor | np.ndarray, vocab_size: int, device: torch.device
) -> torch.Tensor:
    """``tokens_BT1`` as a long tensor on ``device``, checked: ``[batch, seq_len + 1]`` ids below
    ``vocab_size`` (both engines read batches through this)."""
    tokens = torch.as_tensor(tokens_BT1).to(device=device, dtype=torch.long)
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise MoEAdaptError(
            f"tokens must be [batch, seq_len + 1] with seq_len >= 1, got {tuple(tokens.shape)}"
        )
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= vocab_size:
        raise MoEAdaptError(
            f"token ids span [{lo}, {hi}] but the model's vocab_size is {vocab_size}: "
            "the shards were tokenized with another tokenizer"
        )
    return tokens


def batch_field(batch: Any, name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """Optional field ``name`` of a batch (see :class:`moe_adapt.train.trainer.Batch`) as a tensor."""
    value = getattr(batch, name, None)
    return None if value is None else torch.as_tensor(value).to(device=device, dtype=dtype)


def _moe_shape(config: Any) -> tuple[int, int] | None:
    """``(num_experts, top_k)`` of an MoE config, None for a dense model."""
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    top_k = getattr(config, "num_experts_per_tok", None)
    if experts and top_k:
        return int(experts), int(top_k)
    return None


class _WholeForward(torch.nn.Module):
    """Calls ``model`` as a whole; shows its ``config`` and parameters but not its sub-modules' accessors."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.inner = model
        self.config = model.config

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.inner(*args, **kwargs)


class HFEngine:
    """Trains a transformers causal LM loaded from an HF checkpoint folder on one device, or on one
    device per process with DDP or FSDP2 (``cfg.parallel``; the processes are ``dist``).

    ``lr_multiplier`` (e.g. :meth:`moe_adapt.cpt.curriculum.Curriculum.lr_factor`) scales the
    scheduled learning rate of each step; it must be a pure function of the step so resume is exact.
    ``device`` defaults to the CPU with one process and to ``dist.device`` (``cuda:LOCAL_RANK`` or the
    CPU) with several. With several processes every rank must call :meth:`step`, :meth:`state_dict`
    and :meth:`save_hf` in the same order (they are collective); only rank 0 writes files.
    """

    def __init__(
        self,
        checkpoint: str | Path,
        cfg: HFEngineConfig | None = None,
        *,
        device: str | torch.device | None = None,
        lr_multiplier: Callable[[int], float] | None = None,
        kd: objectives.KDSettings | None = None,
        teacher: Any = None,
        dist: DistContext | None = None,
    ) -> None:
        self.cfg = cfg or HFEngineConfig()
        if self.cfg.distributed_optimizer:
            _fail(
                "distributed_optimizer",
                True,
                "megatron's DistributedOptimizer belongs to the megatron engine (engine=megatron); the hf "
                "engine shards optimizer state with engine.parallel=fsdp2",
            )
        self.dist = dist or distributed.current()
        """The processes training together (:func:`moe_adapt.distributed.current` by default)."""
        self.parallel = resolve_parallel(self.cfg.parallel, self.dist)
        """none, ddp or fsdp2: ``cfg.parallel`` resolved for the number of processes."""
        self.source = Path(checkpoint)
        if device is None:
            device = self.dist.device if self.parallel != "none" else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:  # "cuda": the current device
            self.device = torch.device("cuda", torch.cuda.current_device())
        dtype = DTYPES[self.cfg.dtype]
        self.model: Any = load_causal_lm(self.source, dtype, router_bias=False)
        """The transformers ``PreTrainedModel`` being trained (not the DDP wrapper; under FSDP2 its
        parameters are sharded DTensors)."""
        if self.parallel != "fsdp2":  # fully_shard moves each rank's shards to the device itself
            self.model.to(self.device)
        self.model.train()
        self.lr_multiplier = lr_multiplier
        self.moe = _moe_shape(self.model.config)
        self.vocab_size = int(self.model.config.vocab_size)
        if self.cfg.bias_update_rate > 0 and self.moe is None:
            _fail(
                "bias_update_rate",
                self.cfg.bias_update_rate,
                f"needs an MoE model; {type(self.model).__name__} is dense",
            )
        # biases saved with the checkpoint route as they did in training; they move only when updated
        self.router_bias: RouterBias | None = bias_file.load_router_bias(
            self.model, self.source, self.cfg.bias_update_rate or 1e-3
        )
        if self.router_bias is None and self.cfg.bias_update_rate > 0:
            self.router_bias = RouterBias.install(self.model, self.cfg.bias_update_rate)
        self._forward_model: Any = self._wrap()  # what the training forward calls (the DDP wrapper)
        self._load_LE: torch.Tensor | None = None  # expert load of the last forward (metrics, bias update)
        self._routed_tokens = 0
        self._counted = (0.0, 0.0)  # label positions that count: this rank's and the global batch's
        self._lang_counted: dict[str, float] = {}  # per language, for kd_selected/<lang>
        self.steps = 0  # optimizer steps taken or skipped (the LR schedule position)
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self._params = [p for _, p in named]
        decay = [p for p in self._params if p.dim() >= 2]
        no_decay = [p for p in self._params if p.dim() < 2]
        # parameter names in the optimizer's order: its state is keyed by position in this list
        self._param_names = [n for n, p in named if p.dim() >= 2] + [n for n, p in named if p.dim() < 2]
        self.optimizer = build_adamw(decay, no_decay, self.cfg, self.device)
        self._anchor: list[torch.Tensor] | None = None
        if self.cfg.l2_anchor_coef > 0:
            self._anchor = [p.detach().clone() for p in self._params]
        self.kd = kd
        """Token-level distillation settings; None trains on plain next-token cross-entropy."""
        self.reference, self.teacher = frozen_models(
            self.cfg, kd, teacher, dtype, self.device, self.vocab_size
        )
        """The KL anchor's reference model and token KD's online teacher (None: not used; without a
        teacher the top-k log-probabilities come with each batch)."""

    def _wrap(self) -> Any:
        """DDP around the model, or FSDP2's ``fully_shard`` on each decoder layer and the root (in
        place); the model itself with one process."""
        if self.parallel == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            # buffers (rotary tables, router biases) are kept equal on every rank by construction, so
            # they are not re-broadcast before each forward (torch 2.13 renamed the switch)
            params = inspect.signature(DistributedDataParallel).parameters
            switch = "forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers"
            no_sync: dict[str, Any] = {switch: False}
            return DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None, **no_sync
            )
        if self.parallel == "fsdp2":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(self.device.type, (self.dist.world_size,))
            for layer in _decoder_layers(self.model):
                fully_shard(layer, mesh=mesh)
            fully_shard(self.model, mesh=mesh)
        return self.model

    @property
    def eval_model(self) -> Any:
        """The module to evaluate with (held-out loss): the model itself; under FSDP2 a wrapper without
        the decoder/head accessors, so evaluation runs the whole forward of the root module, the only
        call that gathers every unit's shards (calling the decoder or the head alone would not)."""
        return _WholeForward(self.model) if self.parallel == "fsdp2" else self.model

    # -- forward -------------------------------------------------------------------------------
    def _tokens(self, tokens_BT1: torch.Tensor | np.ndarray) -> torch.Tensor:
        return batch_tokens(tokens_BT1, self.vocab_size, self.device)

    def _field(self, batch: Any, name: str, dtype: torch.dtype) -> torch.Tensor | None:
        return batch_field(batch, name, dtype, self.device)

    def forward_loss(self, batch: Any) -> dict[str, torch.Tensor]:
        """Loss terms of one batch; ``loss`` is their weighted sum.

        ``batch`` is ``tokens_BT1`` (packed sequences: inputs ``[:, :-1]``, labels ``[:, 1:]``) or an
        object with that as ``.tokens`` and optionally (see :class:`moe_adapt.train.trainer.Batch`)
        ``loss_mask`` (which label positions count), ``position_ids`` (restarting at 0 where a packed
        example starts, so attention stays inside each example), ``lang_ids``/``langs`` and the teacher's
        ``topk_ids``/``topk_logp`` for offline KD. Keys: ``loss``, ``lm_loss``; with KD ``kd_ce``,
        ``kd_kl``, ``kd_selected`` and ``kd_selected/<lang>``; for MoE models ``aux_loss`` and
        ``z_loss``; ``l2_anchor`` / ``kl_anchor`` when enabled.

        With several processes ``batch`` is this rank's rows and the call is collective; ``loss`` is
        then this rank's share of the global batch's loss (what it back-propagates), the other terms
        are this rank's own values (:meth:`step` reports the global ones).
        """
        tokens_BT1 = self._tokens(getattr(batch, "tokens", batch))
        inputs_BT, labels_BT = tokens_BT1[:, :-1], tokens_BT1[:, 1:]
        mask_BT = self._field(batch, "loss_mask", torch.bool)
        position_ids_BT = self._field(batch, "position_ids", torch.long)
        if mask_BT is not None:
            labels_BT = labels_BT.masked_fill(~mask_BT, -100)
        shared = self.parallel != "none"
        if shared:
            counted = (labels_BT != -100).sum().to(torch.float64).reshape(1)
            self._counted = (float(counted), float(distributed.all_reduce_sum(counted.clone(), self.dist)))
        self._lang_counted = {}
        kwargs: dict[str, Any] = {"input_ids": inputs_BT, "use_cache": False}
        if position_ids_BT is not None:
            kwargs["position_ids"] = position_ids_BT
        if self.moe is not None:
            kwargs["output_router_logits"] = True
        out = self._forward_model(**kwargs)
        logits_BTV = out.logits
        terms: dict[str, torch.Tensor] = {"lm_loss": objectives.lm_cross_entropy(logits_BTV, labels_BT)}
        loss = terms["lm_loss"]
        if self.kd is not None:
            kd_terms, self._lang_counted = token_kd_terms(
                batch,
                logits_BTV,
                labels_BT,
                self.kd,
                teacher=self.teacher,
                teacher_inputs={k: v for k, v in kwargs.items() if k != "output_router_logits"},
                device=self.device,
            )
            terms.update(kd_terms)
            loss = kd_terms["kd_loss"]
        if shared:
            loss = data_parallel.share_of_global(loss, logits_BTV, *self._counted, self.dist)
        if self.moe is not None:
            router_LTE = [x for x in (getattr(out, "router_logits", None) or ()) if x is not None]
            if not router_LTE:
                raise MoEAdaptError(
                    f"{type(self.model).__name__} returned no router logits with output_router_logits=True"
                )
            bias_LE = self.router_bias.bias_LE() if self.router_bias is not None else None
            self._load_LE = router_health.expert_load(router_LTE, self.moe[1], bias_LE)
            self._routed_tokens = router_LTE[0].shape[0]
            terms["aux_loss"] = (
                data_parallel.global_load_balancing_loss(router_LTE, self.moe[1], self.dist)
                if shared
                else objectives.load_balancing_loss(router_LTE, self.moe[1])
            )
            terms["z_loss"] = objectives.router_z_loss(router_LTE)
            loss = loss + self.cfg.aux_loss_coef * terms["aux_loss"] + self.cfg.z_loss_coef * terms["z_loss"]
        if self._anchor is not None:
            terms["l2_anchor"] = (
                self._sharded_l2_anchor()  # value only: step() adds its gradient to the sharded grads
                if self.parallel == "fsdp2"
                else objectives.l2_anchor_loss(self._params, self._anchor)
            )
            loss = loss + self.cfg.l2_anchor_coef * terms["l2_anchor"]
        if self.reference is not None:
            with torch.no_grad():
                ref_kwargs = {k: v for k, v in kwargs.items() if k != "output_router_logits"}
                ref_logits_BTV = self.reference(**ref_kwargs).logits
            terms["kl_anchor"] = objectives.kl_anchor_loss(logits_BTV, ref_logits_BTV)
            loss = loss + self.cfg.kl_anchor_coef * terms["kl_anchor"]
        terms["loss"] = loss
        return terms

    def _sharded_l2_anchor(self) -> torch.Tensor:
        """``Σ ||θ − θ0||²`` over FSDP2-sharded parameters: local shards, summed over ranks (no grad)."""
        with torch.no_grad():
            local = torch.zeros(1, dtype=torch.float64, device=self.device)
            shards: list[Any] = [*self._params, *(self._anchor or ())]  # DTensors
            half = len(self._params)
            for theta, theta0 in zip(shards[:half], shards[half:], strict=True):
                local += (theta.to_local().double() - theta0.to_local().double()).pow(2).sum()
            return distributed.all_reduce_sum(local, self.dist).float().reshape(())

    # -- step ----------------------------------------------------------------------------------
    def current_lr(self) -> float:
        """Learning rate the next step uses (schedule times ``lr_multiplier``)."""
        return scheduled_lr(self.cfg, self.steps, self.lr_multiplier)

    def step(self, batch: Any) -> dict[str, float]:
        """Forward, backward, clip and apply one optimizer step on ``batch`` (see :meth:`forward_loss`);
        returns float metrics.

        Metrics: every loss term, ``grad_norm`` (before clipping), ``lr``, ``tokens`` (label positions
        that count) and ``skipped`` (1.0 when the loss or gradient norm was not finite and the update
        was dropped).

        With several processes ``batch`` is the global batch (the same on every rank; each trains on
        its own rows) and the metrics are the global batch's, identical on every rank, so every rank
        takes the same skip decision.
        """
        lr = self.current_lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        if self.parallel != "none":
            metrics, skipped, grad_norm = self._shared_step(batch, lr)
        else:
            terms = self.forward_loss(batch)
            metrics = {k: float(v.detach()) for k, v in terms.items()}
            mask = getattr(batch, "loss_mask", None)
            tokens = (
                torch.as_tensor(getattr(batch, "tokens", batch))[:, 1:].numel()
                if mask is None
                else mask.sum()
            )
            metrics.update(lr=lr, tokens=float(tokens))
            skipped = not math.isfinite(metrics["loss"])
            grad_norm = float("nan")
            if not skipped:
                terms["loss"].backward()
                grad_norm = self._clip_grad_norm()
                skipped = not math.isfinite(grad_norm)
        if skipped:
            if self.dist.is_main:
                log.warning("step %d: non-finite loss or gradient norm; update skipped", self.steps)
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self._load_LE is not None:
            assert self.moe is not None
            load_LE, self._load_LE = self._load_LE, None
            dropped_L = router_health.dropped_tokens(
                load_LE, self.cfg.capacity_factor, self._routed_tokens, self.moe[1]
            )
            metrics.update(router_health.load_metrics(load_LE, dropped_L))
            if self.router_bias is not None and self.cfg.bias_update_rate > 0 and not skipped:
                self.router_bias.update(load_LE)
        self.steps += 1
        metrics.update(grad_norm=grad_norm, skipped=float(skipped))
        return metrics

    def _clip_grad_norm(self) -> float:
        """Clip the global gradient norm to ``grad_clip``; returns the norm before clipping."""
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip is not None else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self._params, max_norm, foreach=False)
        full = getattr(norm, "full_tensor", None)  # a DTensor under FSDP2
        return float(full() if full is not None else norm)

    def _shared_step(self, batch: Any, lr: float) -> tuple[dict[str, float], bool, float]:
        """Forward and backward of this rank's rows; the global batch's metrics, skip decision and
        gradient norm (identical on every rank)."""
        local = data_parallel.rows_of(batch, self.dist)
        terms = self.forward_loss(local)
        # every rank joins the gradient all-reduce, even with a non-finite loss; the step is then skipped
        terms["loss"].backward()
        if self.parallel == "fsdp2" and self._anchor is not None:
            with torch.no_grad():  # the L2 anchor's gradient on each rank's shards (not averaged over ranks)
                for theta, theta0 in zip(self._params, self._anchor, strict=True):
                    step = (theta.detach() - theta0) * (2.0 * self.cfg.l2_anchor_coef)
                    theta.grad = step if theta.grad is None else theta.grad.add_(step)
        grad_norm = self._clip_grad_norm()
        values = {k: float(v.detach()) for k, v in terms.items()}
        keys = sorted({*values, *(f"kd_selected/{lang}" for lang in getattr(local, "langs", None) or ())})
        extra = [torch.tensor([0.0 if math.isfinite(grad_norm) else 1.0], dtype=torch.float64)]
        if self._load_LE is not None:
            extra.append(self._load_LE.detach().reshape(-1).to(device="cpu", dtype=torch.float64))
        means, summed = data_parallel.weighted_mean(
            values,
            data_parallel.metric_weights(terms, self._counted[0], self._lang_counted),
            keys,
            self.dist,
            extra=torch.cat(extra),
        )
        assert summed is not None
        if self._load_LE is not None:  # the global batch's expert load
            self._load_LE = summed[1:].round().long().reshape(self._load_LE.shape).to(self._load_LE.device)
            self._routed_tokens *= self.dist.world_size
        # the terms in forward_loss's order; a term nothing counted for is NaN, as with one process
        metrics = {k: means.get(k, float("nan")) for k in values}
        metrics.update({k: v for k, v in means.items() if k not in metrics})
        metrics.update(lr=lr, tokens=self._counted[1])
        loss_finite = math.isfinite(metrics["loss"])
        skipped = not loss_finite or float(summed[0]) > 0
        return metrics, skipped, grad_norm if loss_finite else float("nan")

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Model, optimizer, schedule position and RNG: nested dicts of tensors and JSON values.

        Tensors are cloned (safetensors refuses tensors sharing memory, e.g. tied embeddings); the
        optimizer's per-parameter state is keyed by the parameter index as a string. The state is the
        same whatever the number of processes (the unwrapped model's names, whole tensors), so a
        checkpoint resumes on any number. Under FSDP2 the call is collective (the shards are gathered)
        and only rank 0 receives the model and optimizer entries; the other ranks get them empty.
        """
        return {
            "version": STATE_VERSION,
            "model": self._model_state(),
            "optimizer": self._optimizer_state(),
            "steps": self.steps,
            "rng": {"torch": torch.get_rng_state()},
            **({"router_bias": self.router_bias.state_dict()} if self.router_bias is not None else {}),
        }

    def _model_state(self) -> dict[str, torch.Tensor]:
        if self.parallel == "fsdp2":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            full = StateDictOptions(full_state_dict=True, cpu_offload=True)
            gathered: Any = get_model_state_dict(self.model, options=full)
            return dict(gathered)
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def _optimizer_state(self) -> dict[str, Any]:
        if self.parallel == "fsdp2":
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

            full = StateDictOptions(full_state_dict=True, cpu_offload=True)
            by_name: Any = get_optimizer_state_dict(self.model, self.optimizer, options=full)
            if not by_name:  # ranks other than 0
                return {"state": {}, "param_groups": []}
            index = {name: i for i, name in enumerate(self._param_names)}
            return {
                "state": {str(index[name]): dict(st) for name, st in by_name["state"].items()},
                "param_groups": [
                    {**group, "params": [index[name] for name in group["params"]]}
                    for group in by_name["param_groups"]
                ],
            }
        opt = self.optimizer.state_dict()
        return {
            "state": {str(i): dict(st) for i, st in opt["state"].items()},
            "param_groups": opt["param_groups"],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` into an engine built from the same checkpoint and config, with
        any number of processes (each rank loads the whole state; collective under FSDP2)."""
        if state.get("version") != STATE_VERSION:
            raise CheckpointError(f"engine state version {state.get('version')!r} is not {STATE_VERSION}")
        opt = state["optimizer"]
        if self.parallel == "fsdp2":
            self._load_sharded(state["model"], opt)
        else:
            try:
                self.model.load_state_dict(state["model"], strict=True)
            except RuntimeError as err:
                raise CheckpointError(f"checkpoint does not fit {type(self.model).__name__}: {err}") from None
            self.optimizer.load_state_dict(
                {"state": {int(i): s for i, s in opt["state"].items()}, "param_groups": opt["param_groups"]}
            )
        if (self.router_bias is not None) != ("router_bias" in state):
            raise CheckpointError(
                "the checkpoint's router bias does not match engine.bias_update_rate "
                "(resume with the run's engine.bias_update_rate)"
            )
        if self.router_bias is not None:
            self.router_bias.load_state_dict(state["router_bias"])
        self.steps = int(state["steps"])
        torch.set_rng_state(state["rng"]["torch"].to(torch.uint8))

    def _load_sharded(self, model_state: dict[str, Any], opt: dict[str, Any]) -> None:
        """FSDP2: every rank keeps its shards of the whole model and optimizer state."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        full = StateDictOptions(full_state_dict=True)
        try:
            set_model_state_dict(self.model, model_state, options=full)
            names = self._param_names
            by_name: dict[str, Any] = {
                "state": {names[int(i)]: st for i, st in opt["state"].items()},
                "param_groups": [
                    {**group, "params": [names[int(i)] for i in group["params"]]}
                    for group in opt["param_groups"]
                ],
            }
        except (RuntimeError, KeyError, IndexError) as err:
            raise CheckpointError(f"checkpoint does not fit {type(self.model).__name__}: {err}") from None
        set_optimizer_state_dict(self.model, self.optimizer, by_name, options=full)

    def save_hf(self, path: str | Path) -> Path:
        """Write the model as an HF checkpoint folder (safetensors) atomically, with the source's
        tokenizer files; vanilla ``transformers`` loads it. With several processes rank 0 writes it
        (under FSDP2 from the gathered shards) and every rank returns once it is in place."""
        final = Path(path)
        state = self._model_state() if self.parallel == "fsdp2" else None  # collective
        if state:  # tied parameters (embeddings) share one gathered tensor, so they are written once
            first: dict[int, str] = {}
            for name, param in self.model.named_parameters(remove_duplicate=False):
                if name in state:
                    state[name] = state[first.setdefault(id(param), name)]
        if self.dist.is_main:
            with atomic_dir(final) as tmp:
                self.model.save_pretrained(str(tmp), **({"state_dict": state} if state is not None else {}))
                if self.router_bias is not None:
                    bias_file.save_router_bias(self.router_bias, tmp)
                for name in SIDE_FILES:
                    if (self.source / name).is_file():
                        shutil.copy2(self.source / name, tmp / name)
        distributed.barrier(self.dist)
        return final
