"""The engine contract: the settings every engine shares (:class:`EngineConfig`) and the class every
engine implements (:class:`Engine`).

An engine owns the model being trained, forward, backward, the optimizer and the parallelism; the
trainer loop (:mod:`moe_adapt.train.trainer`) and the stages see only this class. ``Engine.step`` is a
template method that does the bookkeeping both engines share, in this order:

1. the step's learning rate (:func:`moe_adapt.engines.optim.scheduled_lr`) set on the optimizer;
2. :meth:`Engine._forward_backward` (engine-specific): the global batch's metrics, the gradient norm
   before clipping and whether the step must be skipped (a non-finite loss or gradient norm, decided
   the same way on every rank);
3. a skipped step is logged and not applied (weights and optimizer state untouched), otherwise
   :meth:`Engine._apply_update` clips and steps; the schedule advances either way, so it stays aligned
   with the data;
4. the router-load metrics and the aux-loss-free bias update of MoE models
   (:meth:`Engine._expert_load`, :meth:`Engine._update_router_bias`);
5. ``lr``, ``grad_norm`` and ``skipped`` added to the metrics.

The implementations: :class:`moe_adapt.engines.hf.HFEngine` (transformers; one process, DDP or FSDP2)
and :class:`moe_adapt.engines.megatron.MegatronEngine` (megatron-core). See docs/engines.md.

Shape legend: ``L`` MoE layers, ``E`` experts.
"""

from __future__ import annotations

import abc
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NoReturn

import torch

from moe_adapt.checkpoint.hf import DTYPES
from moe_adapt.engines import router_health
from moe_adapt.engines.batch import TrainBatch
from moe_adapt.engines.kd import frozen_models
from moe_adapt.engines.objectives import KDSettings
from moe_adapt.engines.optim import scheduled_lr
from moe_adapt.errors import CheckpointError, invalid

log = logging.getLogger(__name__)

ENGINES = ("auto", "hf", "megatron")
"""The engines by name: the options of the ``engine`` group (``engine=hf|megatron|auto``)."""


def fail(key: str, value: object, allowed: str) -> NoReturn:
    """A one-line config error for ``engine.<key>``."""
    invalid(f"engine.{key}", value, allowed)


@dataclass
class EngineConfig:
    """Settings every engine shares: optimizer, LR schedule, loss coefficients, anchors, dtype and
    router balancing. Each engine's schema extends it (:class:`~moe_adapt.engines.hf.HFConfig`,
    :class:`~moe_adapt.engines.megatron.config.MegatronConfig`, :class:`~moe_adapt.engines.AutoConfig`)."""

    NAME: ClassVar[str] = ""
    """The engine a subclass configures (its ``name``); empty here: any."""

    name: str = "auto"
    """Which engine trains: hf, megatron or auto (megatron with CUDA and a Mixtral / Qwen-MoE
    checkpoint, hf otherwise). Set by the group option (engine=hf|megatron|auto), not by hand."""

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
    """AdamW betas: exactly two values (first and second moment), each in [0, 1)."""

    eps: float = 1e-8
    """AdamW epsilon: a finite number > 0."""

    weight_decay: float = 0.1
    """AdamW decoupled weight decay, a finite number >= 0 (applied to matrices only, not to norms,
    biases or routers' 1-d parameters)."""

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
    factor would drop (capacity = ceil(tokens·top_k/E·factor)). The engines are dropless; null logs 0,
    so both engines log the same keys."""

    check_memory: bool = True
    """Refuse, before loading any weight, a training phase whose plan (weights, gradients and optimizer
    state per rank: :mod:`moe_adapt.engines.plan`) needs more memory than the device has; false trains
    anyway (the plan is still logged, with a warning). Not part of a stage's fingerprint."""

    def __post_init__(self) -> None:
        if self.name not in ENGINES or (self.NAME and self.name != self.NAME):
            fail("name", self.name, "choose the engine with engine=hf|megatron|auto, not engine.name")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            fail("lr", self.lr, "must be a finite number > 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            fail("min_lr_ratio", self.min_lr_ratio, "must be in [0, 1]")
        if self.warmup_steps < 0:
            fail("warmup_steps", self.warmup_steps, "must be >= 0")
        if self.decay_steps is not None and self.decay_steps <= self.warmup_steps:
            fail("decay_steps", self.decay_steps, f"must be > warmup_steps={self.warmup_steps}, or null")
        betas = list(self.betas)
        if len(betas) != 2 or not all(math.isfinite(b) and 0 <= b < 1 for b in betas):
            fail("betas", betas, "give exactly two values [beta1, beta2], each in [0, 1)")
        if not (self.eps > 0 and math.isfinite(self.eps)):
            fail("eps", self.eps, "must be a finite number > 0")
        if self.grad_clip is not None and not (self.grad_clip > 0 and math.isfinite(self.grad_clip)):
            fail("grad_clip", self.grad_clip, "must be a finite number > 0, or null for no clipping")
        for key in ("aux_loss_coef", "z_loss_coef", "l2_anchor_coef", "kl_anchor_coef", "weight_decay"):
            if not (getattr(self, key) >= 0 and math.isfinite(getattr(self, key))):
                fail(key, getattr(self, key), "must be a finite number >= 0")
        if self.kl_anchor_coef > 0 and not self.reference:
            fail("reference", self.reference, "set a reference checkpoint folder when kl_anchor_coef > 0")
        if self.dtype not in DTYPES:
            fail("dtype", self.dtype, f"choose one of {', '.join(DTYPES)}")
        if not (self.bias_update_rate >= 0 and math.isfinite(self.bias_update_rate)):
            fail("bias_update_rate", self.bias_update_rate, "must be a finite number >= 0 (0: off)")
        if self.capacity_factor is not None and not (
            self.capacity_factor > 0 and math.isfinite(self.capacity_factor)
        ):
            fail("capacity_factor", self.capacity_factor, "must be a finite number > 0, or null (dropless)")
        if not isinstance(self.check_memory, bool):
            fail("check_memory", self.check_memory, "must be true or false")


class Engine(abc.ABC):
    """What the trainer and the stages use of a training engine.

    Subclasses set :attr:`cfg`, :attr:`model`, :attr:`vocab_size`, :attr:`optimizer`, :attr:`device`
    and :attr:`lr_multiplier` in their constructor, then call :meth:`_init_training_state` (the step
    counter, anchors, KD models), and implement the abstract methods; :meth:`step` is shared (see the
    module docstring). With several processes every rank calls :meth:`step`, :meth:`state_dict` and
    :meth:`save_hf` in the same order (they are collective).
    """

    cfg: EngineConfig
    """The engine's settings."""

    model: Any
    """The model being trained (a transformers ``PreTrainedModel`` or megatron's ``GPTModel``)."""

    vocab_size: int
    """Entries of the model's vocabulary: every token id of a batch is below it."""

    optimizer: Any
    """``torch.optim.AdamW``, or megatron's chained distributed optimizer."""

    device: torch.device
    """Where this process trains (cuda:LOCAL_RANK, or the CPU)."""

    lr_multiplier: Callable[[int], float] | None
    """Scales the scheduled LR of each step (e.g. a curriculum's re-warm factor); a pure function of
    the step, so resume is exact."""

    steps: int
    """Optimizer steps taken or skipped: the LR schedule's position."""

    writes_folder: ClassVar[bool] = False
    """Whether :meth:`save` writes files into its folder (the checkpoint then records the folder)."""

    def _init_training_state(
        self, params: list[torch.Tensor], kd: KDSettings | None, teacher: Any, dtype: torch.dtype
    ) -> None:
        """The state every engine's step keeps beside its model and optimizer, set once by each
        constructor after the optimizer: the schedule position, the last forward's routing and token
        counts, the L2 anchor's starting weights of ``params``, and the KD settings with the frozen
        models they need (:func:`~moe_adapt.engines.kd.frozen_models`)."""
        self.steps = 0  # optimizer steps taken or skipped (the LR schedule position)
        self._load_LE: torch.Tensor | None = None  # expert load of the last forward (metrics, bias update)
        self._routed_tokens = 0
        self._counted = (0.0, 0.0)  # label positions that count: this rank's and the global batch's
        self._lang_counted: dict[str, float] = {}  # per language: KD positions (weights kd_selected/<lang>)
        self._anchor: list[torch.Tensor] | None = None
        if self.cfg.l2_anchor_coef > 0:
            self._anchor = [p.detach().clone() for p in params]
        self.kd = kd
        """Token-level distillation settings; None trains on plain next-token cross-entropy."""
        self.reference, self.teacher = frozen_models(
            self.cfg, kd, teacher, dtype, self.device, self.vocab_size
        )
        """The KL anchor's reference model and token KD's online teacher (None: not used; without a
        teacher the top-k log-probabilities come with each batch)."""

    # -- the contract --------------------------------------------------------------------------
    @property
    @abc.abstractmethod
    def eval_model(self) -> Any:
        """The module to evaluate with (held-out loss): an HF-style causal LM called with
        ``input_ids`` that returns ``.logits``."""

    @abc.abstractmethod
    def forward_loss(self, batch: TrainBatch | Any) -> dict[str, torch.Tensor]:
        """Loss terms of one batch (``tokens_BT1`` or a :class:`TrainBatch`); ``loss`` is their
        weighted sum."""

    @abc.abstractmethod
    def state_dict(self) -> dict[str, Any]:
        """The engine's in-memory state (model, optimizer, schedule position, RNG)."""

    @abc.abstractmethod
    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` into an engine built from the same checkpoint and config."""

    @abc.abstractmethod
    def save_hf(self, path: str | Path) -> Path:
        """Write the model as an HF checkpoint folder atomically (every rank returns once it is in
        place)."""

    def save(self, folder: Path) -> dict[str, Any]:
        """Collective: save the engine for a training checkpoint. What the engine keeps on disk goes
        into ``folder`` (a folder every rank sees, inside the checkpoint being written; made by the
        engine when it writes there, see :attr:`writes_folder`); the rest of its state is returned
        (tensors and JSON values) for rank 0 to write beside it. By default nothing goes to disk and
        the whole :meth:`state_dict` is returned."""
        return self.state_dict()

    def checkpoint_problem(self, folder: Path) -> str | None:
        """What is wrong with the ``folder`` :meth:`save` wrote into a checkpoint (one phrase), or None
        when its files look intact; opens files, loads nothing (a resume passes over a damaged
        checkpoint for the one before it). By default the engine writes no folder, so a checkpoint that
        has one is another engine's, which :meth:`load` refuses by name: nothing to say here."""
        return None

    def load(self, state: dict[str, Any], folder: Path | None = None, checkpoint: Path | None = None) -> None:
        """Collective: restore what :meth:`save` returned (``state``) and, when it wrote one, its
        ``folder``; ``checkpoint`` names the checkpoint folder in errors.

        Raises:
            CheckpointError: the state was saved by another engine.
        """
        if folder is not None:
            where = str(checkpoint) if checkpoint is not None else "this trainer state"
            raise CheckpointError(
                f"{where}: its engine state is sharded (folder {folder.name}/, written by the megatron "
                f"engine) and {type(self).__name__} cannot read it: resume with the engine "
                "that wrote it (engine=megatron)"
            )
        self.load_state_dict(state)

    def current_lr(self) -> float:
        """Learning rate the next step uses (schedule times ``lr_multiplier``)."""
        return scheduled_lr(self.cfg, self.steps, self.lr_multiplier)

    # -- the step: shared bookkeeping around the engine's hooks ---------------------------------
    def step(self, batch: TrainBatch | Any) -> dict[str, float]:
        """Forward, backward, clip and apply one optimizer step on ``batch``; returns float metrics.

        Metrics: every loss term, ``tokens`` (label positions that count), ``lr``, ``grad_norm``
        (before clipping), ``skipped`` (1.0 when the loss or gradient norm was not finite and the
        update was dropped) and, for MoE models, the ``moe/*`` load metrics. With several processes
        ``batch`` is the global batch (the same on every rank; each trains on its own rows) and the
        metrics are the global batch's, identical on every rank.
        """
        lr = self.current_lr()
        self._begin_step(lr)
        metrics, grad_norm, skipped = self._forward_backward(batch, lr)
        if skipped:
            if self._reports_skips():
                log.warning("step %d: non-finite loss or gradient norm; update skipped", self.steps)
        else:
            self._apply_update(grad_norm)
        self.optimizer.zero_grad(set_to_none=True)
        load = self._expert_load()
        if load is not None:
            load_LE, dropped_L = load
            metrics.update(router_health.load_metrics(load_LE, dropped_L))
            if self.cfg.bias_update_rate > 0 and not skipped:
                self._update_router_bias(load_LE)
        self.steps += 1
        metrics.update(lr=lr, grad_norm=grad_norm, skipped=float(skipped))
        return metrics

    def _begin_step(self, lr: float) -> None:
        """Set every parameter group's learning rate and clear the gradients."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)

    @abc.abstractmethod
    def _forward_backward(self, batch: TrainBatch | Any, lr: float) -> tuple[dict[str, float], float, bool]:
        """Forward and (unless the loss is not finite) backward of ``batch``: the global batch's
        metrics (loss terms and ``tokens``), the gradient norm before clipping (NaN when there was no
        backward) and whether to skip the update; the same on every rank."""

    @abc.abstractmethod
    def _apply_update(self, grad_norm: float) -> None:
        """Clip the gradients to ``cfg.grad_clip`` (their norm is ``grad_norm``) and step the
        optimizer."""

    def _expert_load(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The last forward's global expert load ``load_LE`` and the assignments a router with
        ``cfg.capacity_factor`` would drop ``dropped_L``, consumed; None for a dense model."""
        return None

    def _update_router_bias(self, load_LE: torch.Tensor) -> None:
        """Move the aux-loss-free selection biases toward balance after an applied step."""
        return None

    def _reports_skips(self) -> bool:
        """Whether this process logs skipped steps."""
        return True
