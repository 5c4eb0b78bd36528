"""The ``hf`` training engine: a transformers causal LM, AdamW, warmup + cosine LR (implements
:class:`~moe_adapt.engines.base.Engine`; settings in :mod:`.config`, DDP/FSDP2 in :mod:`.parallel`).

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

import logging
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moe_adapt import distributed
from moe_adapt.checkpoint import router_bias as bias_file
from moe_adapt.checkpoint.hf import DTYPES, TOKENIZER_FILES, load_causal_lm
from moe_adapt.checkpoint.router_bias import RouterBias
from moe_adapt.distributed import DistContext
from moe_adapt.engines import data_parallel, objectives, router_health
from moe_adapt.engines import lora as lora_lib
from moe_adapt.engines.base import Engine, fail
from moe_adapt.engines.batch import TrainBatch, batch_field, batch_tokens
from moe_adapt.engines.hf.config import HFConfig
from moe_adapt.engines.hf.parallel import WholeForward, resolve_parallel, wrap_model
from moe_adapt.engines.kd import token_kd_terms
from moe_adapt.engines.lora import LoRAConfig
from moe_adapt.engines.megatron.config import MegatronConfig
from moe_adapt.engines.optim import build_adamw
from moe_adapt.errors import CheckpointError, MoEAdaptError
from moe_adapt.fs import atomic_dir

log = logging.getLogger(__name__)

STATE_VERSION = 1


def _moe_shape(config: Any) -> tuple[int, int] | None:
    """``(num_experts, top_k)`` of an MoE config, None for a dense model."""
    experts = getattr(config, "num_experts", None) or getattr(config, "num_local_experts", None)
    top_k = getattr(config, "num_experts_per_tok", None)
    if experts and top_k:
        return int(experts), int(top_k)
    return None


class HFEngine(Engine):
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
        cfg: HFConfig | None = None,
        *,
        device: str | torch.device | None = None,
        lr_multiplier: Callable[[int], float] | None = None,
        kd: objectives.KDSettings | None = None,
        teacher: Any = None,
        dist: DistContext | None = None,
        lora: LoRAConfig | None = None,
    ) -> None:
        self.cfg = cfg or HFConfig()
        if isinstance(self.cfg, MegatronConfig) and self.cfg.distributed_optimizer:  # an engine=auto config
            fail(
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
        self.lora = lora if lora is not None and lora.enabled else None
        """LoRA settings (:mod:`moe_adapt.engines.lora`; None: every weight trains)."""
        if self.lora is not None and self.parallel == "fsdp2":
            fail("parallel", "fsdp2", "LoRA trains with engine.parallel=ddp or none (its base is frozen)")
        if self.lora is not None:
            lora_lib.check_quantization(self.lora, self.device)
        model: Any = (
            lora_lib.load_quantized(self.source, dtype, self.device)
            if self.lora is not None and self.lora.quantize == "4bit"
            else load_causal_lm(self.source, dtype, router_bias=False)
        )
        if self.lora is not None:
            model = lora_lib.wrap(model, self.lora)
        self.model = model
        """The transformers ``PreTrainedModel`` being trained (not the DDP wrapper; under FSDP2 its
        parameters are sharded DTensors; with LoRA the peft model around it)."""
        if self.parallel != "fsdp2" and not (self.lora is not None and self.lora.quantize == "4bit"):
            self.model.to(self.device)  # fully_shard moves each rank's shards itself; bnb places 4-bit
        self.model.train()
        self.lr_multiplier = lr_multiplier
        self.moe = _moe_shape(self.model.config)
        self.vocab_size = int(self.model.config.vocab_size)
        if self.cfg.bias_update_rate > 0 and self.moe is None:
            fail(
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
        # what the training forward calls (the DDP wrapper)
        self._forward_model: Any = wrap_model(self.model, self.parallel, self.device, self.dist)
        named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self._params = [p for _, p in named]
        decay = [p for p in self._params if p.dim() >= 2]
        no_decay = [p for p in self._params if p.dim() < 2]
        # parameter names in the optimizer's order: its state is keyed by position in this list
        self._param_names = [n for n, p in named if p.dim() >= 2] + [n for n, p in named if p.dim() < 2]
        self.optimizer = build_adamw(decay, no_decay, self.cfg, self.device)
        self._init_training_state(self._params, kd, teacher, dtype)

    @property
    def eval_model(self) -> Any:
        """The module to evaluate with (held-out loss): the model itself; under FSDP2 a wrapper without
        the decoder/head accessors, so evaluation runs the whole forward of the root module, the only
        call that gathers every unit's shards (calling the decoder or the head alone would not)."""
        return WholeForward(self.model) if self.parallel == "fsdp2" else self.model

    # -- forward -------------------------------------------------------------------------------
    def _tokens(self, tokens_BT1: torch.Tensor | np.ndarray) -> torch.Tensor:
        return batch_tokens(tokens_BT1, self.vocab_size, self.device)

    def _field(self, batch: Any, name: str, dtype: torch.dtype) -> torch.Tensor | None:
        return batch_field(batch, name, dtype, self.device)

    def forward_loss(self, batch: Any) -> dict[str, torch.Tensor]:
        """Loss terms of one batch; ``loss`` is their weighted sum.

        ``batch`` is ``tokens_BT1`` (packed sequences: inputs ``[:, :-1]``, labels ``[:, 1:]``) or an
        object with that as ``.tokens`` and optionally (see :class:`~moe_adapt.engines.batch.TrainBatch`)
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
        if self.kd is not None and getattr(batch, "kd", True):  # replay batches: plain LM loss
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

    # -- step (the bookkeeping is Engine.step's) ------------------------------------------------
    def _forward_backward(self, batch: TrainBatch | Any, lr: float) -> tuple[dict[str, float], float, bool]:
        if self.parallel != "none":
            metrics, skipped, grad_norm = self._shared_step(batch, lr)
            return metrics, grad_norm, skipped
        terms = self.forward_loss(batch)
        metrics = {k: float(v.detach()) for k, v in terms.items()}
        mask = getattr(batch, "loss_mask", None)
        tokens = (
            torch.as_tensor(getattr(batch, "tokens", batch))[:, 1:].numel() if mask is None else mask.sum()
        )
        metrics.update(lr=lr, tokens=float(tokens))
        skipped = not math.isfinite(metrics["loss"])
        grad_norm = float("nan")
        if not skipped:
            terms["loss"].backward()
            grad_norm = self._clip_grad_norm()
            skipped = not math.isfinite(grad_norm)
        return metrics, grad_norm, skipped

    def _apply_update(self, grad_norm: float) -> None:
        self.optimizer.step()  # the gradients were clipped when their norm was taken

    def _expert_load(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        if self._load_LE is None:
            return None
        assert self.moe is not None
        load_LE, self._load_LE = self._load_LE, None
        dropped_L = router_health.dropped_tokens(
            load_LE, self.cfg.capacity_factor, self._routed_tokens, self.moe[1]
        )
        return load_LE, dropped_L

    def _update_router_bias(self, load_LE: torch.Tensor) -> None:
        if self.router_bias is not None:
            self.router_bias.update(load_LE)

    def _reports_skips(self) -> bool:
        return self.dist.is_main

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
        tokenizer files; vanilla ``transformers`` loads it. With LoRA the adapters are written to
        ``<path>/../adapter`` (peft's format) and the model is the base, reloaded in ``engine.dtype``,
        with them merged. With several processes rank 0 writes it (under FSDP2 from the gathered
        shards) and every rank returns once it is in place."""
        final = Path(path)
        state = self._model_state() if self.parallel == "fsdp2" else None  # collective
        if state:  # tied parameters (embeddings) share one gathered tensor, so they are written once
            first: dict[int, str] = {}
            for name, param in self.model.named_parameters(remove_duplicate=False):
                if name in state:
                    state[name] = state[first.setdefault(id(param), name)]
        if self.dist.is_main:
            with atomic_dir(final) as tmp:
                if self.lora is not None:  # the adapters beside the model, the model merged
                    adapter = final.parent / "adapter"
                    lora_lib.save_merged(self.model, self.source, adapter, tmp, DTYPES[self.cfg.dtype])
                else:
                    self.model.save_pretrained(
                        str(tmp), **({"state_dict": state} if state is not None else {})
                    )
                if self.router_bias is not None:
                    bias_file.save_router_bias(self.router_bias, tmp)
                for name in TOKENIZER_FILES:
                    if (self.source / name).is_file():
                        shutil.copy2(self.source / name, tmp / name)
        distributed.barrier(self.dist)
        return final
