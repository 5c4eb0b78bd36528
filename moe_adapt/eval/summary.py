"""Human-readable views of the eval stage's results: the log table and ``report.md``.

Both read the ``eval.json`` structure built by :mod:`moe_adapt.eval.evaluate`.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from moe_adapt.eval.report import contamination_lines

__all__ = ["log_table", "render_markdown"]


def _num(x: Any, digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _columns(results: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """(header, path into a model's result) for the short table."""
    cols: list[tuple[str, list[str]]] = []
    langs = list(results.get("heldout", {}).get("documents", {}))
    for lang in langs:
        cols += [(f"loss_{lang}", ["heldout", lang, "mean_loss"])]
        cols += [(f"bpb_{lang}", ["heldout", lang, "bits_per_byte"])]
    for bench, per_lang in results.get("benchmarks", {}).items():
        cols += [
            (f"{bench}.acc_{lang}", ["benchmarks", bench, "languages", lang, "acc"]) for lang in per_lang
        ]
    return cols


def _get(d: Any, path: list[str]) -> Any:
    for k in path:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def log_table(results: dict[str, Any]) -> list[str]:
    """A short fixed-width table, one row per model: held-out loss (nats/token),
    bits per byte and accuracy per language."""
    cols = _columns(results)
    names = list(results["models"])
    width = max([5, *(len(n) for n in names)])
    head = f"{'model':<{width}}  " + "  ".join(f"{h:>{max(8, len(h))}}" for h, _ in cols)
    rows = [head]
    for name, res in results["models"].items():
        cells = [f"{_num(_get(res, p)):>{max(8, len(h))}}" for h, p in cols]
        rows.append(f"{name:<{width}}  " + "  ".join(cells))
    return rows


def render_markdown(results: dict[str, Any], contamination: Path | None = None) -> str:
    """The stage's ``report.md``."""
    models: dict[str, Any] = results["models"]
    md = ["# Evaluation report", ""]
    md += ["| model | kind | parameters | checkpoint |", "|---|---|---|---|"]
    md += [
        f"| {n} | {'MoE' if r['moe'] else 'dense'} | {r['params']:,} | `{r['path']}` |"
        for n, r in models.items()
    ]
    md.append("")
    held = results.get("heldout")
    if held:
        langs = list(held["documents"])
        md += ["## Held-out loss and bits per byte", ""]
        md.append(
            f"From `{held['dir']}`: "
            + ", ".join(
                f"{lang} {held['documents'][lang]} of {held['available'][lang]} docs, "
                f"{held['tokens'][lang]:,} tokens"
                for lang in langs
            )
            + ". Lower is better; the loss on the anchor language measures forgetting."
        )
        md += [
            "",
            "Loss is nats per token (perplexity in brackets): it depends on how many tokens the tokenizer "
            "spends on the text, so it does not compare across languages. Bits per byte (of the UTF-8 text "
            "the scored tokens spell) does not depend on the tokenizer: compare languages and tokenizers "
            "with it, remembering that an Arabic letter is two UTF-8 bytes and an English one one "
            "(`eval.json` also has bits per character).",
        ]
        if held.get("bytes_from") is None:
            md.append("No tokenizer sized the held-out text, so there are no bits per byte (n/a).")
        head = " | ".join(f"{lang} loss (ppl) | {lang} bits/byte" for lang in langs)
        md += ["", f"| model | {head} |", "|---" * (2 * len(langs) + 1) + "|"]
        for n, r in models.items():
            h = r.get("heldout", {})
            cells: list[str] = []
            for lang in langs:
                x = h.get(lang)
                if x is None:
                    cells += ["—", "—"]
                    continue
                cells += [f"{x['mean_loss']:.4f} ({x['ppl']:.2f})", _num(x.get("bits_per_byte"))]
            md.append(f"| {n} | " + " | ".join(cells) + " |")
        md.append("")
    for bench, per_lang in results.get("benchmarks", {}).items():
        langs = list(per_lang)
        md += [f"## Benchmark `{bench}`", ""]
        md.append(
            "Items per language: "
            + ", ".join(
                f"{lang} {v['items']} ({v['malformed']} malformed, skipped)" for lang, v in per_lang.items()
            )
            + "."
        )
        for lang, v in per_lang.items():
            md += [f"- {lang}: {e}" for e in v.get("malformed_examples", [])]
        md += ["", "| model | language | acc [CI] | acc_norm | ECE |", "|---|---|---|---|---|"]
        for n, r in models.items():
            for lang in langs:
                x = _get(r, ["benchmarks", bench, "languages", lang]) or {}
                if "acc" in x:
                    ci = x["acc_ci"]
                    md.append(
                        f"| {n} | {lang} | {x['acc']:.3f} [{_num(ci[0], 3)}, {_num(ci[1], 3)}] | "
                        f"{x['acc_norm']:.3f} | {x['ece']:.3f} |"
                    )
        rows = [
            (n, tgt, b)
            for n, r in models.items()
            for tgt, b in (_get(r, ["benchmarks", bench, "bilingual"]) or {}).items()
        ]
        if rows:
            md += ["", "Bilingual consistency on parallel items (paired items only):", ""]
            md += [
                "| model | pair | pairs | acc src / tgt | LPG | CLCS | ECE src / tgt |",
                "|---|---|---|---|---|---|---|",
            ]
            for n, tgt, b in rows:
                if "skipped" in b:
                    md.append(f"| {n} | → {tgt} | 0 | {b['skipped']} | | | |")
                    continue
                s = b["source"]
                md.append(
                    f"| {n} | {s} → {tgt} | {b['n_pairs']} | "
                    f"{b['accuracy'][s]:.3f} / {b['accuracy'][tgt]:.3f} | "
                    f"{b['lpg']:.3f} | {b['clcs']:.3f} | {b['ece'][s]:.3f} / {b['ece'][tgt]:.3f} |"
                )
        md.append("")
    routed = {n: r["routing"] for n, r in models.items() if "routing" in r}
    if routed:
        md += ["## Expert routing", ""]
        md.append(
            "JSD: Jensen–Shannon divergence between languages' expert distributions (nats, mean over MoE "
            "layers; 0 = same experts, ln 2 ≈ 0.693 = disjoint). Specialised: share of used experts that "
            "one language dominates. Load: max/mean expert load (1 = balanced)."
        )
        md += ["", "| model | JSD | specialised | load max/mean |", "|---|---|---|---|"]
        for n, r in routed.items():
            jsd = ", ".join(f"{k.replace('|', '–')}: {v:.4f}" for k, v in r["jsd_nats_mean"].items()) or "—"
            md.append(f"| {n} | {jsd} | {r['specialised_share']:.3f} | {r['load_max_over_mean']:.3f} |")
        md.append("")
        for n, r in routed.items():
            md += [f"![{n} {Path(p).stem}]({p})" for p in r["plots"]]
        md.append("")
    harness = {n: r["harness"] for n, r in models.items() if r.get("harness")}
    if harness:
        md += ["## lm-evaluation-harness", "", "| model | task | metric | value |", "|---|---|---|---|"]
        for n, tasks in harness.items():
            for task, metrics in tasks.items():
                md += [f"| {n} | {task} | {k} | {v:.4f} |" for k, v in metrics.items()]
        md.append("")
    if contamination is not None:
        md += contamination_lines(contamination)
    else:
        md += ["## Contamination", "", "No contamination report (eval.contamination) was found.", ""]
    return "\n".join(md)
