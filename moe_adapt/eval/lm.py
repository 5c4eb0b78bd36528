"""Log-probabilities of chosen tokens without materialising the full ``[B, T, V]`` logits.

Legend: ``B`` batch, ``T`` time, ``H`` hidden size, ``V`` vocabulary, ``N`` scored positions.

Perplexity and multiple-choice scoring need the log-probability of one target token at some
positions. Running the causal LM's decoder and applying the output head only at those positions
saves the ``B × T × V`` logits tensor (10 GB for a batch of 8 × 2048 tokens at Qwen's 152k vocabulary)
and most of the softmax work. Models whose causal-LM wrapper changes the logits after the head
(soft-capping, logit scaling) fall back to the full forward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def _split(model: Any) -> tuple[Any, Any] | None:
    config = getattr(model, "config", None)
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS):
        return None
    get_decoder, get_head = getattr(model, "get_decoder", None), getattr(model, "get_output_embeddings", None)
    if get_decoder is None or get_head is None:
        return None
    decoder, head = get_decoder(), get_head()
    return (decoder, head) if decoder is not None and head is not None and decoder is not model else None


def target_logprobs(
    model: Any, input_ids_BT: torch.Tensor, attention_mask_BT: torch.Tensor, predict_BT: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``log p(input_ids[b, t+1] | input_ids[b, :t+1])`` at every ``(b, t)`` where ``predict_BT`` is set.

    ``predict_BT[:, -1]`` must be False (the last position has no target). Returns the log-probs
    ``[N]`` (fp32) and the row index ``[N]`` of each, in row-major order.
    """
    pos_BT = predict_BT[:, :-1]
    rows_N = pos_BT.nonzero()[:, 0]
    targets_N = input_ids_BT[:, 1:][pos_BT]
    parts = _split(model)
    if parts is None:
        logits_BTV = model(input_ids=input_ids_BT, attention_mask=attention_mask_BT, use_cache=False).logits
        logits_NV = logits_BTV[:, :-1][pos_BT].float()
    else:
        decoder, head = parts
        hidden_BTH = decoder(input_ids=input_ids_BT, attention_mask=attention_mask_BT, use_cache=False)[0]
        logits_NV = head(hidden_BTH[:, :-1][pos_BT]).float()
    return -F.cross_entropy(logits_NV, targets_N, reduction="none"), rows_N
