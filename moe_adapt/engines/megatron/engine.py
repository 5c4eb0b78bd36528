"""The ``megatron`` training engine: megatron-core's ``GPTModel`` behind the same contract as ``hf``.

:class:`MegatronEngine` takes the settings of :class:`~moe_adapt.engines.hf.HFConfig` and
answers like :class:`~moe_adapt.engines.hf.HFEngine`: ``forward_loss(batch)`` returns the same
loss terms (same keys, and for the same weights and batch the same values up to fp32 rounding),
``step(batch)`` the same metrics, ``state_dict()`` nested tensors and JSON values for an exact
resume, and ``save_hf(path)`` an HF checkpoint folder that vanilla transformers loads. So the
trainer, its callbacks and the stage configs drive either engine unchanged.

How each HF behaviour is matched
    * Weights: the HF checkpoint is read with transformers (safetensors only, no remote code) and
      converted with our mapping (:mod:`.mapping`); :mod:`.model` builds a ``GPTModel`` whose logits
      equal HF's. ``save_hf`` maps back and writes through transformers' ``save_pretrained``:
      HF -> megatron -> HF is bit-exact. (Every rank reads the whole HF model into host memory once,
      then keeps its own experts.) Parameters are all in ``engine.dtype``, as in the hf engine
      (megatron makes its torch norms in fp32; they are cast).
    * Loss terms come from :mod:`moe_adapt.engines.objectives`, as in the hf engine: the LM term from
      the logits, the load-balancing and z-loss from the router logits. Megatron's own auxiliary
      and z losses are off (``moe_router_load_balancing_type="none"``, no z-loss coefficient): nothing
      is counted twice. The router logits are captured by wrapping each ``TopKRouter``'s ``gating``
      method on our model instance (one list entry per MoE layer and forward; the tensor megatron
      routes with, so the gradients of both terms reach the router weights).
    * Packed batches (``position_ids`` restarting at 0): transformers derives a block-diagonal
      causal mask from the position ids and rotates with them. Megatron's local attention takes an
      explicit boolean mask, so the engine builds the same mask (``[B, 1, T, T]``, True = masked);
      and a forward hook on the rotary module replaces its ``[T, 1, 1, D]`` table with the rows of
      each token's own position, ``[T, B, 1, D]`` (megatron's non-fused RoPE broadcasts over the
      batch). Without ``position_ids`` both models use plain causal attention over 0..T-1.
    * Optimizer: ``torch.optim.AdamW`` with the hf engine's two groups (matrices decay, 1-d
      tensors do not: megatron's fused qkv and gate/up matrices are still matrices, its biases
      and norms still vectors), the same LR schedule (:func:`moe_adapt.engines.optim.lr_at` times
      ``lr_multiplier``), global-norm clipping and non-finite skip. AdamW is elementwise, so fusing
      q/k/v or gate/up into one megatron tensor changes nothing. With ``engine.distributed_optimizer``
      megatron's own optimizer instead (see "Distributed optimizer" below), to the same update in
      float32.
    * Expert load metrics (``moe/*``) from the captured logits with
      :mod:`moe_adapt.engines.router_health`, like the hf engine (dropless; ``capacity_factor`` only
      counts what a capacity-limited router would drop).
    * Aux-loss-free balancing (``engine.bias_update_rate > 0``, or a source checkpoint with
      ``router_bias.json``): the routers of our model instance get a ``routing`` that selects
      ``topk(softmax(logits) + b)`` and weights with the unbiased probabilities (renormalised when
      the family does), the rule of the hf engine's router hook; ``b`` moves by the same sign step
      after every applied step, is saved in ``state_dict`` and exported as ``router_bias.json``.
      (megatron's own expert bias only works with sigmoid scores, so it is not used.)
    * Token-level distillation (``kd``): the same terms as the hf engine, from the same function
      (:func:`moe_adapt.engines.kd.token_kd_terms`) on megatron's logits: an online HF teacher
      (every rank runs its own copy on its own rows) or the batch's stored top-k; SelecTKD's
      confidence mask and the per-language selected share (``kd_selected/<lang>``, weighted by each
      rank's positions of that language) included.

Parallelism
    megatron's ``parallel_state`` must be initialised by the caller before the engine is built
    (:func:`.parallel.init_parallel` does it: a one-process group when nothing is launched, or torchrun's
    environment; nccl on CUDA, gloo on CPU). Expert parallel (EP) uses the alltoall dispatcher.
    Gradients go through megatron's ``DistributedDataParallel`` wrapper, which keeps megatron's
    convention: dense gradients are averaged over the data-parallel group, expert gradients are
    scaled by 1/dp and summed over the expert-data-parallel group (experts are never all-reduced
    across EP ranks), so the step follows the gradient of the mean of the ranks' losses. As in the
    hf engine, every rank receives the same global batch and trains on its own rows; the loss each
    rank back-propagates is its token-weighted share of the global batch's loss, and the
    load-balancing loss counts expert assignments over the global batch, so a step on W ranks
    (data and expert parallel) equals a step on one, and every metric is the global batch's. The
    gradient norm for clipping sums dense norms once and expert norms over the EP group. The L2
    anchor is the one term that is not back-propagated: its value is the whole model's
    ``Σ ||θ − θ0||²`` (summed over the TP and EP groups as the norm is), and its gradient
    ``2 (θ − θ0)`` is added to every parameter's reduced gradient, so that no layout's reduction
    (an average, a sum over sequence-parallel replicas) rescales it.

    Tensor parallel (TP, ``engine.tensor_parallel``) runs with sequence parallel and expert tensor
    parallel 1. The data-parallel ranks are then the TP groups: the ranks of one group share their
    rows. The logits are gathered over the vocabulary (so every loss term, KD and the KL anchor
    included, is computed on whole rows; its gradient is split back to each slice). Each TP rank
    routes its sequence part, so the router terms are counted over every process and weighted 1/tp
    (their gradients are summed over the group); ``finalize_model_grads`` sums the gradients of the
    sequence-parallel replicas (norms, routers, shared-expert gates, and without EP the experts,
    which every TP rank holds whole). The tensor-parallel marks megatron would set while
    initialising weights are set by the engine (:func:`.parallel.mark_tensor_parallel`), and the gradient
    norm sums slices over the TP group and counts replicas once. Exports gather the slices with the
    mapping. Pipeline and context parallel are refused.

Refused (a :class:`~moe_adapt.errors.MoEAdaptError` naming the setting)
    Pipeline, context or expert-tensor parallel > 1; sequences whose length tensor parallel does
    not divide; a device other than CUDA. Without CUDA
    megatron-core 0.16 does not run (it calls ``torch.cuda`` for streams, events and its RNG
    tracker), so on a CPU-only machine the constructor raises one clear error. The tests run the
    engine on CPU through a test-only shim (``tests/engines/megatron_cpu.py``) that product code
    never imports.

Checkpoints (megatron-core ``dist_checkpointing``, :mod:`.checkpoint`)
    The trainer saves with :meth:`MegatronEngine.save_sharded`: every rank writes its part of the
    model and of the AdamW moments (``exp_avg``, ``exp_avg_sq``, sharded like their parameters with
    megatron's optimizer helpers) into one ``torch_dist`` folder, each tensor once under its global
    name and shape (the experts of all EP ranks form one ``[E, ...]`` tensor). The rest (schedule
    position, AdamW's common step and hyperparameters, every rank's RNG state, router biases,
    version, the model's layout) is small and goes into rank 0's safetensors + JSON beside it.
    :meth:`MegatronEngine.load_sharded` reads back the slices this rank holds, so a checkpoint
    resumes exactly on one process and under EP, and at another EP size (resharding: EP=2 -> EP=1
    and back give the same weights and moments). ``torch.distributed.checkpoint`` pickles its
    ``.metadata`` file: only checkpoints this run wrote, in its own work directory, are resumed;
    weights for users stay safetensors (:meth:`MegatronEngine.save_hf`). :meth:`state_dict` is this
    rank's in-memory state (same layout only).

Distributed optimizer (``engine.distributed_optimizer``, ZeRO-1)
    megatron's DDP runs with ``use_distributed_optimizer`` and the optimizer is megatron-core's
    ``DistributedOptimizer`` (``get_megatron_optimizer``: Adam with decoupled weight decay, one for
    the dense parameters and, under EP, one for the experts, chained): each data-parallel rank keeps
    the fp32 main parameters and Adam moments of its shard of the gradient buffer; gradients are
    reduce-scattered and the updated parameters all-gathered after each step. The update is the
    torch-AdamW path's: every step the engine sets each param group's ``lr`` (the schedule) and
    ``weight_decay`` (``engine.weight_decay`` times megatron's ``wd_mult``, 0 for norms and biases,
    the same 1-d rule), and takes the step apart (``prepare_grads``, ``get_grad_norm`` over every
    rank's shard, clipping by that global norm, ``step_with_ready_grads``) so a non-finite loss or
    norm on any rank skips the update everywhere, as without it; the metrics are the same. The L2
    anchor and aux-loss-free balancing (both tested), token KD and the KL anchor act on the loss and
    the all-gathered parameters, so they need nothing else. Checkpoints use megatron's
    ``dp_reshardable`` optimizer format through :meth:`save_sharded` / :meth:`load_sharded` (exact
    resume; at the EP size that saved, while the number of data-parallel ranks may change; each
    optimizer kind refuses the other's checkpoint); :meth:`state_dict` and :meth:`load_state_dict`
    refuse. With bfloat16 or float16 parameters the update differs from the torch-AdamW path's on
    purpose: megatron keeps fp32 master copies (fp16 gets a constant loss scale of 1, i.e. none).
    Tested on CPU only, over gloo through the tests' shim (which also makes ``Tensor.type()`` name
    CPU tensors as CUDA types for megatron's checks), with torch's AdamW inside: DP=2 and EP=2
    against the one-process torch-AdamW engine, the skip and the resume. No GPU run yet (there, with
    TransformerEngine or Apex installed, megatron uses their FusedAdam, which keeps the step in its
    param groups; the checkpoint workarounds then do nothing).

Experts
    :mod:`.model` builds the TransformerEngine-free local spec: ``SequentialMLP`` experts (a loop over
    the local experts), or with ``engine.grouped_gemm`` megatron's legacy ``GroupedMLP`` (one grouped
    GEMM per projection; bfloat16 and the ``grouped_gemm`` package, which builds on CUDA only). The
    weights are mapped into either layout and gathered back from it for ``save_hf``; checkpoints keep
    the layout they were written with. Tested on CPU through the shim's stand-in for
    ``grouped_gemm.ops.gmm`` (``torch._grouped_mm``); no GPU run.

Not implemented yet
    TransformerEngine layers (the TE spec; the mapping covers the ``te_grouped`` expert layout) and
    fused attention: the local spec's attention materialises ``[B, heads, T, T]`` scores. Pipeline
    and context parallel.

Shape legend: ``B`` sequences, ``T`` input positions (seq_len), ``T1`` = T + 1 packed tokens, ``V``
vocabulary, ``E`` experts, ``L`` MoE layers, ``D`` rotary dimension, ``P`` positions in the table.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from moe_adapt import distributed
from moe_adapt.checkpoint import router_bias as bias_file
from moe_adapt.checkpoint.hf import DTYPES, TOKENIZER_FILES, load_causal_lm
from moe_adapt.engines import data_parallel, objectives, router_health
from moe_adapt.engines.base import Engine
from moe_adapt.engines.batch import TrainBatch, batch_field, batch_tokens
from moe_adapt.engines.hf.config import HFConfig
from moe_adapt.engines.kd import frozen_models, token_kd_terms
from moe_adapt.engines.megatron import checkpoint as dist_ckpt
from moe_adapt.engines.megatron.hf_arch import read_hf_arch
from moe_adapt.engines.megatron.mapping import (
    MegatronShard,
    gather_megatron_shards,
    hf_to_megatron,
    megatron_to_hf,
    unpack_experts,
)
from moe_adapt.engines.megatron.model import (
    Dispatcher,
    build_gpt_model,
    current_shard,
    expert_layout,
    load_megatron_state,
    transformer_config_from_hf,
)
from moe_adapt.engines.megatron.parallel import (
    check_parallel_state,
    init_parallel,
    mark_tensor_parallel,
    resolve_device,
)
from moe_adapt.engines.optim import build_adamw, scheduled_lr
from moe_adapt.errors import CheckpointError, MoEAdaptConfigError, MoEAdaptError
from moe_adapt.fs import atomic_dir

log = logging.getLogger(__name__)

__all__ = ["STATE_VERSION", "MegatronEngine", "init_parallel"]

STATE_VERSION = 1
ENGINE_NAME = "megatron"
_EXPERT_KEY = re.compile(r"^(.*\.local_experts\.)(\d+)(\..*)$")


# -- packed sequences -----------------------------------------------------------------------------
def packed_attention_mask(position_ids_BT: torch.Tensor) -> torch.Tensor | None:
    """Megatron's boolean attention mask (True = masked) for packed rows, or None when every row is
    one sequence.

    A new example starts wherever the position does not follow the previous one by exactly 1 (the
    rule transformers' ``find_packed_sequence_indices`` uses); a query sees the keys of its own
    example up to itself. Returns ``[B, 1, T, T]``.
    """
    first_B1 = position_ids_BT[:, :1] - 1
    segment_BT = (torch.diff(position_ids_BT, prepend=first_B1, dim=-1) != 1).cumsum(-1)
    if not bool(segment_BT[:, -1].any()):
        return None
    num = position_ids_BT.shape[1]
    causal_TT = torch.ones(num, num, dtype=torch.bool, device=position_ids_BT.device).tril()
    same_BTT = segment_BT[:, :, None] == segment_BT[:, None, :]
    return ~(same_BTT & causal_TT)[:, None]


class _RotaryPositions:
    """Forward hook on megatron's ``RotaryEmbedding``: while :attr:`position_ids_BT` is set, the table
    ``[T, 1, 1, D]`` for positions 0..T-1 is replaced by each token's own row ``[T, B, 1, D]``."""

    def __init__(self, rotary: torch.nn.Module) -> None:
        self.position_ids_BT: torch.Tensor | None = None
        self.handle = rotary.register_forward_hook(self._hook)

    def _hook(self, module: Any, args: Any, emb_T11D: torch.Tensor) -> torch.Tensor:
        if self.position_ids_BT is None:
            return emb_T11D
        positions = int(self.position_ids_BT.max()) + 1
        table_PD = module.get_emb(positions)[:, 0, 0, :]  # megatron's own frequencies, per position
        return table_PD[self.position_ids_BT.t()][:, :, None, :]


# -- the distributed optimizer ----------------------------------------------------------------------
def _distributed_optimizer(ddp: Any, cfg: HFConfig, dtype: torch.dtype) -> Any:
    """megatron's ``DistributedOptimizer`` (Adam with decoupled weight decay) over ``ddp``'s buffers:
    cfg's betas, eps, weight decay and clip; one ``DistributedOptimizer`` for the dense parameters and
    one for the experts under EP, chained.

    Its parameter groups put norms and biases (1-d tensors) at ``wd_mult`` 0, the torch-AdamW path's
    rule; :meth:`MegatronEngine.step` sets each group's ``lr`` and ``weight_decay`` (wd × ``wd_mult``)
    every step, the job of megatron's LR scheduler, which the engine does not use. fp16 parameters get
    a constant loss scale of 1 (the loss is never scaled; megatron's dynamic scaler would divide the
    gradients by its scale).
    """
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(
        optimizer="adam",
        lr=scheduled_lr(cfg, 0, None),
        min_lr=0.0,
        weight_decay=cfg.weight_decay,
        adam_beta1=cfg.betas[0],
        adam_beta2=cfg.betas[1],
        adam_eps=cfg.eps,
        clip_grad=cfg.grad_clip or 0.0,
        use_distributed_optimizer=True,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        params_dtype=dtype,
        loss_scale=1.0 if dtype == torch.float16 else None,
    )
    return get_megatron_optimizer(config, [ddp])


# -- the engine -----------------------------------------------------------------------------------
class MegatronEngine(Engine):
    """Trains an HF MoE checkpoint (Mixtral, Qwen2-MoE, Qwen3-MoE) as a megatron-core ``GPTModel``.

    Same constructor, methods and metrics as :class:`~moe_adapt.engines.hf.HFEngine`; see the module
    docstring for what is matched and what is refused. megatron's ``parallel_state`` must be
    initialised first (:func:`init_parallel`); the expert-parallel size is taken from it.

    Args:
        checkpoint: HF checkpoint folder (``config.json`` + safetensors).
        cfg: optimizer, schedule and loss settings (the hf engine's dataclass).
        device: ``cuda`` (default when available); ``cpu`` only with the test shim.
        lr_multiplier: scales the scheduled LR of each step (a pure function of the step).
        kd, teacher: token-level distillation (as the hf engine): with ``kd`` the LM term becomes
            :func:`~moe_adapt.engines.objectives.token_kd_loss` against ``teacher`` (an HF checkpoint
            folder or model, run online on every rank) or, without one, the batch's stored top-k.
        dispatcher: megatron token dispatcher, ``alltoall`` (default; expert parallel) or ``allgather``.
    """

    cfg: HFConfig

    def __init__(
        self,
        checkpoint: str | Path,
        cfg: HFConfig | None = None,
        *,
        device: str | torch.device | None = None,
        lr_multiplier: Callable[[int], float] | None = None,
        kd: objectives.KDSettings | None = None,
        teacher: Any = None,
        dispatcher: Dispatcher = "alltoall",
    ) -> None:
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
        from megatron.core.transformer.moe.router import TopKRouter

        self.cfg = cfg or HFConfig()
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
        self.expert_bias_LE = self._initial_router_bias(hf_model, sum(arch.moe_layers), arch.num_experts)
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
            self._instrument_router(router, layer)
        self._num_routers = len(routers)
        self._rotary = _RotaryPositions(self.model.rotary_pos_emb)

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
            self.optimizer = _distributed_optimizer(self.ddp, self.cfg, dtype)
        else:
            self.optimizer = build_adamw(
                [p for p in self._params if p.dim() >= 2],
                [p for p in self._params if p.dim() < 2],
                self.cfg,
                self.device,
            )
        self.steps = 0  # optimizer steps taken or skipped (the LR schedule position)
        self._load_LE: torch.Tensor | None = None
        self._norm = torch.zeros(())  # the last gradient norm, for clipping by it
        self._routed_tokens = 0
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
        self._lang_counted: dict[str, float] = {}  # per language: KD positions (weights kd_selected/<lang>)
        self._counted = (0.0, 0.0)  # label positions that count: this rank's and the global batch's
        self._loss_report_offset = 0.0

    def _initial_router_bias(self, hf_model: Any, num_layers: int, num_experts: int) -> torch.Tensor | None:
        """The selection biases to route with: saved beside the checkpoint (``router_bias.json``, read
        as the hf engine reads it), zeros when ``bias_update_rate > 0`` starts balancing, else None."""
        saved = bias_file.load_router_bias(hf_model, self.source, self.cfg.bias_update_rate or 1e-3)
        if saved is not None:
            bias_LE = saved.bias_LE()
            saved.remove()
            return bias_LE.to(self.device)
        if self.cfg.bias_update_rate > 0:
            return torch.zeros(num_layers, num_experts, dtype=torch.float32, device=self.device)
        return None

    def _instrument_router(self, router: Any, layer: int) -> None:
        """Wrap this router instance's ``gating`` to record its logits and, with selection biases, its
        ``routing`` to select ``topk(softmax(logits) + bias)`` as :mod:`moe_adapt.engines.router_health`'s
        hook does in the hf engine (gate weights from the unbiased probabilities)."""
        gating, top_k, engine = router.gating, self.moe[1], self

        def gating_and_capture(input: torch.Tensor) -> torch.Tensor:
            logits = gating(input)
            engine._router_logits.append(logits)
            return logits

        def biased_routing(
            logits: torch.Tensor, padding_mask: Any = None
        ) -> tuple[torch.Tensor, torch.Tensor]:
            assert engine.expert_bias_LE is not None
            logits_TE = logits.view(-1, logits.shape[-1])
            probs_TE = torch.softmax(logits_TE.float(), dim=-1)
            with torch.no_grad():
                topk_idx_TK = torch.topk(probs_TE + engine.expert_bias_LE[layer], top_k, dim=-1).indices
            weights_TK = probs_TE.gather(-1, topk_idx_TK)
            if engine.renormalize_topk:
                weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
            rows_T1 = torch.arange(logits_TE.shape[0], device=logits.device)[:, None]
            routing_probs_TE = torch.zeros_like(logits_TE).index_put(
                (rows_T1, topk_idx_TK), weights_TK.type_as(logits)
            )
            selected_TK = torch.ones_like(topk_idx_TK, dtype=torch.bool)
            routing_map_TE = torch.zeros_like(logits_TE, dtype=torch.bool).index_put(
                (rows_T1, topk_idx_TK), selected_TK
            )
            return routing_probs_TE, routing_map_TE

        router.gating = gating_and_capture
        if self.expert_bias_LE is not None:
            router.routing = biased_routing

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
            attention_mask_B1TT = packed_attention_mask(position_ids_BT)
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
        if self.kd is not None:
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
    def _model_tensors(self) -> dict[str, torch.Tensor]:
        """This rank's model state without megatron's ``_extra_state`` entries."""
        return {
            k: v
            for k, v in self.model.state_dict().items()
            if torch.is_tensor(v) and not k.endswith("_extra_state")
        }

    def state_dict(self) -> dict[str, Any]:
        """This rank's whole engine state, in memory: model (megatron names), optimizer, schedule
        position and RNG, as tensors and JSON values.

        Tensors are cloned (safetensors refuses shared memory); the optimizer's per-parameter state
        is keyed by the parameter index as a string. Under expert parallel the model and optimizer
        hold this rank's experts only, so the state fits the same EP rank and size only. Training
        checkpoints do not use it: the trainer saves with :meth:`save_sharded`, which every rank
        writes together and any EP size resumes.

        Raises:
            MoEAdaptError: with ``engine.distributed_optimizer`` (each rank holds a shard of the
                optimizer state in megatron's own layout): save with :meth:`save_sharded`.
        """
        self._refuse_in_memory_state("state_dict")
        opt = self.optimizer.state_dict()
        rng: dict[str, Any] = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "version": STATE_VERSION,
            "engine": ENGINE_NAME,
            "expert_parallel": {"rank": self.ep_rank, "size": self.ep_size},
            "model": {k: v.detach().clone() for k, v in self._model_tensors().items()},
            "optimizer": {
                "state": {str(i): dict(s) for i, s in opt["state"].items()},
                "param_groups": opt["param_groups"],
            },
            "steps": self.steps,
            "rng": rng,
            **self._router_bias_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict` into an engine built from the same checkpoint, config and layout
        (the same EP rank and size). A training checkpoint is restored with :meth:`load_sharded`.
        Refused with ``engine.distributed_optimizer`` (as :meth:`state_dict`)."""
        self._refuse_in_memory_state("load_state_dict")
        self._check_state(state)
        layout = {"rank": self.ep_rank, "size": self.ep_size}
        if state.get("expert_parallel") != layout:
            raise CheckpointError(
                f"this checkpoint holds expert-parallel rank/size {state.get('expert_parallel')}, this "
                f"process is {layout}: resume with the same expert_parallel size"
            )
        if "model" not in state:
            raise CheckpointError(
                "this engine state holds no model: it is the small part of a sharded checkpoint "
                "(MegatronEngine.save_sharded); restore it with load_sharded (Trainer.resume does)"
            )
        self._check_router_bias(state)
        try:
            load_megatron_state(self.model, state["model"])
        except MoEAdaptError as err:
            raise CheckpointError(f"checkpoint does not fit the megatron model: {err}") from None
        opt = state["optimizer"]
        self.optimizer.load_state_dict(
            {"state": {int(i): s for i, s in opt["state"].items()}, "param_groups": opt["param_groups"]}
        )
        self._load_router_bias(state)
        self.steps = int(state["steps"])
        torch.set_rng_state(state["rng"]["torch"].to(torch.uint8))
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"].to(torch.uint8), self.device)

    def _refuse_in_memory_state(self, method: str) -> None:
        if self.cfg.distributed_optimizer:
            raise MoEAdaptError(
                f"MegatronEngine.{method} is not available with engine.distributed_optimizer=true (every "
                "rank holds a shard of the optimizer state in megatron's layout): checkpoint with "
                "save_sharded / load_sharded, as the trainer does"
            )

    def save_sharded(self, path: str | Path) -> dict[str, Any]:
        """Write the model and the AdamW moments into folder ``path`` with megatron-core's
        ``dist_checkpointing``; return the rest of the engine state for the trainer's checkpoint.

        Collective: every rank calls it with the same ``path``, a folder all ranks see (made if
        missing; :class:`~moe_adapt.train.callbacks.CheckpointCallback` passes a fresh temporary
        folder and renames the step folder once everything is written). Each rank writes its own
        experts under their global indices and the dense tensors are written once, so the folder
        holds the whole model and optimizer whatever the EP size (:mod:`.checkpoint`). With
        ``engine.distributed_optimizer`` each rank writes its shard of megatron's optimizer state
        (``dp_reshardable``) instead of the AdamW moments.

        The returned state (tensors and JSON values, the same on every rank; the trainer's rank 0
        writes it as safetensors + JSON) holds ``version``, ``engine``, ``expert_parallel`` (the EP
        size that saved), ``sharded`` (format, the model's global layout, AdamW's common step and
        hyperparameters), ``steps``, ``rng`` (every rank's RNG state, ``[ranks, N]``) and the router
        biases with aux-loss-free balancing.
        """
        meta = dist_ckpt.save_sharded(Path(path), self.model, self.optimizer)
        return {
            "version": STATE_VERSION,
            "engine": ENGINE_NAME,
            "expert_parallel": {"size": self.ep_size},
            "sharded": meta,
            "steps": self.steps,
            "rng": dist_ckpt.gather_rng(self.device),
            **self._router_bias_state(),
        }

    def load_sharded(self, path: str | Path, state: dict[str, Any]) -> None:
        """Restore what :meth:`save_sharded` wrote to ``path`` and returned (``state``), at any EP size.

        Collective. The engine must be built from the run's checkpoint and config; the expert
        parallel size may differ from the one that saved (each rank reads the experts it holds now:
        a checkpoint saved at EP=2 resumes at EP=1 and the other way round, with the same weights and
        AdamW moments; with ``engine.distributed_optimizer`` the EP size must be the saving one, the
        number of data-parallel ranks may change). RNG: each rank takes the state its rank saved, or
        rank ``rank % saved_ranks``'s when the number of processes changed (training draws no random
        numbers: no dropout, no router jitter). megatron's model-parallel RNG tracker is not saved
        for the same reason.

        Raises:
            CheckpointError: naming the folder, when it is missing or not a dist_checkpointing
                folder, when ``state`` was written by another engine or by :meth:`state_dict`, or
                when the checkpoint holds another model (layout, dtype), router-bias setting or
                optimizer kind (``engine.distributed_optimizer``; with it, another EP size).
        """
        folder = Path(path)
        self._check_state(state)
        if "sharded" not in state:
            raise CheckpointError(
                f"{folder}: this engine state has no sharded part (it is a MegatronEngine.state_dict); "
                "restore it with load_state_dict"
            )
        self._check_router_bias(state)
        saved_ep = state.get("expert_parallel", {}).get("size")
        if saved_ep != self.ep_size:
            log.info(
                "resharding %s: saved at expert_parallel=%s, loading at %d", folder, saved_ep, self.ep_size
            )
        dist_ckpt.load_sharded(folder, self.model, self.optimizer, state["sharded"])
        self._load_router_bias(state)
        self.steps = int(state["steps"])
        dist_ckpt.restore_rng(state["rng"], self.device)

    def _check_state(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise CheckpointError(f"engine state version {state.get('version')!r} is not {STATE_VERSION}")
        if state.get("engine") != ENGINE_NAME:
            raise CheckpointError(
                "this training checkpoint was not written by the megatron engine: resume it with the "
                "engine that wrote it (engine=hf)"
            )

    def _router_bias_state(self) -> dict[str, Any]:
        if self.expert_bias_LE is None:
            return {}
        return {"router_bias": {"expert_bias_LE": self.expert_bias_LE.detach().cpu().clone()}}

    def _check_router_bias(self, state: dict[str, Any]) -> None:
        if (self.expert_bias_LE is not None) != ("router_bias" in state):
            raise CheckpointError(
                "the checkpoint's router bias does not match engine.bias_update_rate "
                "(resume with the run's engine.bias_update_rate)"
            )
        if self.expert_bias_LE is not None:
            saved_LE = state["router_bias"]["expert_bias_LE"]
            if tuple(saved_LE.shape) != tuple(self.expert_bias_LE.shape):
                raise CheckpointError(
                    f"router bias {tuple(saved_LE.shape)} does not fit {tuple(self.expert_bias_LE.shape)}"
                )

    def _load_router_bias(self, state: dict[str, Any]) -> None:
        if self.expert_bias_LE is not None:
            self.expert_bias_LE.copy_(state["router_bias"]["expert_bias_LE"].to(self.expert_bias_LE))

    def _full_model_tensors(self) -> dict[str, torch.Tensor]:
        """The whole model's megatron state on every rank (experts gathered over EP and numbered
        globally, in the sequential layout; tensor-parallel slices gathered and merged)."""
        local = unpack_experts(self._model_tensors(), self._arch, self.moe[0] // self.ep_size)
        if self.ep_size == 1 and self.tp_size == 1:
            return local
        from megatron.core import parallel_state

        full: dict[str, torch.Tensor] = {}
        experts: dict[str, torch.Tensor] = {}
        per_rank = self.moe[0] // self.ep_size
        for key in sorted(local):
            match = _EXPERT_KEY.match(key)
            if match is None:
                full[key] = local[key]
                continue
            parts = [local[key]]
            if self.ep_size > 1:
                parts = [torch.empty_like(local[key]) for _ in range(self.ep_size)]
                dist.all_gather(
                    parts, local[key].contiguous(), group=parallel_state.get_expert_model_parallel_group()
                )
            head, index, tail = match.group(1), int(match.group(2)), match.group(3)
            for rank, part in enumerate(parts):
                experts[f"{head}{rank * per_rank + index}{tail}"] = part
        if self.tp_size == 1:
            return full | experts
        group = parallel_state.get_tensor_model_parallel_group()
        slices: list[dict[str, torch.Tensor]] = [{} for _ in range(self.tp_size)]
        for key, tensor in full.items():  # every experts is whole on its rank (ETP = 1)
            parts = [torch.empty_like(tensor) for _ in range(self.tp_size)]
            dist.all_gather(parts, tensor.contiguous(), group=group)
            for rank, part in enumerate(parts):
                slices[rank][key] = part
        shards = [
            (MegatronShard(tp_rank=rank, tp_size=self.tp_size), part | experts)
            for rank, part in enumerate(slices)
        ]
        return gather_megatron_shards(shards, self.hf_config)

    def _hf_state(self) -> dict[str, torch.Tensor]:
        """The current weights in the HF in-memory layout, on the CPU, sharing nothing with training."""
        full = self._full_model_tensors()
        return megatron_to_hf({k: v.detach().to("cpu", copy=True) for k, v in full.items()}, self.hf_config)

    def _build_hf_model(self, hf_state: dict[str, torch.Tensor]) -> tuple[Any, bias_file.RouterBias | None]:
        from transformers import AutoModelForCausalLM
        from transformers.initialization import no_init_weights

        with no_init_weights():  # every weight is assigned below; buffers (RoPE) are built as usual
            hf_model = AutoModelForCausalLM.from_config(self.hf_config, dtype=DTYPES[self.cfg.dtype])
        hf_model.load_state_dict(hf_state, strict=True, assign=True)
        if self.tied_embeddings:
            hf_model.tie_weights()
        bias = None
        if self.expert_bias_LE is not None:
            bias = bias_file.RouterBias.install(hf_model, self.cfg.bias_update_rate or 1e-3)
            bias.load_state_dict({"expert_bias_LE": self.expert_bias_LE.cpu()})
        return hf_model, bias

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
        hf_model, _ = self._build_hf_model(self._hf_state())
        return hf_model.to(self.device).eval()

    def save_hf(self, path: str | Path) -> Path:
        """Write the model as an HF checkpoint folder (safetensors) atomically, with the source's
        tokenizer files (and ``router_bias.json`` with aux-loss-free balancing); vanilla
        ``transformers`` loads it.

        Collective under expert parallel (the experts are gathered); global rank 0 writes.
        """
        final = Path(path)
        hf_state = self._hf_state()
        if not dist.is_initialized() or dist.get_rank() == 0:
            hf_model, bias = self._build_hf_model(hf_state)
            with atomic_dir(final) as tmp:
                hf_model.save_pretrained(str(tmp))
                if bias is not None:
                    bias_file.save_router_bias(bias, tmp)
                for name in (*TOKENIZER_FILES, "generation_config.json"):
                    if (self.source / name).is_file():
                        shutil.copy2(self.source / name, tmp / name)
        if dist.is_initialized() and self._world() > 1:
            dist.barrier()
        return final
