"""The frozen models an engine runs beside the one it trains, and token-level distillation's terms.

The KL anchor's reference model and token KD's online teacher are loaded here
(:func:`frozen_models`); :func:`token_kd_terms` turns one batch's student logits and the teacher's
distribution (online, or the batch's stored top-k) into the loss terms both engines report.

Shape legend: ``B`` sequences, ``T`` label positions, ``V`` vocabulary, ``N`` = B·T positions.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from moe_adapt.checkpoint.hf import load_causal_lm
from moe_adapt.engines import objectives
from moe_adapt.engines.batch import batch_field
from moe_adapt.errors import MoEAdaptError

if TYPE_CHECKING:
    from moe_adapt.engines.base import EngineConfig


def load_teacher(teacher: str | Path | Any, dtype: torch.dtype, device: torch.device, vocab_size: int) -> Any:
    """The frozen online teacher for token KD, on ``device``: an HF checkpoint folder (read with
    :func:`load_causal_lm`) or a loaded model. It must share the student's ``vocab_size``."""
    model: Any = load_causal_lm(teacher, dtype) if isinstance(teacher, str | Path) else teacher
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
    cfg: EngineConfig,
    kd: objectives.KDSettings | None,
    teacher: str | Path | Any,
    dtype: torch.dtype,
    device: torch.device,
    vocab_size: int,
) -> tuple[Any, Any]:
    """The frozen models an engine runs beside the one it trains: the KL anchor's reference (when
    ``cfg.kl_anchor_coef > 0``) and token KD's online teacher (:func:`load_teacher`); None for
    each that is not used."""
    reference: Any = None
    if cfg.kl_anchor_coef > 0:
        assert cfg.reference is not None  # checked by the config
        reference = load_causal_lm(cfg.reference, dtype)
        reference = reference.to(device).eval()
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
