"""The ``megatron`` training engine: megatron-core's ``GPTModel`` behind the same contract as ``hf``
(:class:`~moe_adapt.engines.base.Engine`), so the trainer, its callbacks and the stage configs drive
either engine unchanged.

How each HF behaviour is matched, the parallel layouts, what is refused, the checkpoint format, the
distributed optimizer and the expert layouts: docs/engines.md. Beside this module: :mod:`.routing`
(packed masks, rotary positions, router capture and biased routing), :mod:`.state` (in-memory and
sharded state), :mod:`.export` (back to HF), :mod:`.optimizer` (the distributed optimizer).

Shape legend: ``B`` sequences, ``T`` input positions (seq_len), ``T1`` = T + 1 packed tokens, ``V``
vocabulary, ``E`` experts, ``L`` MoE layers.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from moe_adapt import distributed
from moe_adapt.checkpoint.hf import DTYPES, load_causal_lm
from moe_adapt.engines import data_parallel, objectives, router_health
from moe_adapt.engines.base import Engine
from moe_adapt.engines.batch import TrainBatch, batch_field, batch_tokens
from moe_adapt.engines.kd import token_kd_terms
from moe_adapt.engines.megatron import checkpoint as dist_ckpt
from moe_adapt.engines.megatron import export, routing, state
from moe_adapt.engines.megatron.config import MegatronConfig
from moe_adapt.engines.megatron.hf_arch import read_hf_arch
from moe_adapt.engines.megatron.mapping import (
    hf_to_megatron,
)
from moe_adapt.engines.megatron.model import (
    Dispatcher,
    build_gpt_model,
    current_shard,
    expert_layout,
    load_megatron_state,
    transformer_config_from_hf,
)
from moe_adapt.engines.megatron.optimizer import distributed_optimizer
from moe_adapt.engines.megatron.parallel import (
    check_parallel_state,
    init_parallel,
    mark_tensor_parallel,
    resolve_device,
)
from moe_adapt.engines.optim import build_adamw
from moe_adapt.errors import CheckpointError, MoEAdaptConfigError, MoEAdaptError

log = logging.getLogger(__name__)

__all__ = ["MegatronEngine", "init_parallel"]


# -- the engine -----------------------------------------------------------------------------------
class MegatronEngine(Engine):
    """Trains an HF MoE checkpoint (Mixtral, Qwen2-MoE, Qwen3-MoE) as a megatron-core ``GPTModel``.

    Same constructor, methods and metrics as :class:`~moe_adapt.engines.hf.HFEngine`; see the module
    docstring for what is matched and what is refused. megatron's ``parallel_state`` must be
    initialised first (:func:`init_parallel`); the expert-parallel size is taken from it.

    Args:
        checkpoint: HF checkpoint folder (``config.json`` + safetensors).
        cfg: optimizer, schedule and loss settings (MegatronConfig).
        device: ``cuda`` (default when available); ``cpu`` only with the test shim.
        lr_multiplier: scales the scheduled LR of each step (a pure function of the step).
        kd, teacher: token-level distillation (as the hf engine): with ``kd`` the LM term becomes
            :func:`~moe_adapt.engines.objectives.token_kd_loss` against ``teacher`` (an HF checkpoint
            folder or model, run online on every rank) or, without one, the batch's stored top-k.
        dispatcher: megatron token dispatcher, ``alltoall`` (default; expert parallel) or ``allgather``.
    """

    cfg: MegatronConfig

    def __init__(
        self,
        checkpoint: str | Path,
        cfg: MegatronConfig | None = None,
        *,
        device: str | torch.device | None = None,
        lr_multiplier: Callable[[int], float] | None = None,
        kd: objectives.KDSettings | None = None,
        teacher: Any = None,
        dispatcher: Dispatcher = "alltoall",
    ) -> None:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.transformer.moe.router import TopKRouter

        self.cfg = cfg or MegatronConfig()
        self.source = Path(checkpoint)
        self.device = resolve_device(device)
        if self.cfg.grouped_gemm and self.cfg.dtype != "bfloat16":
            raise MoEAdaptConfigError(
                f"engine.grouped_gemm=True is invalid with engine.dtype={self.cfg.dtype}: megatron-core's "
                "grouped-GEMM experts (GroupedMLP) run in bfloat16 only; set engine.dtype=bfloat16 or "
                "engine.grouped_gemm=false"
            )
        self.ep_rank, self.ep_size, self.tp_rank, self.tp_size = check_parallel_state()
        from megatron.core import parallel_state as ps

        self._everyone = distributed.DistContext(
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            backend=dist.get_backend(),
            device=self.device,
        )
        """Every process: each routes different tokens (its rows, and under tensor parallel its
        sequence-parallel part of them); the load-balancing loss and the metrics reduce over them."""
        self._dp = (
            self._everyone
            if self.tp_size == 1
            else distributed.DistContext(
                rank=ps.get_data_parallel_rank(),
                world_size=ps.get_data_parallel_world_size(),
                backend=dist.get_backend(),
                device=self.device,
                group=ps.get_data_parallel_group(),
            )
        )
        """The data-parallel ranks: each trains on its own rows of the global batch (the
        tensor-parallel ranks of one group share theirs)."""
        self.lr_multiplier = lr_multiplier
        dtype = DTYPES[self.cfg.dtype]

        hf_model = load_causal_lm(self.source, dtype, router_bias=False)
        self.hf_config: Any = hf_model.config
        """The source's transformers config (used again by :meth:`save_hf`)."""
        arch = read_hf_arch(self.hf_config)
        self._arch = arch
        self.vocab_size = arch.vocab_size
        self.moe = (arch.num_experts, arch.top_k)
        self.tied_embeddings = arch.tie_word_embeddings
        self.renormalize_topk = arch.renormalize_topk
        self.expert_bias_LE = routing.initial_router_bias(
            self, hf_model, sum(arch.moe_layers), arch.num_experts
        )
        """Aux-loss-free balancing: per-layer expert selection biases ``[L, E]`` float32 (None: off)."""
        self.transformer_config = transformer_config_from_hf(
            self.hf_config,
            params_dtype=dtype,
            dispatcher=dispatcher,
            expert_parallel=self.ep_size,
            aux_loss_coeff=0.0,  # the engine adds objectives.load_balancing_loss itself
            moe_z_loss_coeff=None,  # and objectives.router_z_loss
            use_cpu_initialization=self.device.type == "cpu",
            perform_initialization=False,  # every weight comes from the checkpoint
            grouped_gemm=self.cfg.grouped_gemm,
            tensor_parallel=self.tp_size,
        )
        # under tensor parallel the logits are gathered over the vocabulary: the loss terms are written
        # for whole rows of logits (their gradient is split back to each rank's slice)
        model = build_gpt_model(
            self.hf_config, config=self.transformer_config, parallel_output=self.tp_size == 1
        )
        for param in model.parameters():  # megatron's torch norms are made in fp32 whatever params_dtype
            if param.is_floating_point() and param.dtype != dtype:
                param.data = param.data.to(dtype)
        self._shard = current_shard()
        mapped = hf_to_megatron(
            hf_model.state_dict(),
            self.hf_config,
            **dataclasses.asdict(self._shard),
            expert_layout=expert_layout(self.transformer_config),
        )
        load_megatron_state(model, mapped)
        del hf_model, mapped
        if self.tp_size > 1:
            mark_tensor_parallel(model)
        if self.tp_size > 1 and self.ep_size == 1:
            # Without expert parallel megatron treats the experts as dense parameters (all-reduced over
            # data parallel), but with expert tensor parallel 1 every TP rank holds them whole and
            # feeds them its own sequence part: like a sequence-parallel norm, their gradients must be
            # summed over the TP group, which finalize_model_grads does for that mark. (With EP > 1
            # megatron reduces them over the expert-data-parallel group, which holds the TP ranks.)
            for name, param in model.named_parameters():
                if ".mlp.experts." in name:
                    param.sequence_parallel = True
        self.model: Any = model.to(self.device)
        """The megatron-core ``GPTModel`` being trained (this rank's experts only under EP)."""
        self.model.train()

        self._router_logits: list[torch.Tensor] = []
        routers = [m for m in self.model.modules() if isinstance(m, TopKRouter)]
        if len(routers) != sum(arch.moe_layers):
            raise MoEAdaptError(
                f"found {len(routers)} megatron routers for {sum(arch.moe_layers)} MoE layers"
            )
        for layer, router in enumerate(routers):
            routing.instrument_router(self, router, layer)
        self._num_routers = len(routers)
        self._rotary = routing.RotaryPositions(self.model.rotary_pos_emb)

        self.ddp: Any = DistributedDataParallel(
            self.transformer_config,
            DistributedDataParallelConfig(
                grad_reduce_in_fp32=False,  # gradients in the parameters' dtype, as torch AdamW wants
                overlap_grad_reduce=self.device.type == "cuda",
                use_distributed_optimizer=self.cfg.distributed_optimizer,
            ),
            self.model,
        )
        """megatron's DDP wrapper: forward goes through it; it reduces gradients into ``main_grad``
        (reduce-scatters them with the distributed optimizer, which all-gathers the parameters after
        each update)."""
        self._params = [p for p in self.model.parameters() if p.requires_grad]
        self._expert = [not getattr(p, "allreduce", True) for p in self._params]
        self._dense_once, self._experts = self._model_parts()
        self.optimizer: Any
        """``torch.optim.AdamW``, or with ``cfg.distributed_optimizer`` megatron's ``ChainedOptimizer``
        of ``DistributedOptimizer`` (dense parameters; and expert parameters under EP)."""
        if self.cfg.distributed_optimizer:
            self.optimizer = distributed_optimizer(self.ddp, self.cfg, dtype)
        else:
            self.optimizer = build_adamw(
                [p for p in self._params if p.dim() >= 2],
                [p for p in self._params if p.dim() < 2],
                self.cfg,
                self.device,
            )
        self._norm = torch.zeros(())  # the last gradient norm, for clipping by it
        self._init_training_state(self._params, kd, teacher, dtype)
        self._loss_report_offset = 0.0

    def _update_router_bias(self, load_LE: torch.Tensor) -> None:
        """One sign step of aux-loss-free balancing, the rule of :meth:`RouterBias.update`."""
        if self.expert_bias_LE is None:
            return
        with torch.no_grad():
            load_LE = load_LE.detach().double()
            step_LE = torch.sign(load_LE.mean(dim=-1, keepdim=True) - load_LE).float()
            self.expert_bias_LE += self.cfg.bias_update_rate * step_LE.to(self.expert_bias_LE.device)

    # -- forward -------------------------------------------------------------------------------
    def _tokens(self, tokens_BT1: torch.Tensor | np.ndarray) -> torch.Tensor:
        return batch_tokens(tokens_BT1, self.vocab_size, self.device)

    def _field(self, batch: Any, name: str, dtype: torch.dtype) -> torch.Tensor | None:
        return batch_field(batch, name, dtype, self.device)

    def forward_loss(self, batch: Any) -> dict[str, torch.Tensor]:
        """Loss terms of one batch; ``loss`` is their weighted sum (as :meth:`HFEngine.forward_loss`).

        ``batch`` is ``tokens_BT1`` (inputs ``[:, :-1]``, labels ``[:, 1:]``) or an object with that as
        ``.tokens`` and optionally ``loss_mask`` ``[B, T]`` and ``position_ids`` ``[B, T]`` (restarting at
        0 where a packed example starts), ``lang_ids``/``langs`` and the teacher's ``topk_ids``/
        ``topk_logp`` for offline KD. Keys: ``loss``, ``lm_loss``, ``aux_loss``, ``z_loss``; with KD
        ``kd_loss``, ``kd_ce``, ``kd_kl``, ``kd_selected`` and ``kd_selected/<lang>``; ``l2_anchor`` /
        ``kl_anchor`` when enabled.

        With several processes ``batch`` is this rank's rows and the call is collective (the experts
        exchange tokens); ``loss`` is then this rank's share of the global batch's loss (what it
        back-propagates), the other terms are this rank's own values (:meth:`step` reports the
        global ones). ``l2_anchor`` is the whole model's value and carries no gradient: :meth:`step`
        adds its gradient to the reduced gradients.
        """
        tokens_BT1 = self._tokens(getattr(batch, "tokens", batch))
        inputs_BT, labels_BT = tokens_BT1[:, :-1], tokens_BT1[:, 1:]
        mask_BT = self._field(batch, "loss_mask", torch.bool)
        position_ids_BT = self._field(batch, "position_ids", torch.long)
        if mask_BT is not None:
            labels_BT = labels_BT.masked_fill(~mask_BT, -100)
        attention_mask_B1TT = None
        if position_ids_BT is not None:
            if position_ids_BT.shape != inputs_BT.shape or int(position_ids_BT.min()) < 0:
                raise MoEAdaptError(
                    f"position_ids must be [batch, seq_len] = {tuple(inputs_BT.shape)} of non-negative "
                    f"positions, got {tuple(position_ids_BT.shape)}"
                )
            attention_mask_B1TT = routing.packed_attention_mask(position_ids_BT)
            model_positions_BT = position_ids_BT
        else:
            model_positions_BT = torch.arange(inputs_BT.shape[1], device=self.device).expand_as(inputs_BT)
        if inputs_BT.shape[1] % self.tp_size:
            raise MoEAdaptError(
                f"sequences of {inputs_BT.shape[1]} positions do not split over "
                f"engine.tensor_parallel={self.tp_size} ranks (sequence parallel): make mixture.seq_len "
                "a multiple of it"
            )
        self._router_logits.clear()
        self._rotary.position_ids_BT = position_ids_BT
        try:
            logits_BTV = self.ddp(inputs_BT, model_positions_BT, attention_mask=attention_mask_B1TT)
        finally:
            self._rotary.position_ids_BT = None
        router_LTE = [x.reshape(-1, x.shape[-1]) for x in self._router_logits]
        self._router_logits.clear()
        if len(router_LTE) != self._num_routers:
            raise MoEAdaptError(
                f"captured {len(router_LTE)} router outputs for {self._num_routers} MoE layers in one forward"
            )
        counted = (labels_BT != -100).sum().to(torch.float64).reshape(1)
        self._counted = (float(counted), float(distributed.all_reduce_sum(counted.clone(), self._dp)))
        terms: dict[str, torch.Tensor] = {"lm_loss": objectives.lm_cross_entropy(logits_BTV, labels_BT)}
        loss = terms["lm_loss"]
        hf_inputs: dict[str, Any] = {"input_ids": inputs_BT, "use_cache": False}  # teacher / reference
        if position_ids_BT is not None:
            hf_inputs["position_ids"] = position_ids_BT
        self._lang_counted = {}
        if self.kd is not None and getattr(batch, "kd", True):  # replay batches: plain LM loss
            kd_terms, self._lang_counted = token_kd_terms(
                batch,
                logits_BTV,
                labels_BT,
                self.kd,
                teacher=self.teacher,
                teacher_inputs=hf_inputs,
                device=self.device,
            )
            terms.update(kd_terms)
            loss = kd_terms["kd_loss"]
        if self._dp.is_distributed:
            loss = data_parallel.share_of_global(loss, logits_BTV, *self._counted, self._dp)
        # each tensor-parallel rank routes its sequence part, and the router's gradient is summed over
        # them (sequence parallel): 1/tp makes the sum the global batch's term
        self._load_LE = router_health.expert_load(router_LTE, self.moe[1], self.expert_bias_LE)
        self._routed_tokens = router_LTE[0].shape[0]
        terms["aux_loss"] = (
            data_parallel.global_load_balancing_loss(router_LTE, self.moe[1], self._everyone)
            if self._everyone.is_distributed
            else objectives.load_balancing_loss(router_LTE, self.moe[1])
        )
        terms["z_loss"] = objectives.router_z_loss(router_LTE)
        router_loss = self.cfg.aux_loss_coef * terms["aux_loss"] + self.cfg.z_loss_coef * terms["z_loss"]
        loss = loss + (router_loss if self.tp_size == 1 else router_loss / self.tp_size)
        # what the reported loss lacks for the router terms' full weight (the mean over ranks)
        self._loss_report_offset = float(router_loss.detach()) * (1 - 1 / self.tp_size)
        if self._anchor is not None:  # no gradient here: step adds it to the reduced gradients
            terms["l2_anchor"] = self._l2_anchor()
            loss = loss + self.cfg.l2_anchor_coef * terms["l2_anchor"]
        if self.reference is not None:
            with torch.no_grad():
                ref_logits_BTV = self.reference(**hf_inputs).logits
            terms["kl_anchor"] = objectives.kl_anchor_loss(logits_BTV, ref_logits_BTV)
            loss = loss + self.cfg.kl_anchor_coef * terms["kl_anchor"]
        terms["loss"] = loss
        return terms

    def _model_parts(self) -> tuple[list[int], list[int]]:
        """Indices into ``_params`` that, summed over the model-parallel groups, cover the model once.

        Dense parameters: tensor-parallel slices on every TP rank, replicated tensors on TP rank 0
        only (to be summed over the TP group); experts: every local one (to be summed over the EP
        group, which holds each expert once).
        """
        from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

        dense = [
            i
            for i, (p, e) in enumerate(zip(self._params, self._expert, strict=True))
            if not e and (self.tp_size == 1 or param_is_not_tensor_parallel_duplicate(p))
        ]
        return dense, [i for i, e in enumerate(self._expert) if e]

    def _sum_over_model(self, dense: torch.Tensor, expert: torch.Tensor) -> torch.Tensor:
        """The whole model's value of a sum over parameters, from this rank's :meth:`_model_parts`
        sums (collective under TP or EP)."""
        from megatron.core import parallel_state

        if self.tp_size > 1:
            dist.all_reduce(dense, group=parallel_state.get_tensor_model_parallel_group())
        if self.ep_size > 1:
            dist.all_reduce(expert, group=parallel_state.get_expert_model_parallel_group())
        return dense + expert

    @torch.no_grad()
    def _l2_anchor(self) -> torch.Tensor:
        """``Σ ||θ − θ0||²`` over the whole model: the same value on every rank, without gradient.

        Its gradient, ``2 (θ − θ0)`` per parameter, is added to the reduced gradients by
        :meth:`_add_l2_anchor_grad`: added to each rank's loss instead, it would be scaled by however
        the parallel layout reduces that parameter's gradient (summed over sequence-parallel
        replicas, averaged over data-parallel ranks). With one process the value is exactly
        :func:`objectives.l2_anchor_loss`.
        """
        assert self._anchor is not None
        if self.ep_size == 1 and self.tp_size == 1:
            return objectives.l2_anchor_loss(self._params, self._anchor)
        params, anchor = self._params, self._anchor

        def part(indices: list[int]) -> torch.Tensor:
            if not indices:
                return torch.zeros((), dtype=torch.float32, device=self.device)
            return objectives.l2_anchor_loss([params[i] for i in indices], [anchor[i] for i in indices])

        return self._sum_over_model(part(self._dense_once), part(self._experts))

    def _add_l2_anchor_grad(self) -> None:
        """``main_grad += coef · 2 (θ − θ0)`` on every local parameter, after the gradient reduction
        (the gradient of the L2 anchor, whatever the parallel layout)."""
        assert self._anchor is not None
        scale = 2.0 * self.cfg.l2_anchor_coef
        with torch.no_grad():
            for param, anchor in zip(self._params, self._anchor, strict=True):
                param.main_grad.add_(param.detach() - anchor, alpha=scale)

    # -- step (the bookkeeping is Engine.step's) ------------------------------------------------
    def _world(self) -> int:
        return dist.get_world_size() if dist.is_initialized() else 1

    def _all_finite(self, value: float) -> bool:
        """Whether ``value`` is finite on every rank (so all ranks take the same branch)."""
        ok = math.isfinite(value)
        if self._world() == 1:
            return ok
        flag = torch.tensor([1.0 if ok else 0.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item() > 0)

    def _grad_norm(self) -> torch.Tensor:
        """Global L2 norm of the gradients: dense ones once (tensor-parallel slices summed over the TP
        group, replicated tensors counted on TP rank 0), expert ones summed over the EP group."""
        if self.ep_size == 1 and self.tp_size == 1:
            return torch.nn.utils.get_total_norm([p.grad for p in self._params], 2.0, foreach=False)

        def sq(indices: list[int]) -> torch.Tensor:
            grads = [self._params[i].grad for i in indices]
            return torch.nn.utils.get_total_norm(grads, 2.0, foreach=False).float() ** 2

        return self._sum_over_model(sq(self._dense_once), sq(self._experts)).sqrt()

    def _distributed_update(self, grad_norm: float) -> None:
        """Clip the distributed optimizer's fp32 main gradients by the global norm and step.

        What megatron's ``ChainedOptimizer.step`` does after ``prepare_grads``, taken apart so that the
        engine decides the skip (a non-finite norm) as on the torch-AdamW path: without a loss scaler
        megatron would apply non-finite gradients. ``step_with_ready_grads`` updates this rank's shard
        and all-gathers the parameters.
        """
        from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

        if self.cfg.grad_clip is not None:
            for optimizer in self.optimizer.chained_optimizers:
                params = optimizer.get_parameters()
                if params:
                    clip_grad_by_total_norm_fp32(params, max_norm=self.cfg.grad_clip, total_norm=grad_norm)
        self.optimizer.step_with_ready_grads()

    def _begin_step(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            if self.cfg.distributed_optimizer:  # megatron marks norms and biases with wd_mult 0
                group["weight_decay"] = self.cfg.weight_decay * group["wd_mult"]
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad(set_to_none=True)

    def _forward_backward(self, batch: TrainBatch | Any, lr: float) -> tuple[dict[str, float], float, bool]:
        """Forward of this rank's rows (:func:`~moe_adapt.engines.data_parallel.rows_of`), the global
        batch's terms on every rank, then backward and megatron's gradient reduction; the gradient
        norm is global, so every rank takes the same skip decision."""
        local = data_parallel.rows_of(batch, self._dp)
        terms = self.forward_loss(local)
        metrics = {k: float(v.detach()) for k, v in terms.items()}
        metrics["loss"] += self._loss_report_offset  # 0 without tensor parallel
        if self._everyone.is_distributed:  # the global batch's terms, on every rank
            # (tensor-parallel ranks repeat the LM/KD terms of their rows: a weighted mean is unmoved
            # by repeats; the router terms are their sequence parts')
            langs = getattr(local, "langs", None) or ()
            keys = sorted({*metrics, *(f"kd_selected/{lang}" for lang in langs)})
            weights = data_parallel.metric_weights(terms, self._counted[0], self._lang_counted)
            means, _ = data_parallel.weighted_mean(metrics, weights, keys, self._everyone)
            metrics = {k: means.get(k, float("nan")) for k in metrics} | means
        metrics["tokens"] = self._counted[1]
        skipped = not self._all_finite(metrics["loss"])
        grad_norm = float("nan")
        if not skipped:
            terms["loss"].backward()
            if self.tp_size == 1:
                self.ddp.finish_grad_sync()
            else:  # also sums the sequence-parallel replicas' gradients (norms, routers) over TP
                from megatron.core.distributed import finalize_model_grads

                finalize_model_grads([self.ddp])
            if self._anchor is not None:
                self._add_l2_anchor_grad()
            if self.cfg.distributed_optimizer:
                self.optimizer.prepare_grads()  # this rank's shard of main_grad -> the fp32 main params
                grad_norm = float(self.optimizer.get_grad_norm())  # over every rank's shard
            else:
                for param in self._params:
                    param.grad = param.main_grad
                self._norm = self._grad_norm()
                grad_norm = float(self._norm)
            skipped = not math.isfinite(grad_norm)  # the same on every rank: the norm is global
        return metrics, grad_norm, skipped

    def _apply_update(self, grad_norm: float) -> None:
        if self.cfg.distributed_optimizer:
            self._distributed_update(grad_norm)
            return
        if self.cfg.grad_clip is not None:
            torch.nn.utils.clip_grads_with_norm_(self._params, self.cfg.grad_clip, self._norm, foreach=False)
        self.optimizer.step()

    def _expert_load(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self._load_LE is None:
            return None
        load_LE, self._load_LE = self._load_LE, None
        dropped_L = router_health.dropped_tokens(
            load_LE, self.cfg.capacity_factor, self._routed_tokens, self.moe[1]
        )
        if self._world() > 1:  # every process routed different tokens
            load_LE, dropped_L = load_LE.clone(), dropped_L.clone()
            dist.all_reduce(load_LE)
            dist.all_reduce(dropped_L)
        return load_LE, dropped_L

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """This rank's whole engine state, in memory (same layout only; :func:`.state.state_dict`)."""
        return state.state_dict(self)

    def load_state_dict(self, state_: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` (same layout; :func:`.state.load_state_dict`)."""
        state.load_state_dict(self, state_)

    writes_folder = True

    def save(self, folder: Path) -> dict[str, Any]:
        """Collective: the model and optimizer into ``folder`` with dist_checkpointing
        (:meth:`save_sharded`); returns the rest of the state."""
        return self.save_sharded(folder)

    def checkpoint_problem(self, folder: Path) -> str | None:
        """What is wrong with the dist_checkpointing ``folder`` of a checkpoint, or None
        (:func:`.checkpoint.folder_problem`)."""
        return dist_ckpt.folder_problem(folder)

    def load(
        self, state_: dict[str, Any], folder: Path | None = None, checkpoint: Path | None = None
    ) -> None:
        """Collective: :meth:`load_sharded` from ``folder``; without one (a checkpoint of another
        engine, or an in-memory state) :meth:`load_state_dict`, which refuses another engine's."""
        if folder is not None:
            self.load_sharded(folder, state_)
            return
        try:
            self.load_state_dict(state_)
        except CheckpointError as err:
            if checkpoint is None:
                raise
            raise CheckpointError(f"cannot resume from {checkpoint}: {err}") from None

    def save_sharded(self, path: str | Path) -> dict[str, Any]:
        """Collective: write model and optimizer into folder ``path`` with dist_checkpointing and
        return the rest of the state for the trainer's checkpoint (:func:`.state.save_sharded`)."""
        return state.save_sharded(self, path)

    def load_sharded(self, path: str | Path, state_: dict[str, Any]) -> None:
        """Collective: restore what :meth:`save_sharded` wrote and returned, at any EP size
        (:func:`.state.load_sharded`)."""
        state.load_sharded(self, path, state_)

    def _full_model_tensors(self) -> dict[str, torch.Tensor]:
        """The whole model's megatron state on every rank (:func:`.export.full_model_tensors`)."""
        return export.full_model_tensors(self)

    @property
    def eval_model(self) -> Any:
        """What evaluation callbacks run: :meth:`hf_model` (the hf engine's property of the same name
        gives its own model)."""
        return self.hf_model()

    def hf_model(self) -> Any:
        """A transformers model holding a copy of the current weights, on this engine's device, in eval
        mode, routing with the selection biases when there are any (what ``load_causal_lm`` of the
        :meth:`save_hf` folder gives): for evaluation callbacks that need an HF model. Collective under
        expert parallel (the experts are gathered onto every rank)."""
        hf_model, _ = export.build_hf_model(self, export.hf_state(self))
        return hf_model.to(self.device).eval()

    def save_hf(self, path: str | Path) -> Path:
        """Write the model as an HF checkpoint folder atomically; vanilla ``transformers`` loads it.
        Collective under expert parallel; global rank 0 writes (:func:`.export.save_hf`)."""
        return export.save_hf(self, path)
