"""What each artefact keeps: size on disk, compression ratio and held-out quality per language.

Held-out loss is the eval stage's (:func:`moe_adapt.eval.perplexity.evaluate_perplexity` on the data
stage's shards, read by :func:`moe_adapt.eval.heldout.load_heldout`), so the numbers compare with
``eval/metrics.json``. A GGUF file is measured with the weights llama.cpp would use: its tensors
dequantized (:func:`gguf_as_checkpoint`) and run by transformers; llama.cpp itself
also quantizes activations in its q8_0/q4_0 matrix products, which this does not reproduce.

**Retention** of a language: ``100 * bpb_source / bpb_artifact`` (bits per byte; nats per token when
the held-out text cannot be sized): 100 = as good as the source, below 100 = worse.
Rows measured by :mod:`moe_adapt.export.speed` carry ``speed`` (CPU tokens/s), shown as the
report's "CPU tokens/s" table. Outputs: ``retention.json``, ``report.md`` and ``retention.png``
(size on disk against retention per language, one marker per artefact; written when held-out text
was measured) in the stage folder.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from moe_adapt.checkpoint.hf import SIDE_FILES, load_causal_lm
from moe_adapt.errors import MoEAdaptError
from moe_adapt.eval.config import EvalConfig
from moe_adapt.eval.heldout import HeldOut
from moe_adapt.fs import atomic_write_text
from moe_adapt.plots import new_figure, save_figure

if TYPE_CHECKING:
    from moe_adapt.export.expert_prune import RoutingCounts

log = logging.getLogger(__name__)

__all__ = [
    "PLOT",
    "disk_bytes",
    "expert_tokens",
    "measure",
    "plot_retention",
    "render_report",
    "retention_table",
]

PLOT = "retention.png"
"""The size-vs-retention figure, beside ``report.md``."""

_MARKERS = "os^Dv<>pP*Xh"


def disk_bytes(path: str | Path) -> int:
    """Bytes on disk of a file, or of every file in a folder (weights, config, tokenizer)."""
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def device_of(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; any other name as torch reads it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def measure(
    model_dir: str | Path,
    heldout: HeldOut,
    *,
    window: int,
    stride: int,
    batch_size: int,
    device: str = "cpu",
    prepare: Callable[[torch.nn.Module], Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Per-language held-out loss, perplexity and bits per byte of the HF checkpoint ``model_dir``;
    ``prepare(model)`` runs on the loaded model first (W8A8's activation rounding)."""
    model = load_causal_lm(model_dir, torch.float32, device=device_of(device))
    if prepare is not None:
        prepare(model)
    try:
        return measure_model(model, heldout, window=window, stride=stride, batch_size=batch_size)
    finally:
        del model
        gc.collect()


def measure_model(
    model: torch.nn.Module, heldout: HeldOut, *, window: int, stride: int, batch_size: int
) -> dict[str, dict[str, Any]]:
    """:func:`measure` of a loaded model (an HF causal LM, or anything called the same way, such as
    :class:`moe_adapt.export.onnx.OrtCausalLM`)."""
    from moe_adapt.eval.perplexity import evaluate_perplexity

    max_pos = int(getattr(getattr(model, "config", None), "max_position_embeddings", window) or window)
    w = min(window, max_pos)
    result = evaluate_perplexity(
        model,
        heldout.docs,
        window=w,
        stride=min(stride, w),
        batch_size=batch_size,
        token_sizes=heldout.token_sizes,
    )
    return {lang: r.to_dict() for lang, r in result.items()}


def load_benchmarks(ecfg: EvalConfig) -> dict[str, dict[str, Any]]:
    """The eval stage's benchmarks (``eval.benchmarks``, capped by ``eval.benchmark_max_items``) as
    ``{bench: {lang: MCSet}}``; missing files are refused by name."""
    from moe_adapt.eval.evaluate import cap_items
    from moe_adapt.eval.mc import load_mc_items

    out = {}
    for i, bench in enumerate(ecfg.benchmarks):
        for lang, f in bench.files.items():
            if not Path(f).is_file():
                raise MoEAdaptError(
                    f"export.benchmarks=true reads eval.benchmarks[{i}].files.{lang}={f!r}, which does not "
                    "exist; run the data stage or set export.benchmarks=false"
                )
        sets = {
            lang: load_mc_items(f, parallel_key=bench.parallel_key, key=f"eval.benchmarks[{i}].files.{lang}")
            for lang, f in bench.files.items()
        }
        out[bench.name] = cap_items(sets, ecfg.benchmark_max_items, bench.source_lang)
    return out


def accuracy(
    model_dir: str | Path, ecfg: EvalConfig, benches: dict[str, dict[str, Any]], *, seed: int, device: str
) -> dict[str, dict[str, Any]]:
    """Multiple-choice accuracy per benchmark and language of ``model_dir``, with the eval stage's own
    scoring and bootstrap CI (:func:`moe_adapt.eval.evaluate.evaluate_model`, held-out loss, routing
    and harness off): ``{bench: {lang: {items, acc, acc_ci, ...}}}``."""
    from moe_adapt.eval.evaluate import evaluate_model

    only = dataclasses.replace(ecfg, heldout=None, routing=False, harness_tasks=[], tokenizer=None)
    model = load_causal_lm(model_dir, torch.float32, device=device_of(device))
    try:
        with tempfile.TemporaryDirectory(prefix="export-acc-") as tmp:
            result = evaluate_model(model, "m", str(model_dir), only, None, benches, Path(tmp), seed)
    finally:
        del model
        gc.collect()
    return {name: b["languages"] for name, b in result.get("benchmarks", {}).items()}


def gguf_as_checkpoint(gguf_file: str | Path, src: str | Path, dest: str | Path) -> Path:
    """An HF folder at ``dest`` holding the dequantized weights of ``gguf_file`` (written from ``src``)
    with ``src``'s config and tokenizer: the model llama.cpp runs, for transformers to measure."""
    from safetensors.torch import save_file

    from moe_adapt.export.gguf import read_gguf_state

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    save_file(
        dict(read_gguf_state(gguf_file, src)), str(dest / "model.safetensors"), metadata={"format": "pt"}
    )
    for name in ("config.json", *SIDE_FILES):
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, dest / name)
    return dest


def expert_tokens(routing: RoutingCounts) -> dict[str, Any]:
    """Routed tokens per MoE layer and expert of :class:`~moe_adapt.export.expert_prune.RoutingCounts`
    (top-k assignments, every language summed; per language too), and the experts no token reached:
    ``{source, layer_ids, total: [[...]], per_language: {lang: [[...]]}, zero: {layer: [experts]}}``."""
    import numpy as np

    per_lang = {g: np.asarray(c, dtype=np.int64) for g, c in routing.counts.items()}
    total_LE = np.sum(np.stack(list(per_lang.values())), axis=0)
    zero = {
        str(lid): [int(e) for e in np.flatnonzero(total_LE[row] == 0)]
        for row, lid in enumerate(routing.layer_ids)
        if np.any(total_LE[row] == 0)
    }
    return {
        "definition": "top-k assignments of held-out tokens per MoE layer and expert (the text the "
        "quantized weights are measured on; gguf's types take no calibration)",
        "source": routing.source,
        "layer_ids": list(routing.layer_ids),
        "total": total_LE.tolist(),
        "per_language": {g: c.tolist() for g, c in per_lang.items()},
        "zero": zero,
    }


def _quality(r: dict[str, Any]) -> tuple[float, str]:
    if r.get("bits_per_byte") is not None:
        return float(r["bits_per_byte"]), "bits_per_byte"
    return float(r["mean_loss"]), "mean_loss"


def retention_table(rows: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add ``compression`` (source bytes / artefact bytes) and per-language ``retention_pct`` to each
    row ``{name, path, bytes, heldout?}``; the first row is the source."""
    rows = list(rows)
    source = rows[0]
    for row in rows:
        row["compression"] = source["bytes"] / row["bytes"] if row["bytes"] else None
        held = row.get("heldout") or {}
        ref = source.get("heldout") or {}
        row["retention_pct"] = {}
        for lang, r in held.items():
            if lang in ref:
                q, unit = _quality(r)
                q0, _ = _quality(ref[lang])
                row["retention_pct"][lang] = 100.0 * q0 / q if q else None
                row["retention_unit"] = unit
        row["accuracy_retention_pct"] = {}
        for bench, langs in (row.get("accuracy") or {}).items():
            for lang, r in langs.items():
                ref_acc = ((source.get("accuracy") or {}).get(bench) or {}).get(lang, {}).get("acc")
                if r.get("acc") is not None and ref_acc:
                    row["accuracy_retention_pct"][f"{bench}.{lang}"] = 100.0 * r["acc"] / ref_acc
    return rows


def render_report(rows: list[dict[str, Any]], extra: dict[str, Any], *, plot: bool = False) -> str:
    """``report.md``: one table row per artefact, and what expert_prune removed; ``plot`` links
    ``retention.png``."""
    langs = sorted({lang for r in rows for lang in (r.get("heldout") or {})})
    head = ["artefact", "size MiB", "ratio"]
    for lang in langs:
        head += [f"ppl {lang}", f"bpb {lang}", f"retention {lang} %"]
    lines = ["# Export: size and per-language retention", ""]
    lines.append(
        "Retention = 100 × source bits per byte / artefact bits per byte on the data stage's held-out "
        "text (nats per token where bytes are unknown). GGUF rows: llama.cpp's weights, dequantized, "
        "run by transformers."
    )
    lines += ["", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [
            r["name"],
            f"{r['bytes'] / 2**20:.3f}",
            f"{r['compression']:.2f}" if r["compression"] else "-",
        ]
        for lang in langs:
            h = (r.get("heldout") or {}).get(lang)
            if h is None:
                cells += ["-", "-", "-"]
                continue
            bpb = h.get("bits_per_byte")
            ret = r["retention_pct"].get(lang)
            cells += [
                f"{h['ppl']:.4f}",
                f"{bpb:.4f}" if bpb is not None else "-",
                f"{ret:.2f}" if ret else "-",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    if plot:
        lines += ["", f"![size on disk vs retention per language]({PLOT})"]
    lines += _speed_table(rows)
    acc_cols = sorted(
        {f"{b}.{lang}" for r in rows for b, ls in (r.get("accuracy") or {}).items() for lang in ls}
    )
    if acc_cols:
        lines += ["", "## Benchmark accuracy (eval stage's scoring; 95% bootstrap CI)", ""]
        head2 = ["artefact"] + [f"{c} acc [CI]" for c in acc_cols] + [f"{c} retention %" for c in acc_cols]
        lines += ["| " + " | ".join(head2) + " |", "|" + "---|" * len(head2)]
        for r in rows:
            cells = [r["name"]]
            for c in acc_cols:
                bench, lang = c.rsplit(".", 1)
                a = ((r.get("accuracy") or {}).get(bench) or {}).get(lang) or {}
                ci = a.get("acc_ci")
                cells.append(f"{a['acc']:.3f} [{ci[0]:.3f}, {ci[1]:.3f}]" if "acc" in a and ci else "-")
            for c in acc_cols:
                v = r.get("accuracy_retention_pct", {}).get(c)
                cells.append(f"{v:.1f}" if v is not None else "-")
            lines.append("| " + " | ".join(cells) + " |")
    prune = extra.get("expert_prune")
    if prune:
        lines += ["", "## expert_prune", ""]
        lines.append(
            f"{prune['num_experts']['before']} → {prune['num_experts']['after']} routed experts per layer "
            f"(top-{prune['top_k']} kept); {100 * prune['params_removed_share']:.2f}% of the parameters "
            "removed "
            f"({prune['params']['removed']:,} of {prune['params']['before']:,})."
        )
        lines.append("")
        lines.append(f"Routing from: {prune['routed_mass_lost']['source']}")
        lines.append("")
        lines.append("| language | routed mass lost % |")
        lines.append("|---|---|")
        for lang, v in prune["routed_mass_lost"]["per_language"].items():
            lines.append(f"| {lang} | {100 * v:.2f} |")
        lines += ["", "Dropped experts per layer (old indices): " + json.dumps(prune["dropped"])]
    tok = extra.get("expert_tokens")
    if tok:
        lines += ["", "## Routed tokens per expert (held-out text)", ""]
        lines.append(
            "gguf's types, bitsandbytes and onnx int4 round to nearest without calibrating (gptq, "
            "sparsegpt and wanda calibrate: see Calibration). "
            "These are the top-k assignments of the held-out tokens each expert received "
            f"(routing {tok['source']}); an expert with 0 is quantized without any text checking it."
        )
        lines += [
            "",
            "| layer | experts | min | median | max | experts with 0 tokens |",
            "|---|---|---|---|---|---|",
        ]
        for lid, row in zip(tok["layer_ids"], tok["total"], strict=True):
            srt = sorted(row)
            zeros = tok["zero"].get(str(lid), [])
            lines.append(
                f"| {lid} | {len(row)} | {srt[0]} | {srt[len(srt) // 2]} | {srt[-1]} | "
                f"{', '.join(map(str, zeros)) or '-'} |"
            )
        lines += ["", "Per-expert counts (per language too): ``retention.json`` → ``expert_tokens``."]
    cal = extra.get("calibration")
    if cal:
        lines += ["", "## Calibration (gptq, sparsegpt, wanda)", ""]
        lines.append(
            f"{cal['windows']} windows of {cal['seq_len']} tokens from {cal['data']}; tokens per language: "
            + ", ".join(f"{g} {n:,}" for g, n in cal["tokens_per_language"].items())
            + (
                " (the held-out text itself: retention of these rows is measured on calibration text)"
                if cal["heldout_is_calibration"]
                else ""
            )
            + f". An expert routed fewer than {cal['min_expert_tokens']} tokens is calibrated on all tokens."
        )
        for m in ("gptq", "sparsegpt", "wanda"):
            for variant, info in (extra.get(m) or {}).items():
                c = info["calibration"]
                for lid, mods in c["expert_tokens"].items():
                    for mod, counts in mods.items():
                        srt = sorted(counts)
                        low = c["topped_up"].get(lid, {}).get(mod, [])
                        lines.append(
                            f"- {m}-{variant} layer {lid} {mod}: routed tokens per expert min {srt[0]}, "
                            f"median {srt[len(srt) // 2]}, max {srt[-1]}; calibrated on all tokens: "
                            f"{', '.join(map(str, low)) or 'none'}"
                        )
        lines += ["", "Per-expert counts: ``retention.json`` → ``<method>.<variant>.calibration``."]
    o = (extra.get("onnx") or {}).get("int4")
    if o:
        lines += [
            "",
            f"onnx-int4 ({extra['onnx']['exporter']}; {o['quantizer']}, blocks of {o['block_size']}): "
            f"{100 * o['share']:.2f}% of the parameters in int4 ({o['quantized_params']:,} of "
            f"{o['params']:,}); routed-expert parameters in int4: {o['expert_params_quantized']:,} of "
            f"{o['expert_params']:,}.",
        ]
    for m in ("int8", "nf4"):
        q = (extra.get(m) or {}).get("quantized_share")
        if q:
            lines += [
                "",
                f"{m} (bitsandbytes {extra[m]['bitsandbytes']}): {100 * q['share']:.2f}% of the parameters "
                f"quantized ({q['quantized']:,} of {q['total']:,}); routed-expert parameters quantized: "
                f"{q['expert_params_quantized']:,} of {q['expert_params']:,}. Left in float: "
                + ", ".join(f"{k} {v:,}" for k, v in q["float_by_kind"].items())
                + ".",
            ]
    for g in extra.get("gguf", []):
        lines.append("")
        lines.append(f"GGUF {g['file']}: arch {g['arch']}, tensors by type {g['tensors']}")
    return "\n".join(lines) + "\n"


def _speed_table(rows: list[dict[str, Any]]) -> list[str]:
    """The CPU tokens/s section of ``report.md`` (rows carry ``speed`` only when it was measured)."""
    speeds = [(r["name"], r["speed"]) for r in rows if "speed" in r]
    if not speeds:
        return []
    langs = sorted({lang for _, s in speeds for lang in s.get("tokens_per_s", {})})
    done = [s for _, s in speeds if s.get("runtime")]
    lines = ["", "## CPU tokens/s", ""]
    if done:
        s0 = done[0]
        lines.append(
            f"Greedy decoding of {s0['new_tokens']} new tokens after a fixed prompt per language "
            f"({', '.join(f'{g} {n} tokens' for g, n in s0['prompt_tokens'].items())}), "
            f"{s0['threads']} CPU thread(s): new tokens / wall-clock seconds of the call (prompt "
            f"included), median of {len(next(iter(s0['runs'].values())))} runs after one warm-up. "
            "Each row in the runtime that serves it here; an empty cell says why it has no number."
        )
    lines += [
        "",
        "| artefact | runtime | " + " | ".join(f"tokens/s {g}" for g in langs) + " | note |",
        "|" + "---|" * (len(langs) + 3),
    ]
    for name, s in speeds:
        tps = s.get("tokens_per_s", {})
        cells = [name, s.get("runtime") or "-"]
        cells += [f"{tps[g]:.1f}" if g in tps else "-" for g in langs]
        cells.append((s.get("reason") or s.get("note") or "").replace("|", "\\|"))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def plot_retention(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Size on disk (MiB, log x) against retention % (y) for every artefact and language: one marker
    shape per artefact, one colour per language. None (nothing written) when no row has a retention."""
    langs = sorted({lang for r in rows for lang, v in r["retention_pct"].items() if v is not None})
    if not langs:
        return None
    fig, (ax,) = new_figure(1, 1, figsize=(7.0, 4.5))
    for i, r in enumerate(rows):
        marker = _MARKERS[i % len(_MARKERS)]
        for j, lang in enumerate(langs):
            v = r["retention_pct"].get(lang)
            if v is None:
                continue
            ax.plot(
                r["bytes"] / 2**20,
                v,
                marker,
                color=f"C{j}",
                markersize=8,
                alpha=0.8,
                label=f"{r['name']} ({lang})",
            )
    ax.axhline(100.0, color="grey", linewidth=0.8, linestyle="--")
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.xaxis.set_minor_formatter(plain)
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("size on disk (MiB, log scale)")
    ax.set_ylabel(f"retention % ({rows[0].get('retention_unit', 'bits_per_byte')}, source = 100)")
    ax.set_title("Size vs per-language retention")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best", ncol=2)
    return save_figure(fig, path)


def write_outputs(out: Path, rows: list[dict[str, Any]], extra: dict[str, Any]) -> None:
    atomic_write_text(out / "retention.json", json.dumps({"rows": rows, **extra}, indent=1, default=str))
    plot = plot_retention(rows, out / PLOT)
    atomic_write_text(out / "report.md", render_report(rows, extra, plot=plot is not None))
