"""What the megatron engine changes around megatron-core's forward so that it routes and attends as
the transformers model does: the packed-sequence attention mask and per-token rotary positions, and
each router instance wrapped to capture its logits and, with aux-loss-free balancing, to select with
the selection biases. See docs/engines.md ("How each HF behaviour is matched").

Shape legend: ``B`` sequences, ``T`` positions, ``D`` rotary dimension, ``P`` positions in the table,
``L`` MoE layers, ``E`` experts, ``K`` experts per token.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from moe_adapt.checkpoint import router_bias as bias_file

if TYPE_CHECKING:
    from moe_adapt.engines.megatron.engine import MegatronEngine


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


class RotaryPositions:
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


def initial_router_bias(
    engine: MegatronEngine, hf_model: Any, num_layers: int, num_experts: int
) -> torch.Tensor | None:
    """The selection biases to route with: saved beside the checkpoint (``router_bias.json``, read
    as the hf engine reads it), zeros when ``bias_update_rate > 0`` starts balancing, else None."""
    saved = bias_file.load_router_bias(hf_model, engine.source, engine.cfg.bias_update_rate or 1e-3)
    if saved is not None:
        bias_LE = saved.bias_LE()
        saved.remove()
        return bias_LE.to(engine.device)
    if engine.cfg.bias_update_rate > 0:
        return torch.zeros(num_layers, num_experts, dtype=torch.float32, device=engine.device)
    return None


def instrument_router(engine: MegatronEngine, router: Any, layer: int) -> None:
    """Wrap this router instance's ``gating`` to record its logits and, with selection biases, its
    ``routing`` to select ``topk(softmax(logits) + bias)`` as :mod:`moe_adapt.engines.router_health`'s
    hook does in the hf engine (gate weights from the unbiased probabilities)."""
    gating, top_k = router.gating, engine.moe[1]

    def gating_and_capture(input: torch.Tensor) -> torch.Tensor:
        logits = gating(input)
        engine._router_logits.append(logits)
        return logits

    def biased_routing(logits: torch.Tensor, padding_mask: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
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
    if engine.expert_bias_LE is not None:
        router.routing = biased_routing
