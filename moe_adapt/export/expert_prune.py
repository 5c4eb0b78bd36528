"""``expert_prune``: drop the routed experts that the target languages' routing barely uses.

HF MoE configs hold **one** expert count for every layer (``num_experts`` / ``num_local_experts``),
so every MoE layer loses the same number of experts, ``drop_per_layer``; *which* ones is chosen per
layer: the experts with the smallest routed share, where each target language counts equally::

    usage_LE = mean over target languages g of  counts_g[l, e] / sum_e counts_g[l, e]

``counts_g`` are the top-k assignments of language ``g``'s held-out tokens (the eval stage's
``routing.json``, :mod:`moe_adapt.eval.routing`, or counted here with the same code). The router
loses the dropped experts' rows, so its softmax renormalises over the experts kept; ``top_k`` is kept
and must not exceed the experts left. The shared expert (Qwen2-MoE) and everything outside the
routed experts is copied unchanged, byte for byte.

Reported: the experts dropped per layer (by their old index), the share of parameters removed, and
per language the **routed mass lost**: the share of its top-k assignments (over all MoE layers) that
went to a dropped expert. With ``drop_per_layer=0`` the checkpoint is a copy.

The checkpoint is rewritten tensor by tensor (:class:`~moe_adapt.checkpoint.hf.HFCheckpoint` in,
:class:`~moe_adapt.checkpoint.safetensors_io.ShardedWriter` out; an expert's tensor is copied by the
kernel under its new index), so memory stays bounded by the largest router, and the folder appears in
one rename. Both on-disk expert layouts are read: per expert (``...experts.{e}.gate_proj.weight``, what
``save_pretrained`` writes) and fused 3-D (``...experts.gate_up_proj``, first axis the expert).

Legend: ``L`` MoE layers, ``E`` routed experts, ``G`` target languages.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moe_adapt.checkpoint.hf import HFCheckpoint
from moe_adapt.checkpoint.router_bias import BIAS_FILE
from moe_adapt.checkpoint.safetensors_io import PlannedTensor, ShardedWriter
from moe_adapt.errors import MoEAdaptConfigError, MoEAdaptError
from moe_adapt.fs import atomic_dir, atomic_write_json

log = logging.getLogger(__name__)

__all__ = ["MoELayout", "RoutingCounts", "choose_experts", "find_eval_routing", "moe_layout", "prune"]

_PER_EXPERT = re.compile(r"^model\.layers\.(\d+)\.(.+?)\.experts\.(\d+)\.(.+)$")
_FUSED = re.compile(r"^model\.layers\.(\d+)\.(.+?)\.experts\.([A-Za-z_]\w*)$")
_ROUTER = re.compile(r"^model\.layers\.(\d+)\.(.+?)\.gate\.(\w+)$")
_EXPERT_KEYS = ("num_experts", "num_local_experts")
MAX_SHARD_BYTES = 2 * 2**30


@dataclass(frozen=True)
class MoELayout:
    """The routed experts of a checkpoint as its tensor names show them."""

    num_experts: int
    """Routed experts per MoE layer (the config's one count)."""
    expert_key: str
    """The config key holding it: ``num_experts`` (Qwen) or ``num_local_experts`` (Mixtral)."""
    top_k: int
    """``num_experts_per_tok``."""
    blocks: dict[int, str]
    """Decoder layer -> the module that holds its router and experts (``mlp``, ``block_sparse_moe``)."""


def moe_layout(ckpt: HFCheckpoint) -> MoELayout:
    """Find the MoE layers of ``ckpt`` from its tensor names and config.

    Raises:
        MoEAdaptError: the checkpoint has no routed experts (a dense model: nothing to prune).
    """
    key = next((k for k in _EXPERT_KEYS if isinstance(ckpt.config.get(k), int)), None)
    blocks: dict[int, str] = {}
    for name in ckpt.index:
        m = _PER_EXPERT.match(name) or _FUSED.match(name)
        if m:
            blocks[int(m.group(1))] = m.group(2)
    if key is None or not blocks:
        raise MoEAdaptError(
            f"expert_prune needs an MoE checkpoint: {ckpt.path} (model_type "
            f"{ckpt.config.get('model_type')!r}) has no routed experts"
        )
    return MoELayout(
        num_experts=int(ckpt.config[key]),
        expert_key=key,
        top_k=int(ckpt.config.get("num_experts_per_tok", 1)),
        blocks=dict(sorted(blocks.items())),
    )


@dataclass(frozen=True)
class RoutingCounts:
    """Top-k assignment counts per language: ``counts[lang]`` is ``L × E`` over ``layer_ids``."""

    layer_ids: list[int]
    """Decoder-layer index of each row."""
    counts: dict[str, np.ndarray]
    """Language -> ``counts_LE`` (int64)."""
    source: str
    """Where they came from (a routing.json path, or ``counted on held-out``)."""

    @classmethod
    def from_json(cls, path: str | Path) -> RoutingCounts:
        """Read the eval stage's ``routing.json`` (:func:`moe_adapt.eval.routing.routing_report`)."""
        try:
            doc = json.loads(Path(path).read_text(encoding="utf-8"))
            layer_ids = [int(i) for i in doc["layer_ids"]]
            counts = {str(g): np.asarray(c, dtype=np.int64) for g, c in doc["counts"].items()}
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise MoEAdaptError(
                f"export.expert_prune.routing={str(path)!r} is not a routing.json: {err}"
            ) from None
        return cls(layer_ids, counts, str(path))


def find_eval_routing(eval_dir: str | Path, model_path: str | Path) -> Path | None:
    """The eval stage's ``routing.json`` of the model at ``model_path`` (matched by resolved path in
    ``eval.json``), or None when the eval stage did not analyse that model."""
    eval_json = Path(eval_dir) / "eval.json"
    if not eval_json.is_file():
        return None
    try:
        models = json.loads(eval_json.read_text(encoding="utf-8")).get("models", {})
    except (OSError, ValueError):
        return None
    want = Path(model_path).resolve()
    for result in models.values():
        routing = result.get("routing", {}) if isinstance(result, dict) else {}
        if Path(str(result.get("path", ""))).resolve() == want and routing.get("json"):
            path = Path(eval_dir) / routing["json"]
            return path if path.is_file() else None
    return None


def choose_experts(
    routing: RoutingCounts, layout: MoELayout, drop_per_layer: int, languages: Sequence[str] = ()
) -> tuple[dict[int, list[int]], dict[str, Any]]:
    """The experts to drop per decoder layer and the routed mass each language loses.

    Returns ``(dropped, mass)``: decoder layer -> sorted old expert indices; and
    ``{"per_language": {lang: share}, "per_layer": {lang: [share per layer]}, "usage": [[...]]}``.

    Raises:
        MoEAdaptConfigError: ``drop_per_layer`` leaves fewer experts than ``top_k``; a language has no
            routing counts.
        MoEAdaptError: the counts do not match the checkpoint's MoE layers or expert count.
    """
    e, k = layout.num_experts, layout.top_k
    if drop_per_layer > e - k:
        raise MoEAdaptConfigError(
            f"export.expert_prune.drop_per_layer={drop_per_layer} is invalid: it leaves "
            f"{e - drop_per_layer} experts per layer, fewer than num_experts_per_tok={k} (at most {e - k})"
        )
    langs = list(languages) or list(routing.counts)
    missing = [g for g in langs if g not in routing.counts]
    if missing:
        raise MoEAdaptConfigError(
            f"export.expert_prune.languages={langs!r} is invalid: {routing.source} has no routing for "
            f"{missing}; it has {sorted(routing.counts)}"
        )
    if sorted(routing.layer_ids) != sorted(layout.blocks):
        raise MoEAdaptError(
            f"{routing.source} counts layers {routing.layer_ids}, the checkpoint's MoE layers are "
            f"{sorted(layout.blocks)}: it is the routing of another model"
        )
    counts_GLE = np.stack([np.asarray(routing.counts[g], dtype=np.float64) for g in langs])
    if counts_GLE.shape[2] != e:
        raise MoEAdaptError(f"{routing.source} counts {counts_GLE.shape[2]} experts, the checkpoint has {e}")
    per_layer_GL = counts_GLE.sum(axis=2)
    if np.any(per_layer_GL <= 0):
        raise MoEAdaptError(f"{routing.source}: a language routed no token in some layer")
    usage_LE = (counts_GLE / per_layer_GL[:, :, None]).mean(axis=0)
    dropped: dict[int, list[int]] = {}
    mask_LE = np.zeros(usage_LE.shape, dtype=bool)
    for row, layer in enumerate(routing.layer_ids):
        order = np.argsort(usage_LE[row], kind="stable")  # least used first; ties: lower index first
        chosen = sorted(int(i) for i in order[:drop_per_layer])
        dropped[layer] = chosen
        mask_LE[row, chosen] = True
    lost_GL = (counts_GLE * mask_LE[None]).sum(axis=2)
    mass = {
        "definition": "share of the language's top-k assignments (all MoE layers) that went to a "
        "dropped expert",
        "per_language": {g: float(lost_GL[i].sum() / per_layer_GL[i].sum()) for i, g in enumerate(langs)},
        "per_layer": {g: (lost_GL[i] / per_layer_GL[i]).tolist() for i, g in enumerate(langs)},
        "usage": usage_LE.tolist(),
        "languages": langs,
        "source": routing.source,
    }
    return dict(sorted(dropped.items())), mass


def _plan(
    ckpt: HFCheckpoint, layout: MoELayout, dropped: Mapping[int, Sequence[int]]
) -> tuple[list[PlannedTensor], dict[str, tuple[str, Any]]]:
    """The pruned checkpoint's tensors and, for each, how to make it: ``("copy", src)``,
    ``("rows", (src, kept))``."""
    e = layout.num_experts
    kept = {layer: [i for i in range(e) if i not in set(d)] for layer, d in dropped.items()}
    plan: list[PlannedTensor] = []
    how: dict[str, tuple[str, Any]] = {}
    for name, (_, info) in ckpt.index.items():
        m = _PER_EXPERT.match(name)
        if m and int(m.group(1)) in kept:
            layer, block, expert, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
            if expert in kept[layer]:
                new = f"model.layers.{layer}.{block}.experts.{kept[layer].index(expert)}.{rest}"
                plan.append(PlannedTensor(new, info.dtype, info.shape))
                how[new] = ("copy", name)
            continue
        fused, router = _FUSED.match(name), _ROUTER.match(name)
        match = fused or router
        if match and int(match.group(1)) in kept and match.group(2) == layout.blocks[int(match.group(1))]:
            if info.shape and info.shape[0] == e:
                rows = kept[int(match.group(1))]
                plan.append(PlannedTensor(name, info.dtype, (len(rows), *info.shape[1:])))
                how[name] = ("rows", (name, rows))
                continue
            if fused:
                raise MoEAdaptError(
                    f"{ckpt.path}: fused expert tensor {name} {info.shape} has no expert axis of {e}"
                )
        plan.append(PlannedTensor(name, info.dtype, info.shape))
        how[name] = ("copy", name)
    return plan, how


def prune(src: str | Path, dst: str | Path, dropped: Mapping[int, Sequence[int]]) -> dict[str, Any]:
    """Write ``src`` without the experts ``dropped`` (decoder layer -> old indices, the same number in
    every MoE layer) to ``dst``; returns the parameter report.

    Raises:
        MoEAdaptError: ``src`` is not an MoE checkpoint, the layers or counts do not fit it.
    """
    ckpt = HFCheckpoint(src, "export.model")
    try:
        layout = moe_layout(ckpt)
        sizes = {len(set(d)) for d in dropped.values()}
        if set(dropped) != set(layout.blocks) or len(sizes) != 1:
            raise MoEAdaptError(
                f"prune: drop the same number of experts in every MoE layer {sorted(layout.blocks)}; "
                f"got {{{', '.join(f'{k}: {len(v)}' for k, v in dropped.items())}}}"
            )
        n_drop = sizes.pop()
        if any(not 0 <= i < layout.num_experts for d in dropped.values() for i in d):
            raise MoEAdaptError(f"prune: expert indices must be in [0, {layout.num_experts})")
        if layout.num_experts - n_drop < layout.top_k:
            raise MoEAdaptError(f"prune: {n_drop} dropped leaves fewer experts than top_k={layout.top_k}")
        plan, how = _plan(ckpt, layout, dropped)
        total = sum(info.numel for _, info in ckpt.index.values())
        kept_params = sum(int(np.prod(t.shape)) for t in plan)
        with atomic_dir(dst) as tmp:
            writer = ShardedWriter(tmp, plan, MAX_SHARD_BYTES)
            try:
                for t in plan:
                    kind, arg = how[t.name]
                    if kind == "copy":
                        writer.write(t.name, ckpt.file_bytes(arg))
                    else:
                        name, rows = arg
                        writer.write(t.name, ckpt.get(name)[rows].contiguous())
                writer.close()
            except BaseException:
                writer.abort()
                raise
            config = dict(ckpt.config)
            config[layout.expert_key] = layout.num_experts - n_drop
            atomic_write_json(tmp / "config.json", config)
            copied = ckpt.copy_side_files(tmp)
            _prune_router_bias(Path(src), tmp, layout, dropped)
    finally:
        ckpt.close()
    report: dict[str, Any] = {
        "num_experts": {"before": layout.num_experts, "after": layout.num_experts - n_drop},
        "top_k": layout.top_k,
        "dropped": {str(k): list(v) for k, v in sorted(dropped.items())},
        "params": {"before": total, "after": kept_params, "removed": total - kept_params},
        "params_removed_share": (total - kept_params) / total if total else 0.0,
        "side_files": copied,
    }
    log.info(
        "expert_prune: %d -> %d experts per layer in %d MoE layers; %.2f%% of the parameters removed",
        layout.num_experts,
        layout.num_experts - n_drop,
        len(dropped),
        100 * report["params_removed_share"],
    )
    return report


def _prune_router_bias(src: Path, dst: Path, layout: MoELayout, dropped: Mapping[int, Sequence[int]]) -> None:
    """Drop the dropped experts' columns of ``router_bias.json`` (aux-loss-free balancing), if any."""
    path = src / BIAS_FILE
    if not path.is_file():
        return
    doc = json.loads(path.read_text(encoding="utf-8"))
    rows = []
    for name, row in zip(doc["routers"], doc["expert_bias_LE"], strict=True):
        m = re.match(r"^model\.layers\.(\d+)\.", name)
        if m is None or int(m.group(1)) not in dropped:
            raise MoEAdaptError(f"{path}: router {name!r} is not one of the MoE layers {sorted(dropped)}")
        gone = set(dropped[int(m.group(1))])
        rows.append([v for i, v in enumerate(row) if i not in gone])
    atomic_write_json(dst / BIAS_FILE, {**doc, "expert_bias_LE": rows})
