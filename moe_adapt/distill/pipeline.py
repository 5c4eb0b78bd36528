"""The ``distill`` stage's work: chain-of-thought distillation in the phases ``distill.phases`` lists.

Each phase works in ``<work>/<phase>`` (``work``: the stage's scratch folder, ``<run_dir>/.work/distill``)
and finishes by writing ``_COMPLETE.json`` with a fingerprint of everything it depends on (its own
settings and every earlier phase's): a :class:`~moe_adapt.resume.StepCache` whose units are the phases
(and the held-out accuracy checks), each with its own chained fingerprint. A re-run after
a crash skips finished phases, resumes the interrupted one (generate from its finished shards,
training phases from their latest checkpoint) and runs the rest. When all phases are done the
folders move into the stage folder, the last training phase's model becomes ``model/``, and
``summary.json`` / ``report.md`` collect verification counts and held-out accuracy before and after.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from moe_adapt.checkpoint.hf import check_seq_len
from moe_adapt.data.jsonl import write_documents
from moe_adapt.distill.accuracy import evaluate_accuracy
from moe_adapt.distill.config import SELECT_KD_DEFAULT_THETA, TRAINING_PHASES, DistillConfig
from moe_adapt.distill.generate import generation_settings, iter_traces, run_generate
from moe_adapt.distill.prompts import PromptRecord, load_prompts
from moe_adapt.distill.train_phase import (
    check_same_tokenizer,
    reference_examples,
    run_train_phase,
    trace_examples,
)
from moe_adapt.distill.verify import Trace, render_report_markdown, verify_traces
from moe_adapt.engines.base import EngineConfig
from moe_adapt.engines.objectives import KDSettings
from moe_adapt.errors import MoEAdaptConfigError
from moe_adapt.fs import atomic_write_json, atomic_write_text
from moe_adapt.resume import MARKER, StepCache, fingerprint
from moe_adapt.train.callbacks import Callback

log = logging.getLogger(__name__)


def _checkpoint_dir(path: str | None, key: str) -> str:
    if not path or not Path(path, "config.json").is_file():
        raise MoEAdaptConfigError(f"{key}={path!r} is not an HF checkpoint folder (config.json missing)")
    return path


def _check_inputs(d: DistillConfig) -> None:
    phases = set(d.phases)
    online = [p for p in ("token_kd", "select_kd") if p in phases and getattr(d, p).teacher == "online"]
    hf = d.generate.backend == "hf"  # backend=server: distill.teacher only for online KD and teacher eval
    if ("generate" in phases and hf) or online or (d.eval_prompts and d.eval.teacher and (hf or d.teacher)):
        _checkpoint_dir(d.teacher, "distill.teacher")
    if phases & set(TRAINING_PHASES):
        _checkpoint_dir(d.student, "distill.student")
    for name in (p for p in TRAINING_PHASES if p in phases):
        # each training phase starts from the one before, all from the student (same positions)
        seq_len = getattr(d, name).seq_len
        check_seq_len(f"distill.{name}.seq_len", seq_len, d.student or "", "distill.student")
        if name in online:
            check_seq_len(f"distill.{name}.seq_len", seq_len, d.teacher or "", "distill.teacher")
    kd_topk = [p for p in ("token_kd", "select_kd") if p in phases and getattr(d, p).teacher == "topk"]
    if kd_topk and "generate" in phases and d.generate.store_topk == 0:
        raise MoEAdaptConfigError(
            f"distill.{kd_topk[0]}.teacher=topk needs the teacher's top-k log-probabilities, but "
            "distill.generate.store_topk=0: set it > 0 (e.g. 8) or use teacher=online"
        )
    if kd_topk and "generate" in phases and not hf and not d.generate.server.tokenizer:
        raise MoEAdaptConfigError(
            f"distill.{kd_topk[0]}.teacher=topk with distill.generate.backend=server needs the teacher's "
            "token ids in the student's vocabulary: set distill.generate.server.tokenizer to the served "
            "model's tokenizer folder (the same as the student's), or train with seq_kd (any tokenizer)"
        )
    needs_traces = [p for p in ("seq_kd", "token_kd", "select_kd") if p in phases]
    if needs_traces and "generate" not in phases:
        raise MoEAdaptConfigError(
            f"distill.phases={list(d.phases)}: phase {needs_traces[0]} trains on teacher traces, "
            "so generate (and usually verify) must come before it"
        )


def _phase_settings(d: DistillConfig, engine_cfg: EngineConfig, seed: int, name: str) -> dict[str, Any]:
    if name == "generate":
        return {
            "teacher": d.teacher,
            "prompts": d.prompts,
            "langs": d.langs,
            "generate": generation_settings(d.generate),
            **({"student": d.student} if d.generate.backend == "server" else {}),  # its vocabulary
            "chat_template": d.chat_template,
            "seed": seed,
        }
    if name == "verify":
        return {"verify": asdict(d.verify), "format": asdict(d.format)}
    settings = {
        "phase": asdict(getattr(d, name)),
        "engine": asdict(engine_cfg),
        "engine_name": engine_cfg.name,
        "seed": seed,
        "student": d.student,
        "chat_template": d.chat_template,
    }
    if name in ("token_kd", "select_kd"):
        settings["select"] = asdict(d.select)
        settings["teacher"] = d.teacher
    if name == "sft":
        settings["prompts"] = d.prompts
    return settings


def _kd_settings(d: DistillConfig, name: str) -> KDSettings | None:
    if name not in ("token_kd", "select_kd"):
        return None
    p = getattr(d, name)
    theta = d.select.theta
    if name == "select_kd" and theta is None:
        theta = SELECT_KD_DEFAULT_THETA
    return KDSettings(alpha=p.alpha, temperature=p.temperature, direction=p.kl, theta=theta)


def run_verify(d: DistillConfig, gen_dir: Path, out: Path) -> dict[str, Any]:
    """Check every generated trace; write verified.jsonl, rejected.jsonl, report.json and report.md."""
    records = {r["id"]: r for r in iter_traces(gen_dir)}
    traces = [
        Trace(
            id=r["id"],
            prompt_id=r["prompt_id"],
            lang=r["lang"],
            prompt=r["prompt"],
            response=r["response"],
            reference=r.get("answer"),
            answer_type=r.get("answer_type", "numeric"),
        )
        for r in records.values()
    ]
    result = verify_traces(traces, d.verify, d.format, progress=True)
    write_documents(out / "verified.jsonl", (records[t.id] for t in result.kept))
    write_documents(
        out / "rejected.jsonl",
        (
            {
                **records[t.id],
                "rejected_by": [{"check": r.check, "detail": r.detail, "rules": list(r.rules)} for r in why],
            }
            for t, why in result.rejected
        ),
    )
    report = result.report()
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", render_report_markdown(report))
    log.info("verify: kept %d of %d traces", len(result.kept), len(traces))
    return {
        "traces": len(traces),
        "kept": len(result.kept),
        "rejected": len(result.rejected),
        "report": "report.json",
    }


def _verified_traces(work: Path, phases: Sequence[str]) -> list[dict[str, Any]]:
    if "verify" in phases:
        path = work / "verify" / "verified.jsonl"
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f]
    log.warning("distill: no verify phase, training on every generated trace unchecked")
    return list(iter_traces(work / "generate"))


def run_distill(
    d: DistillConfig,
    engine_cfg: EngineConfig,
    out: Path,
    work: Path,
    *,
    seed: int,
    logging_callbacks: Callable[[str], list[Callback]],
) -> dict[str, Any]:
    """Run ``d.phases`` in order (resuming finished ones) in ``work`` (the stage's scratch folder) and
    collect the artifacts in ``out``; ``logging_callbacks(name)`` gives a training phase's progress and
    wandb callbacks."""
    _check_inputs(d)
    phases = list(d.phases)
    needs_prompts = "generate" in phases or "sft" in phases
    prompts: list[PromptRecord] = (
        load_prompts(d.prompts, d.langs, key="distill.prompts") if needs_prompts else []
    )
    eval_prompts = (
        load_prompts(d.eval_prompts, d.langs, key="distill.eval_prompts", limit=d.eval.max_prompts)
        if d.eval_prompts
        else []
    )
    for name in ("token_kd", "select_kd"):
        if name in phases and getattr(d, name).teacher == "online":
            check_same_tokenizer(d.student or "", d.teacher or "")
        elif name in phases and "generate" in phases and d.generate.backend == "server":
            check_same_tokenizer(d.student or "", d.generate.server.tokenizer or "")

    cache = StepCache(work, None, what="distill")  # every unit carries its own (chained) fingerprint

    def accuracy(model: Path | str, tag: str, fp: str) -> dict[str, Any] | None:
        if not eval_prompts:
            return None
        key = fingerprint([fp, str(model), asdict(d.eval), d.eval_prompts])
        saved = cache.done(f"accuracy_{tag}", key)
        if saved is not None:
            return saved
        log.info("distill: held-out accuracy of %s (%d prompts)", tag, len(eval_prompts))
        acc = evaluate_accuracy(
            model, eval_prompts, d.eval, d.format, chat_template=d.chat_template, seed=seed
        )
        cache.mark(f"accuracy_{tag}", acc, key)
        log.info("distill: %s accuracy %s", tag, _acc_line(acc))
        return acc

    summary: dict[str, Any] = {"phases": phases, "accuracy": {}}
    if eval_prompts and d.eval.teacher and d.teacher:
        summary["accuracy"]["teacher"] = accuracy(d.teacher, "teacher", "")
    training = [p for p in phases if p in TRAINING_PHASES]
    model = Path(d.student) if d.student else None
    if training and model is not None:
        summary["accuracy"]["student_before"] = accuracy(model, "student_before", "")
    fp = fingerprint([d.langs, d.format.think_open, d.format.think_close])
    for name in phases:
        pdir = work / name
        fp = fingerprint([fp, name, _phase_settings(d, engine_cfg, seed, name)])
        done = cache.done(name, fp)  # finished with other settings: removed, started over
        if done is not None:
            log.info("distill: phase %s already done, skipping", name)
            phase_summary = done
        else:
            cache.folder(name)
            log.info("distill: phase %s", name)
            phase_summary = _run_phase(
                name, d, engine_cfg, seed, logging_callbacks, pdir, work, prompts, model
            )
            cache.mark(name, phase_summary, fp)
        summary[name] = phase_summary
        if name in TRAINING_PHASES:
            model = pdir / "model"
            if d.eval.after_each_phase or name == training[-1]:
                summary["accuracy"][f"after_{name}"] = accuracy(model, f"after_{name}", fp)
    for name in phases:
        shutil.move(str(work / name), str(out / name))
        (out / name / MARKER).unlink()
    if training:
        shutil.move(str(out / training[-1] / "model"), str(out / "model"))
        summary["model"] = "model"
    summary["accuracy"] = {k: v for k, v in summary["accuracy"].items() if v is not None}
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "report.md", render_distill_report(summary, out))
    return summary


def _run_phase(
    name: str,
    d: DistillConfig,
    engine_cfg: EngineConfig,
    seed: int,
    logging_callbacks: Callable[[str], list[Callback]],
    pdir: Path,
    work: Path,
    prompts: list[PromptRecord],
    model: Path | None,
) -> dict[str, Any]:
    if name == "generate":
        return run_generate(
            prompts, d.teacher, d.generate, pdir, seed=seed, chat_template=d.chat_template, student=d.student
        )
    if name == "verify":
        return run_verify(d, work / "generate", pdir)
    from transformers import AutoTokenizer

    assert model is not None
    pcfg = getattr(d, name)
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    kd = _kd_settings(d, name)
    if name == "sft":
        examples = reference_examples(tokenizer, prompts, d.chat_template)
    else:
        topk_dir = work / "generate" if kd is not None and pcfg.teacher == "topk" else None
        examples = trace_examples(
            tokenizer, _verified_traces(work, d.phases), d.chat_template, topk_dir=topk_dir
        )
    teacher = d.teacher if kd is not None and pcfg.teacher == "online" else None
    return run_train_phase(
        name,
        pcfg,
        init_from=model,
        examples=examples,
        langs=d.langs,
        engine_cfg=engine_cfg,
        work=pdir,
        seed=seed,
        kd=kd,
        teacher=teacher,
        callbacks=logging_callbacks(f"distill_{name}"),
    )


def _acc_line(acc: dict[str, Any]) -> str:
    return "  ".join(f"{lang} {r['accuracy']:.3f}" for lang, r in acc.items() if lang != "gap")


def render_distill_report(summary: dict[str, Any], out: Path) -> str:
    """Markdown: held-out accuracy table (with the language gap) and the verification counts."""
    lines = ["# Distillation report", "", f"Phases: {', '.join(summary['phases'])}", ""]
    acc = summary.get("accuracy", {})
    if acc:
        langs = sorted({lang for a in acc.values() for lang in a if lang != "gap"})
        lines += [
            "## Held-out accuracy (greedy)",
            "",
            "| model | " + " | ".join(langs) + " | gap (en − lang) |",
            "|---|" + "---|" * (len(langs) + 1),
        ]
        for tag, a in acc.items():
            cells = [
                "{accuracy:.3f} [{ci95[0]:.2f}, {ci95[1]:.2f}] (n={n})".format(**a[lang])
                if lang in a
                else "–"
                for lang in langs
            ]
            gap = ", ".join(f"{k} {v:+.3f}" for k, v in a.get("gap", {}).items()) or "–"
            lines.append(f"| {tag} | " + " | ".join(cells) + f" | {gap} |")
        lines.append("")
    if (out / "verify" / "report.md").is_file():
        lines += ["## Verification", "", (out / "verify" / "report.md").read_text(encoding="utf-8")]
    for name in TRAINING_PHASES:
        if name in summary:
            s = summary[name]
            lines.append(
                f"- **{name}**: {s['steps']} steps on {s['examples']} examples, final loss {s['final_loss']}"
            )
            if "selected_share" in s:
                lines.append(f"  - SelecTKD share of tokens selected (last step): {s['selected_share']}")
    return "\n".join(lines) + "\n"
