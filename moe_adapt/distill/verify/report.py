"""What the verify phase keeps and rejects (:class:`VerifyResult`), its JSON-able summary and the
summary as Markdown (:func:`render_report_markdown`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from moe_adapt.distill.verify.base import Rejection, Trace
from moe_adapt.distill.verify.parse import excerpt


@dataclass
class VerifyResult:
    """Kept traces, and rejected ones with every check they failed."""

    checks: list[str] = field(default_factory=list)
    """Names of the checks that ran, in order."""

    kept: list[Trace] = field(default_factory=list)
    """Traces that passed every check, in input order."""

    rejected: list[tuple[Trace, list[Rejection]]] = field(default_factory=list)
    """Traces that failed at least one check, each with all its rejections (in check order)."""

    def report(self, max_examples: int = 3) -> dict[str, Any]:
        """A JSON-able summary: totals per language, failures and first failures per check and
        language, rule counts per check, and up to ``max_examples`` examples per check."""
        totals: dict[str, dict[str, int]] = {}
        for trace in self.kept:
            _count_trace(totals, trace.lang, "kept")
        failures = {name: {"all": 0} for name in self.checks}
        first = {name: {"all": 0} for name in self.checks}
        rules: dict[str, dict[str, dict[str, int]]] = {}
        examples: dict[str, list[dict[str, str]]] = {name: [] for name in self.checks}
        for trace, rejections in self.rejected:
            _count_trace(totals, trace.lang, "rejected")
            _bump(first.setdefault(rejections[0].check, {"all": 0}), trace.lang)
            for rej in rejections:
                _bump(failures.setdefault(rej.check, {"all": 0}), trace.lang)
                for rule in rej.rules:
                    _bump(rules.setdefault(rej.check, {}).setdefault(rule, {"all": 0}), trace.lang)
                shown = examples.setdefault(rej.check, [])
                if len(shown) < max_examples:
                    shown.append(
                        {
                            "id": trace.id,
                            "lang": trace.lang,
                            "detail": rej.detail,
                            "excerpt": excerpt(trace.response),
                        }
                    )
        langs = sorted(k for k in totals if k != "all")
        order = {name: i for i, name in enumerate(self.checks)}
        rules = dict(sorted(rules.items(), key=lambda kv: order.get(kv[0], len(order))))
        return {
            "checks": list(self.checks),
            "languages": langs,
            "totals": {k: totals.get(k, _empty_totals()) for k in ["all", *langs]},
            "failures": failures,
            "first_failures": first,
            "rules": rules,
            "examples": examples,
        }


def _empty_totals() -> dict[str, int]:
    return {"seen": 0, "kept": 0, "rejected": 0}


def _count_trace(totals: dict[str, dict[str, int]], lang: str, outcome: str) -> None:
    for key in ("all", lang):
        row = totals.setdefault(key, _empty_totals())
        row["seen"] += 1
        row[outcome] += 1


def _bump(row: dict[str, int], lang: str) -> None:
    row["all"] = row.get("all", 0) + 1
    row[lang] = row.get(lang, 0) + 1


def _cell(value: object) -> str:
    return str(value).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return lines


def render_report_markdown(report: dict[str, Any]) -> str:
    """The report of :meth:`VerifyResult.report` as Markdown: tables of totals, failures, rules, examples."""
    langs: list[str] = report["languages"]
    totals = report["totals"]
    every = totals["all"]
    share = every["kept"] / every["seen"] if every["seen"] else 0.0
    lines = ["# Trace verification", "", f"Kept {every['kept']} of {every['seen']} traces ({share:.1%}).", ""]
    rows: list[list[object]] = []
    for key in ["all", *langs]:
        t = totals[key]
        kept_pct = f"{t['kept'] / t['seen']:.1%}" if t["seen"] else "-"
        rows.append([key, t["seen"], t["kept"], t["rejected"], kept_pct])
    lines += _table(["language", "seen", "kept", "rejected", "kept %"], rows)
    lines += [
        "",
        "## Failures per check",
        "",
        "Traces failing each check (a trace may fail several); *first* counts each rejected trace once,",
        "under the first check it failed.",
        "",
    ]
    rows = []
    for name, row in report["failures"].items():
        first = report["first_failures"].get(name, {}).get("all", 0)
        rows.append([name, first, row.get("all", 0), *(row.get(lang, 0) for lang in langs)])
    lines += _table(["check", "first", "all", *langs], rows)
    if report["rules"]:
        lines += ["", "## Rules", ""]
        for check, by_rule in report["rules"].items():
            lines += [f"### {check}", ""]
            rule_rows: list[list[object]] = [
                [rule, row.get("all", 0), *(row.get(lang, 0) for lang in langs)]
                for rule, row in sorted(by_rule.items(), key=lambda kv: -kv[1].get("all", 0))
            ]
            lines += [*_table(["rule", "all", *langs], rule_rows), ""]
    shown = {check: ex for check, ex in report["examples"].items() if ex}
    if shown:
        lines += ["## Examples", ""] if report["rules"] else ["", "## Examples", ""]
        for check, items in shown.items():
            lines += [f"### {check}", ""]
            for ex in items:
                lines.append(f"- `{ex['id']}` ({ex['lang']}): {_cell(ex['detail'])}")
                lines.append(f"  > {_cell(ex['excerpt'])}")
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"
