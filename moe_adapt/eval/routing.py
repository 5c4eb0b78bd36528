"""Expert-routing analysis of HF MoE checkpoints, per layer and per language.

Works with the transformers MoE classes whose sparse block has a router at
``model.model.layers[i].mlp.gate`` returning ``(router_logits, top_k_weights, top_k_index)``
(Qwen3-MoE, Qwen2-MoE, Mixtral in transformers 5.x). Forward hooks on the routers record the top-k
expert of every real (non-padding) token; layers with a dense MLP are skipped.

Definitions (``L`` MoE layers, ``E`` experts, ``K`` experts per token):

- ``counts[lang][l, e]``: how many of language ``lang``'s top-k assignments in layer ``l`` went to
  expert ``e`` (each token contributes ``K``). ``distribution`` = counts / row sum.
- JSD: Jensen–Shannon divergence between two languages' distributions of a layer, in **nats**
  (natural log): 0 for identical distributions, ``ln 2 ≈ 0.693`` for disjoint ones.
- Specialised expert: after normalising each language's counts by its total (the distribution),
  the expert's share from one language ``p_lang(e) / sum_l p_l(e)`` is ``>= threshold``. Shares are
  taken over experts that received any token; unused experts are counted apart.
- Load imbalance over all languages' tokens: ``max / mean`` expert load (1 is perfectly balanced)
  and coefficient of variation ``std / mean`` (population std; 0 is balanced).

Tensor legend: ``T`` tokens (flattened batch × time), ``K`` experts per token, ``E`` experts,
``L`` MoE layers, ``B``/``S`` batch/sequence. ``top_k_index_TK``, ``counts_LE``, ``dist_LE``.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moe_adapt.errors import MoEAdaptError
from moe_adapt.fs import atomic_write_text
from moe_adapt.plots import new_figure, save_figure

__all__ = [
    "analyze_routing",
    "collect_routing_counts",
    "find_routers",
    "jensen_shannon",
    "plot_routing",
    "routing_report",
]


def find_routers(model: torch.nn.Module) -> dict[int, torch.nn.Module]:
    """Map decoder-layer index -> router module for every sparse-MoE layer of ``model``.

    Raises:
        MoEAdaptError: if the model has no ``model.layers`` or no layer with ``mlp.gate``.
    """
    decoder = getattr(model, "model", model)
    layers = getattr(decoder, "layers", None)
    if layers is None:
        raise MoEAdaptError(
            f"{type(model).__name__} has no model.layers; routing analysis needs a transformers MoE "
            "causal LM (Qwen3-MoE, Qwen2-MoE or Mixtral layout)"
        )
    routers = {
        i: layer.mlp.gate
        for i, layer in enumerate(layers)
        if hasattr(getattr(layer, "mlp", None), "gate") and hasattr(layer.mlp, "experts")
    }
    if not routers:
        raise MoEAdaptError(
            f"{type(model).__name__} has no MoE router (looked for model.layers[i].mlp.gate); "
            "is this a dense checkpoint? Routing analysis needs Qwen3-MoE, Qwen2-MoE or Mixtral"
        )
    return routers


def _num_experts(router: torch.nn.Module) -> int:
    n = getattr(router, "num_experts", None)
    weight = router.weight
    assert isinstance(weight, torch.Tensor)
    return int(n) if n is not None else int(weight.shape[0])


class _Recorder:
    """Forward hooks that add each router's top-k assignments of unmasked tokens to ``counts_LE``."""

    def __init__(self, routers: Mapping[int, torch.nn.Module]) -> None:
        self.layer_ids = sorted(routers)
        self.num_experts = max(_num_experts(r) for r in routers.values())
        self.counts_LE = torch.zeros(len(self.layer_ids), self.num_experts, dtype=torch.long)
        self.token_mask_T: torch.Tensor | None = None
        self.handles = [
            routers[lid].register_forward_hook(self._hook(row)) for row, lid in enumerate(self.layer_ids)
        ]

    def _hook(self, row: int) -> Any:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            if not (isinstance(output, tuple) and len(output) == 3):
                raise MoEAdaptError(
                    f"router {type(module).__name__} returned {type(output).__name__}; expected "
                    "(router_logits, top_k_weights, top_k_index) as in transformers 5 MoE models"
                )
            top_k_index_TK = output[2].detach().reshape(-1, output[2].shape[-1]).cpu()
            if self.token_mask_T is not None:
                if self.token_mask_T.numel() != top_k_index_TK.shape[0]:
                    raise MoEAdaptError(
                        f"router {type(module).__name__} saw {top_k_index_TK.shape[0]} tokens but the batch "
                        f"has {self.token_mask_T.numel()} positions; cannot tell padding apart"
                    )
                top_k_index_TK = top_k_index_TK[self.token_mask_T]
            self.counts_LE[row] += torch.bincount(top_k_index_TK.reshape(-1), minlength=self.num_experts)

        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def collect_routing_counts(
    model: torch.nn.Module,
    sequences: Mapping[str, Sequence[torch.Tensor | np.ndarray]],
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    pad_id: int = 0,
) -> tuple[list[int], dict[str, np.ndarray]]:
    """Run ``model`` over each language's documents and count top-k expert assignments.

    Documents are cut to ``max_length`` tokens (default: the model's ``max_position_embeddings``),
    right-padded in batches, and padded positions are left out of the counts.

    Returns:
        ``(layer_ids, counts)``: the decoder-layer index of each MoE layer, and language ->
        ``counts_LE`` int64 array (MoE layers × experts).
    """
    if not sequences:
        raise MoEAdaptError("collect_routing_counts got no languages; pass {'ar': [ids, ...], ...}")
    if batch_size < 1:
        raise MoEAdaptError(f"batch_size={batch_size} must be at least 1")
    routers = find_routers(model)
    if max_length is None:
        max_length = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    device = next(model.parameters()).device
    counts: dict[str, np.ndarray] = {}
    was_training = model.training
    model.eval()
    recorder = _Recorder(routers)
    try:
        with torch.no_grad():
            for lang, docs_raw in sequences.items():
                docs = [torch.as_tensor(np.asarray(d)).long().reshape(-1)[:max_length] for d in docs_raw]
                docs = [d for d in docs if d.numel() > 0]
                if not docs:
                    raise MoEAdaptError(f"language {lang!r} has no non-empty document to route")
                recorder.counts_LE.zero_()
                for start in range(0, len(docs), batch_size):
                    chunk = docs[start : start + batch_size]
                    width = max(d.numel() for d in chunk)
                    input_ids_BS = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                    attention_mask_BS = torch.zeros_like(input_ids_BS)
                    for b, d in enumerate(chunk):
                        input_ids_BS[b, : d.numel()] = d
                        attention_mask_BS[b, : d.numel()] = 1
                    recorder.token_mask_T = attention_mask_BS.reshape(-1).bool()
                    model(
                        input_ids=input_ids_BS.to(device),
                        attention_mask=attention_mask_BS.to(device),
                        use_cache=False,
                    )
                counts[lang] = recorder.counts_LE.numpy().copy()
    finally:
        recorder.remove()
        model.train(was_training)
    return recorder.layer_ids, counts


def jensen_shannon(p: Sequence[float] | np.ndarray, q: Sequence[float] | np.ndarray) -> float:
    """Jensen–Shannon divergence of two distributions, in nats (0 .. ln 2).

    Inputs are non-negative weights and are normalised to sum 1 first. Divide by ``ln 2`` for bits.
    """
    p_E, q_E = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    if p_E.shape != q_E.shape or np.any(p_E < 0) or np.any(q_E < 0) or p_E.sum() <= 0 or q_E.sum() <= 0:
        raise MoEAdaptError(
            "jensen_shannon needs two non-negative, non-zero weight vectors of the same shape"
        )
    p_E, q_E = p_E / p_E.sum(), q_E / q_E.sum()
    m_E = 0.5 * (p_E + q_E)

    def kl(a_E: np.ndarray) -> float:
        nz = a_E > 0
        return float(np.sum(a_E[nz] * np.log(a_E[nz] / m_E[nz])))

    return max(0.0, 0.5 * kl(p_E) + 0.5 * kl(q_E))


def analyze_routing(
    counts: Mapping[str, np.ndarray],
    *,
    layer_ids: Sequence[int] | None = None,
    specialization_threshold: float = 0.7,
) -> dict[str, Any]:
    """Distributions, pairwise JSD, specialised experts and load imbalance from routing counts.

    Args:
        counts: language -> ``counts_LE`` (MoE layers × experts), e.g. from
            :func:`collect_routing_counts`. All languages must have the same shape.
        layer_ids: decoder-layer index of each row (default ``0..L-1``).
        specialization_threshold: an expert is specialised when one language's normalised share of
            it is at least this (in (0.5, 1]; with two languages 0.5 would count every expert).

    Returns:
        A JSON-able dict; every per-layer list is aligned with ``layer_ids``. See the module doc.
    """
    if not counts:
        raise MoEAdaptError("analyze_routing got no languages")
    if not 0.5 < specialization_threshold <= 1.0:
        raise MoEAdaptError(f"specialization_threshold={specialization_threshold} must be in (0.5, 1]")
    langs = list(counts)
    arrays = {lang: np.asarray(counts[lang], dtype=np.float64) for lang in langs}
    shape = arrays[langs[0]].shape
    for lang, arr in arrays.items():
        if arr.ndim != 2 or arr.shape != shape:
            raise MoEAdaptError(f"counts[{lang!r}] has shape {arr.shape}; every language needs {shape} (L×E)")
        if np.any(arr < 0) or np.any(arr.sum(axis=1) == 0):
            raise MoEAdaptError(f"counts[{lang!r}] must be non-negative with tokens in every layer")
    n_layers, n_experts = shape
    layer_ids = list(range(n_layers)) if layer_ids is None else [int(i) for i in layer_ids]
    if len(layer_ids) != n_layers:
        raise MoEAdaptError(f"got {len(layer_ids)} layer_ids for {n_layers} layers of counts")
    dist = {lang: arrays[lang] / arrays[lang].sum(axis=1, keepdims=True) for lang in langs}

    jsd = {
        f"{a}|{b}": [jensen_shannon(dist[a][row], dist[b][row]) for row in range(n_layers)]
        for a, b in itertools.combinations(langs, 2)
    }

    dist_stack_GLE = np.stack([dist[lang] for lang in langs])  # G languages × L × E
    total_LE = dist_stack_GLE.sum(axis=0)
    used_LE = total_LE > 0
    share_GLE = np.divide(dist_stack_GLE, total_LE, out=np.zeros_like(dist_stack_GLE), where=used_LE)
    top_lang_LE = share_GLE.argmax(axis=0)
    specialised_LE = used_LE & (share_GLE.max(axis=0) >= specialization_threshold)
    specialization: dict[str, Any] = {
        "threshold": specialization_threshold,
        "share_of_used_experts": [
            float(specialised_LE[row].sum() / used_LE[row].sum()) for row in range(n_layers)
        ],
        "unused_experts": [int((~used_LE[row]).sum()) for row in range(n_layers)],
        "experts_by_language": {
            lang: [
                np.flatnonzero(specialised_LE[row] & (top_lang_LE[row] == g)).tolist()
                for row in range(n_layers)
            ]
            for g, lang in enumerate(langs)
        },
    }

    load_LE = np.sum([arrays[lang] for lang in langs], axis=0)
    mean_L = load_LE.mean(axis=1)
    load_imbalance = {
        "max_over_mean": (load_LE.max(axis=1) / mean_L).tolist(),
        "cv": (load_LE.std(axis=1) / mean_L).tolist(),
    }
    return {
        "languages": langs,
        "layer_ids": layer_ids,
        "num_experts": n_experts,
        "tokens": {lang: arrays[lang].sum(axis=1).astype(np.int64).tolist() for lang in langs},
        "counts": {lang: arrays[lang].astype(np.int64).tolist() for lang in langs},
        "distribution": {lang: dist[lang].tolist() for lang in langs},
        "jsd_nats": jsd,
        "jsd_nats_mean": {pair: float(np.mean(v)) for pair, v in jsd.items()},
        "specialization": specialization,
        "load_imbalance": load_imbalance,
    }


def plot_routing(analysis: Mapping[str, Any], out_dir: str | Path) -> list[Path]:
    """Write ``routing_heatmap.png`` (layers × experts per language) and ``routing_jsd.png``.

    Takes the dict from :func:`analyze_routing`. With exactly two languages the heatmap has a third
    panel, the difference of their distributions, to show at a glance which experts lean which way.
    Returns the written paths.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    langs, layer_ids = list(analysis["languages"]), list(analysis["layer_ids"])
    n_layers, n_experts = len(layer_ids), int(analysis["num_experts"])
    dist = {lang: np.asarray(analysis["distribution"][lang]) for lang in langs}
    panels = [(lang, dist[lang]) for lang in langs]
    if len(langs) == 2:
        panels.append((f"{langs[0]} − {langs[1]}", dist[langs[0]] - dist[langs[1]]))
    vmax = max(float(d.max()) for d in dist.values())
    panel_w = min(14.0, max(7.5, 2.5 + 0.35 * n_experts))
    panel_h = min(18.0 / len(panels), 1.2 + 0.3 * max(n_layers, 3))
    fig, axes = new_figure(len(panels), 1, figsize=(panel_w, panel_h * len(panels)))
    annotate = n_layers * n_experts <= 256
    for k, (ax, (name, grid_LE)) in enumerate(zip(axes, panels, strict=True)):
        is_diff = len(langs) == 2 and k == 2
        lim = float(np.abs(grid_LE).max()) or 1.0
        im = ax.imshow(
            grid_LE,
            aspect="auto",
            interpolation="nearest",
            cmap="RdBu_r" if is_diff else "viridis",
            vmin=-lim if is_diff else 0.0,
            vmax=lim if is_diff else vmax,
        )
        title = (
            f"{name} (red: more {langs[0]}, blue: more {langs[1]})"
            if is_diff
            else f"{name}: share of top-k assignments (uniform = 1/{n_experts})"
        )
        ax.set_title(title, fontsize=10)
        ax.set_xlim(-0.5, n_experts - 0.5)
        ax.set_ylim(n_layers - 0.5, -0.5)
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
        ax.set_xticks(range(n_experts) if n_experts <= 32 else range(0, n_experts, max(1, n_experts // 16)))
        rows = range(n_layers) if n_layers <= 32 else range(0, n_layers, max(1, n_layers // 16))
        ax.set_yticks(list(rows), [str(layer_ids[r]) for r in rows])
        cbar = ax.figure.colorbar(im, ax=ax)
        cbar.set_label(f"share difference ({langs[0]} − {langs[1]})" if is_diff else "share of assignments")
        if annotate:
            for (r, c), v in np.ndenumerate(grid_LE):
                bright = abs(v) > 0.6 * lim if is_diff else v > 0.6 * vmax
                colour = ("white" if bright else "black") if is_diff else ("black" if bright else "white")
                text = f"{v:+.2f}" if is_diff else f"{v:.2f}"
                ax.text(
                    c,
                    r,
                    text.replace("-0.00", "0.00").replace("+0.00", "0.00"),
                    ha="center",
                    va="center",
                    fontsize=7,
                    color=colour,
                )
    paths = [save_figure(fig, out / "routing_heatmap.png")]

    jsd = analysis["jsd_nats"]
    if jsd:
        fig, (ax,) = new_figure(1, 1, figsize=(min(16.0, max(6.0, 0.35 * n_layers * len(jsd) + 2)), 4.0))
        width = 0.8 / len(jsd)
        xs = np.arange(n_layers)
        for j, (pair, values) in enumerate(jsd.items()):
            bars = ax.bar(
                xs + (j - (len(jsd) - 1) / 2) * width, values, width, label=pair.replace("|", " vs ")
            )
            if n_layers * len(jsd) <= 24:
                ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=2)
        top = min(math.log(2) * 1.12, max(1e-3, 1.25 * max(max(v) for v in jsd.values())))
        ax.set_ylim(0, top)
        if top > math.log(2):
            ax.axhline(math.log(2), color="grey", linestyle="--", linewidth=1)
            ax.text(xs[-1] + 0.4, math.log(2), "ln 2: disjoint experts", ha="right", va="bottom", fontsize=8)
        ticks = xs if n_layers <= 32 else xs[:: max(1, n_layers // 16)]
        ax.set_xticks(ticks, [str(layer_ids[r]) for r in ticks])
        ax.set_xlabel("MoE layer")
        ax.set_ylabel("JSD (nats; 0 same, ln 2 ≈ 0.69 disjoint)")
        ax.set_title("Routing divergence between languages per MoE layer", fontsize=10)
        ax.legend(loc="upper left", fontsize=8)
        paths.append(save_figure(fig, out / "routing_jsd.png"))
    return paths


def routing_report(
    model: torch.nn.Module,
    sequences: Mapping[str, Sequence[torch.Tensor | np.ndarray]],
    out_dir: str | Path,
    *,
    batch_size: int = 8,
    max_length: int | None = None,
    specialization_threshold: float = 0.7,
) -> dict[str, Any]:
    """Collect routing counts, analyse them, and write ``routing.json`` plus the plots to ``out_dir``.

    Returns the analysis dict (the content of ``routing.json``).
    """
    layer_ids, counts = collect_routing_counts(model, sequences, batch_size=batch_size, max_length=max_length)
    analysis = analyze_routing(counts, layer_ids=layer_ids, specialization_threshold=specialization_threshold)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "routing.json", json.dumps(analysis, indent=1))
    plot_routing(analysis, out)
    return analysis
