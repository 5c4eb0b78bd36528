"""The ``distill`` stage's work: chain-of-thought distillation in the phases ``distill.phases`` lists.

Each phase works in ``<work>/<phase>`` (``work``: the stage's scratch folder, ``<run_dir>/.work/distill``)
and finishes by writing ``_COMPLETE.json`` with a fingerprint of everything it depends on (its own
settings and every earlier phase's): a :class:`~moe_adapt.resume.StepCache` whose units are the phases
(and the held-out accuracy checks), each with its own chained fingerprint. A re-run after
a crash skips finished phases, resumes the interrupted one (generate from its finished shards,
training phases from their latest checkpoint) and runs the rest. When all phases are done the
folders move into the stage folder, the last training phase's model becomes ``model/``, and
``summary.json`` / ``report.md`` collect verification counts and held-out accuracy before and after.

Every training phase can replay general text (``distill.replay``: :mod:`moe_adapt.distill.replay`) and
anchor to the model it starts from (``distill.<phase>.l2_anchor_coef`` / ``kl_anchor_coef``). With
``distill.heldout`` the held-out loss per language of the student and of each training phase's model
is measured (as the cpt stage measures it) and reported beside the accuracy, with
``distill.forgetting_bound`` checked from the student to the last phase
(:func:`moe_adapt.cpt.heldout.forgetting_report`).
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from moe_adapt import distributed
from moe_adapt.checkpoint.hf import check_seq_len
from moe_adapt.cpt.config import MixtureConfig
from moe_adapt.cpt.heldout import forgetting_report, log_forgetting
from moe_adapt.data.jsonl import write_documents
from moe_adapt.distill.accuracy import evaluate_accuracy
from moe_adapt.distill.config import SELECT_KD_DEFAULT_THETA, TRAINING_PHASES, DistillConfig
from moe_adapt.distill.generate import generation_settings, iter_traces, run_generate
from moe_adapt.distill.prompts import PromptRecord, load_prompts
from moe_adapt.distill.replay import ReplaySource, check_source
from moe_adapt.distill.train_phase import (
    check_same_tokenizer,
    evaluate_heldout,
    reference_examples,
    run_train_phase,
    trace_examples,
)
from moe_adapt.distill.verify import Trace, render_report_markdown, verify_traces
from moe_adapt.engines.base import EngineConfig
from moe_adapt.engines.lora import refuse_megatron
from moe_adapt.engines.objectives import KDSettings
from moe_adapt.errors import MoEAdaptConfigError
from moe_adapt.eval.heldout import HeldOut, load_heldout
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
    # hf and vllm run distill.teacher here; with server it is needed only for online KD and teacher eval
    hf = d.generate.backend in ("hf", "vllm")
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
    if d.replay > 0 and phases & set(TRAINING_PHASES):
        check_source(d.shards, d.replay)
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


def _phase_settings(
    d: DistillConfig, engine_cfg: EngineConfig, seed: int, name: str, mixture: MixtureConfig
) -> dict[str, Any]:
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
    phase = asdict(getattr(d, name))
    if not getattr(d, name).lora.enabled:  # off: run folders made before LoRA existed stay valid
        del phase["lora"]
    settings = {
        "phase": phase,
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
    if d.replay > 0:
        replay: dict[str, Any] = {"share": d.replay, "shards": d.shards, "mixture": asdict(mixture)}
        for key in ("rows", "adds_steps"):  # only when on: run folders made before them stay valid
            if getattr(d, f"replay_{key}"):
                replay[key] = True
        settings["replay"] = replay
    if d.heldout:
        settings["heldout"] = {"path": d.heldout, "docs": d.heldout_docs, "window": mixture.seq_len}
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
    mixture: MixtureConfig | None = None,
) -> dict[str, Any]:
    """Run ``d.phases`` in order (resuming finished ones) in ``work`` (the stage's scratch folder) and
    collect the artifacts in ``out``; ``logging_callbacks(name)`` gives a training phase's progress and
    wandb callbacks. ``mixture`` (the ``mixture`` group) gives replay its sources and ratio and the
    held-out loss its window (``mixture.seq_len``, as in cpt)."""
    mixture = mixture or MixtureConfig()
    _check_inputs(d)
    phases = list(d.phases)
    if engine_cfg.name == "megatron":  # before any work, not when the phase builds its engine
        for name in (p for p in phases if p in TRAINING_PHASES):
            refuse_megatron(getattr(d, name).lora, f"distill.{name}.lora")
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

    dist = distributed.current()
    cache = StepCache(work, None, what="distill")  # every unit carries its own (chained) fingerprint

    def accuracy(model: Path | str, tag: str, fp: str) -> dict[str, Any] | None:
        if not eval_prompts:
            return None
        key = fingerprint([fp, str(model), asdict(d.eval), d.eval_prompts])

        def measure() -> dict[str, Any]:
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

        return distributed.run_on_main(measure, dist)  # rank 0 alone, the others wait

    training = [p for p in phases if p in TRAINING_PHASES]
    held: HeldOut | None = None
    if d.heldout and training:
        held = load_heldout(d.heldout, max_docs=d.heldout_docs, seed=seed, key="distill.heldout")
    window = mixture.seq_len
    replay = (
        ReplaySource(Path(d.shards or ""), mixture, d.replay, d.replay_rows, d.replay_adds_steps)
        if d.replay > 0 and training
        else None
    )

    summary: dict[str, Any] = {"phases": phases, "accuracy": {}, "heldout": {}}
    if held is not None and d.student:
        summary["heldout"]["student_before"] = distributed.run_on_main(
            functools.partial(_heldout_student, cache, d.student, held, window, d, seed), dist
        )
    if eval_prompts and d.eval.teacher and d.teacher:
        summary["accuracy"]["teacher"] = accuracy(d.teacher, "teacher", "")
    model = Path(d.student) if d.student else None
    if training and model is not None:
        summary["accuracy"]["student_before"] = accuracy(model, "student_before", "")
    fp = fingerprint([d.langs, d.format.think_open, d.format.think_close])
    for name in phases:
        pdir = work / name
        fp = fingerprint([fp, name, _phase_settings(d, engine_cfg, seed, name, mixture)])
        # finished with other settings: removed (by rank 0), started over
        done = distributed.run_on_main(functools.partial(cache.done, name, fp), dist)
        if done is not None:
            log.info("distill: phase %s already done, skipping", name)
            phase_summary = done
        else:
            run = functools.partial(
                _run_phase, name, d, engine_cfg, seed, logging_callbacks, pdir, work, prompts, model, replay
            )
            run = functools.partial(run, held, window)
            if dist.is_distributed and (
                name in TRAINING_PHASES or (name, d.generate.backend) == ("generate", "hf")
            ):
                # every rank: data-parallel training, or its share of the generate shards
                distributed.run_on_main(functools.partial(_start_unit, cache, name), dist)
                phase_summary = distributed.broadcast_from_main(run(), dist)  # rank 0's summary
                distributed.run_on_main(functools.partial(cache.mark, name, phase_summary, fp), dist)
            else:
                phase_summary = distributed.run_on_main(
                    functools.partial(_run_and_mark, cache, name, fp, run), dist
                )
        summary[name] = phase_summary
        if name in TRAINING_PHASES:
            model = pdir / "model"
            if "heldout" in phase_summary:
                summary["heldout"][f"after_{name}"] = phase_summary["heldout"]
            if d.eval.after_each_phase or name == training[-1]:
                summary["accuracy"][f"after_{name}"] = accuracy(model, f"after_{name}", fp)
    # rank 0 collects the artifacts; every rank returns its summary
    collect = functools.partial(_collect, d, out, work, phases, training, summary)
    return distributed.run_on_main(collect, dist)


def _heldout_student(
    cache: StepCache, student: str, held: HeldOut, window: int, d: DistillConfig, seed: int
) -> dict[str, Any]:
    key = fingerprint([student, d.heldout, d.heldout_docs, window, seed])
    before = cache.done("heldout_student", key)
    if before is None:
        log.info("distill: held-out loss of the student")
        before = evaluate_heldout(student, held, window)
        cache.mark("heldout_student", before, key)
    return before


def _start_unit(cache: StepCache, name: str) -> None:
    log.info("distill: phase %s", name)
    cache.folder(name)


def _run_and_mark(cache: StepCache, name: str, fp: str, run: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    _start_unit(cache, name)
    phase_summary = run()
    cache.mark(name, phase_summary, fp)
    return phase_summary


def _collect(
    d: DistillConfig,
    out: Path,
    work: Path,
    phases: Sequence[str],
    training: Sequence[str],
    summary: dict[str, Any],
) -> dict[str, Any]:
    """Move the phases' folders from ``work`` into ``out``; write ``summary.json`` and ``report.md``."""
    for name in phases:
        shutil.move(str(work / name), str(out / name))
        (out / name / MARKER).unlink()
    if training:
        shutil.move(str(out / training[-1] / "model"), str(out / "model"))
        summary["model"] = "model"
    summary["accuracy"] = {k: v for k, v in summary["accuracy"].items() if v is not None}
    if d.forgetting_bound and training:
        after = summary["heldout"].get(f"after_{training[-1]}")
        before = summary["heldout"].get("student_before")
        if after is not None and before is not None:
            summary["forgetting"] = forgetting_report(before, after, d.forgetting_bound)
            log_forgetting(summary["forgetting"], "distill", "distill.forgetting_bound")
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
    replay: ReplaySource | None,
    held: HeldOut | None,
    window: int,
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
        replay=replay,
        heldout=held,
        heldout_window=window,
    )


def _acc_line(acc: dict[str, Any]) -> str:
    return "  ".join(f"{lang} {r['accuracy']:.3f}" for lang, r in acc.items() if lang != "gap")


def render_distill_report(summary: dict[str, Any], out: Path) -> str:
    """Markdown: held-out accuracy (with the language gap) beside held-out loss per language, the
    forgetting bound's verdict, the verification counts and each training phase's steps and replay."""
    lines = ["# Distillation report", "", f"Phases: {', '.join(summary['phases'])}", ""]
    acc = summary.get("accuracy", {})
    held = summary.get("heldout", {})
    if acc or held:
        langs = sorted({lang for a in acc.values() for lang in a if lang != "gap"})
        held_langs = sorted({k[5:] for h in held.values() for k in h if k.startswith("loss_")})
        header = [f"accuracy {lang}" for lang in langs] + (["gap (en − lang)"] if langs else [])
        header += [f"held-out loss {lang} (bits/byte)" for lang in held_langs]
        lines += [
            "## Held-out accuracy (greedy) and held-out loss (nats/token)",
            "",
            "| model | " + " | ".join(header) + " |",
            "|---|" + "---|" * len(header),
        ]
        for tag in [*acc, *(t for t in held if t not in acc)]:
            a, h = acc.get(tag, {}), held.get(tag, {})
            cells = [
                "{accuracy:.3f} [{ci95[0]:.2f}, {ci95[1]:.2f}] (n={n})".format(**a[lang])
                if lang in a
                else "–"
                for lang in langs
            ]
            if langs:
                cells.append(", ".join(f"{k} {v:+.3f}" for k, v in a.get("gap", {}).items()) or "–")
            for lang in held_langs:
                loss = h.get(f"loss_{lang}")
                bpb = h.get(f"bpb_{lang}")
                cells.append(
                    "–" if loss is None else f"{loss:.3f}" + (f" ({bpb:.3f})" if bpb is not None else "")
                )
            lines.append(f"| {tag} | " + " | ".join(cells) + " |")
        lines.append("")
    forgetting = summary.get("forgetting", {})
    if forgetting:
        lines += [
            "## Forgetting bound (held-out loss, student → last phase)",
            "",
            "| language | before | after | rise | bound | verdict |",
            "|---|---|---|---|---|---|",
        ]
        for lang, r in forgetting.items():
            if r["held"] is None:
                lines.append(f"| {lang} | – | – | – | +{r['bound']} | not checked: {r['note']} |")
                continue
            verdict = "held" if r["held"] else "EXCEEDED"
            cells = [f"{r['before']:.3f}", f"{r['after']:.3f}", f"{r['rise']:+.3f}"]
            cells += [f"+{r['bound']}", verdict]
            lines.append(f"| {lang} | " + " | ".join(cells) + " |")
        lines.append("")
    if (out / "verify" / "report.md").is_file():
        lines += ["## Verification", "", (out / "verify" / "report.md").read_text(encoding="utf-8")]
    for name in TRAINING_PHASES:
        if name in summary:
            s = summary[name]
            lines.append(
                f"- **{name}**: {s['steps']} steps on {s['examples']} examples, final loss {s['final_loss']}"
            )
            if "replay" in s:
                r = s["replay"]
                what = (
                    f"{r['realised']} of the rows of every batch (asked {r['share']})"
                    if r.get("rows")
                    else f"{r['batches']} general-text batches of {s['steps']} (share {r['realised']}, "
                    f"asked {r['share']}), last replay LM loss {r['final_lm_loss']}"
                )
                lines.append(f"  - replay: {what}")
            if "selected_share" in s:
                lines.append(f"  - SelecTKD share of tokens selected (last step): {s['selected_share']}")
    return "\n".join(lines) + "\n"
