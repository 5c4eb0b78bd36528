"""The ``eval`` stage's work: every checkpoint of ``eval.models`` on held-out text, benchmarks and routing.

Per model: per-language held-out loss/perplexity and bits per byte/character (sliding window) from the
data stage's shards;
multiple-choice accuracy per language by log-likelihood, with ECE and, on parallel items, LPG and
CLCS; expert-routing analysis with heatmaps for MoE checkpoints; lm-eval tasks when
``eval.harness_tasks`` is set. Outputs (paths relative to the stage folder):

- ``metrics.json``: flat ``"<model>/<metric>" -> number`` (what the ``report`` stage aggregates);
- ``eval.json``: everything, including malformed-item counts and bilingual details;
- ``routing/<model>/routing.json`` + ``routing_heatmap.png`` + ``routing_jsd.png``;
- ``report.md``: a readable summary, with the contamination summary when one exists.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from moe_adapt import distributed
from moe_adapt.errors import MoEAdaptError
from moe_adapt.eval.bilingual import MCPrediction, bilingual_metrics, expected_calibration_error
from moe_adapt.eval.config import BenchmarkEntry, EvalConfig
from moe_adapt.eval.heldout import HeldOut, load_heldout
from moe_adapt.eval.mc import MCSet, ScoredItem, load_mc_items, score_items
from moe_adapt.eval.stats import bootstrap_ci
from moe_adapt.eval.summary import log_table, render_markdown
from moe_adapt.fs import atomic_write_text

__all__ = ["evaluate", "evaluate_model"]

log = logging.getLogger("moe_adapt.eval")


def _check_inputs(ecfg: EvalConfig) -> None:
    """Fail before any model loads: no model, a missing checkpoint or benchmark file."""
    if not ecfg.models:
        raise MoEAdaptError(
            "eval.models is empty: give the checkpoints to evaluate, e.g. "
            "eval.models='[{name: moe, path: runs/tiny/upcycle/model}]'"
        )
    for i, m in enumerate(ecfg.models):
        if not Path(m.path).is_dir():
            raise MoEAdaptError(f"eval.models[{i}].path={m.path!r} does not exist (model {m.name!r})")
        if not (Path(m.path) / "config.json").is_file():
            raise MoEAdaptError(
                f"eval.models[{i}].path={m.path!r} has no config.json; expected a Hugging Face checkpoint"
            )
    for i, b in enumerate(ecfg.benchmarks):
        for lang, f in b.files.items():
            if not Path(f).is_file():
                raise MoEAdaptError(f"eval.benchmarks[{i}].files.{lang}={f!r} does not exist")


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _load_model(
    path: str, ecfg: EvalConfig, index: int, rank_device: torch.device | None = None
) -> torch.nn.Module:
    from moe_adapt.checkpoint.hf import DTYPES, load_causal_lm

    if ecfg.dtype == "auto":
        cfg = json.loads((Path(path) / "config.json").read_text(encoding="utf-8"))
        name = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32")
        dtype = DTYPES.get(name, torch.float32)
    else:
        dtype = DTYPES[ecfg.dtype]
    try:
        device = _device(ecfg.device)
        if ecfg.device == "auto" and rank_device is not None and device.type == rank_device.type:
            device = rank_device  # under torchrun: this rank's GPU, not cuda:0
        return load_causal_lm(path, dtype=dtype, device=device)
    except MoEAdaptError as err:
        raise MoEAdaptError(f"eval.models[{index}].path={path!r}: {err}") from err


def cap_items(sets: dict[str, MCSet], max_items: int | None, source_lang: str) -> dict[str, MCSet]:
    """``eval.benchmark_max_items``: the first ``max_items`` items of the ``source_lang`` set (else of
    the first language), and in each other language the items parallel to those, falling back to its
    first ``max_items`` when it has no parallel keys. ``None``: the sets unchanged."""
    if max_items is None or not sets:
        return sets
    lead = sets.get(source_lang) or next(iter(sets.values()))
    keys = {it.pair_key for it in lead.items[:max_items] if it.pair_key is not None}
    capped = {}
    for lang, mc in sets.items():
        items = [it for it in mc.items if it.pair_key in keys][:max_items] if keys else []
        capped[lang] = dataclasses.replace(mc, items=items or mc.items[:max_items])
    return capped


def _load_tokenizer(model_path: str, ecfg: EvalConfig, heldout: HeldOut | None) -> Any:
    """The tokenizer for benchmark text: eval.tokenizer, else the checkpoint's, else the manifest's."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    has_own = any((Path(model_path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    source = ecfg.tokenizer or (model_path if has_own else None)
    if source is None and heldout is not None:
        source = heldout.manifest.get("tokenizer")
    if source is None:
        raise MoEAdaptError(
            f"eval.tokenizer=None is invalid: checkpoint {model_path!r} has no tokenizer and no held-out "
            "manifest names one; set eval.tokenizer=/path/to/tokenizer.json"
        )
    p = Path(source)
    try:
        if p.is_dir() and (p / "tokenizer_config.json").is_file():
            return AutoTokenizer.from_pretrained(p, local_files_only=True, trust_remote_code=False)
        file = p / "tokenizer.json" if p.is_dir() else p
        tok = PreTrainedTokenizerFast(tokenizer_file=str(file))
    except (OSError, ValueError) as err:
        raise MoEAdaptError(f"eval.tokenizer: cannot load a tokenizer from {str(p)!r}: {err}") from err
    eod = heldout.manifest.get("eod_id") if heldout is not None else None
    if tok.eos_token is None and eod is not None:
        tok.eos_token = tok.convert_ids_to_tokens(int(eod))
    return tok


def _is_moe(model: torch.nn.Module) -> bool:
    from moe_adapt.eval.routing import find_routers

    try:
        find_routers(model)
    except MoEAdaptError:
        return False
    return True


def _benchmark_metrics(
    scored: dict[str, list[ScoredItem]], bench: BenchmarkEntry, ecfg: EvalConfig, seed: int
) -> dict[str, Any]:
    """Accuracy, acc_norm, ECE (+CI) per language and bilingual metrics against ``source_lang``."""
    langs: dict[str, Any] = {}
    preds: dict[str, dict[str, MCPrediction]] = {}
    for lang, items in scored.items():
        if not items:
            langs[lang] = {"items": 0}
            continue
        p = [MCPrediction.from_scores(s.item.id, s.item.answer, s.loglik) for s in items]
        correct = [float(x.correct) for x in p]
        ci = bootstrap_ci(
            correct, n_resamples=ecfg.bootstrap_resamples, confidence=ecfg.confidence, seed=seed
        )
        ece = expected_calibration_error(
            [x.confidence for x in p], [x.correct for x in p], n_bins=ecfg.ece_bins
        )
        langs[lang] = {
            "items": len(items),
            "acc": float(np.mean(correct)),
            "acc_ci": [ci.low, ci.high],
            "acc_norm": float(np.mean([s.pick_norm == s.item.answer for s in items])),
            "ece": ece["ece"],
        }
        by_key: dict[str, MCPrediction] = {}
        for s, x in zip(items, p, strict=True):
            if s.item.pair_key is not None and s.item.pair_key not in by_key:
                by_key[s.item.pair_key] = dataclasses.replace(x, item_id=s.item.pair_key)
        preds[lang] = by_key
    bilingual: dict[str, Any] = {}
    src = bench.source_lang
    for tgt in (lang for lang in scored if lang != src and src in preds and lang in preds):
        shared = set(preds[src]) & set(preds[tgt])
        mismatched = sorted(k for k in shared if preds[src][k].answer != preds[tgt][k].answer)
        pair_preds = {lang: [v for k, v in preds[lang].items() if k not in mismatched] for lang in (src, tgt)}
        try:
            res = bilingual_metrics(
                pair_preds, source=src, target=tgt, n_bins=ecfg.ece_bins, allow_unmatched=True
            )
        except MoEAdaptError as err:
            bilingual[tgt] = {"skipped": str(err)}
            continue
        res.pop("calibration", None)
        res["answer_mismatch"] = len(mismatched)
        bilingual[tgt] = res
    return {"languages": langs, "bilingual": bilingual}


def _flat(name: str, result: dict[str, Any]) -> dict[str, float]:
    """The ``metrics.json`` entries of one model."""
    out: dict[str, float] = {}
    for lang, r in result.get("heldout", {}).items():
        out[f"{name}/loss_{lang}"] = r["mean_loss"]
        out[f"{name}/ppl_{lang}"] = r["ppl"]
        out[f"{name}/bpb_{lang}"] = r.get("bits_per_byte")
        out[f"{name}/bpc_{lang}"] = r.get("bits_per_char")
    for bench, b in result.get("benchmarks", {}).items():
        for lang, r in b["languages"].items():
            for k in ("acc", "acc_norm", "ece"):
                if k in r:
                    out[f"{name}/{bench}.{k}_{lang}"] = r[k]
        for tgt, r in b["bilingual"].items():
            if "lpg" in r:
                out[f"{name}/{bench}.lpg_{tgt}"] = r["lpg"]
                out[f"{name}/{bench}.clcs_{tgt}"] = r["clcs"]
    routing = result.get("routing", {})
    for pair, v in routing.get("jsd_nats_mean", {}).items():
        out[f"{name}/routing.jsd_{pair.replace('|', '_')}"] = v
    for k in ("specialised_share", "load_max_over_mean"):
        if k in routing:
            out[f"{name}/routing.{k}"] = routing[k]
    for task, metrics in result.get("harness", {}).items():
        for k, v in metrics.items():
            out[f"{name}/harness.{task}.{k}"] = v
    return {k: float(v) for k, v in out.items() if v is not None and np.isfinite(v)}


def evaluate_model(
    model: torch.nn.Module,
    name: str,
    model_path: str,
    ecfg: EvalConfig,
    heldout: HeldOut | None,
    benches: dict[str, dict[str, MCSet]],
    out: Path,
    seed: int = 0,
) -> dict[str, Any]:
    """Every enabled evaluation of one loaded model; returns its part of ``eval.json``."""
    from moe_adapt.eval.perplexity import evaluate_perplexity

    config = getattr(model, "config", None)
    max_pos = getattr(config, "max_position_embeddings", None) or 2048
    result: dict[str, Any] = {"path": model_path, "moe": _is_moe(model)}
    result["params"] = int(sum(p.numel() for p in model.parameters()))
    if heldout is not None:
        window = min(ecfg.window or max_pos, max_pos)
        stride = min(ecfg.stride or window, window)
        result["heldout"] = {}
        for lang in tqdm(heldout.docs, desc=f"{name} held-out", leave=False, mininterval=2):
            ppl = evaluate_perplexity(
                model,
                {lang: heldout.docs[lang]},
                window=window,
                stride=stride,
                batch_size=ecfg.batch_size,
                token_sizes=heldout.token_sizes,
            )
            result["heldout"][lang] = ppl[lang].to_dict()
        result["window"], result["stride"] = window, stride
    tokenizer = None
    if benches or ecfg.harness_tasks:
        tokenizer = _load_tokenizer(model_path, ecfg, heldout)
    if benches:
        assert tokenizer is not None

        def encode(text: str, special: bool) -> list[int]:
            return list(tokenizer(text, add_special_tokens=special)["input_ids"])

        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        result["benchmarks"] = {}
        for bench in ecfg.benchmarks:
            scored = {
                lang: score_items(
                    model,
                    encode,
                    mc.items,
                    delimiter=bench.target_delimiter,
                    max_length=max_pos,
                    batch_size=ecfg.batch_size,
                    pad_id=pad_id,
                    desc=f"{name} {bench.name}_{lang}",
                )
                for lang, mc in benches[bench.name].items()
            }
            result["benchmarks"][bench.name] = _benchmark_metrics(scored, bench, ecfg, seed)
    if ecfg.routing and result["moe"] and heldout is not None:
        from moe_adapt.eval.routing import routing_report

        folder = out / "routing" / name
        analysis = routing_report(
            model,
            heldout.docs,
            folder,
            batch_size=ecfg.batch_size,
            max_length=min(ecfg.routing_max_tokens, max_pos),
            specialization_threshold=ecfg.specialization_threshold,
        )
        result["routing"] = {
            "json": f"routing/{name}/routing.json",
            "plots": [f"routing/{name}/{p.name}" for p in sorted(folder.glob("*.png"))],
            "jsd_nats_mean": analysis["jsd_nats_mean"],
            "specialised_share": float(np.mean(analysis["specialization"]["share_of_used_experts"])),
            "load_max_over_mean": float(np.mean(analysis["load_imbalance"]["max_over_mean"])),
        }
    if ecfg.harness_tasks:
        from moe_adapt.eval.harness import run_harness

        result["harness"] = run_harness(
            model,
            tokenizer,
            ecfg.harness_tasks,
            out / "harness" / name,
            data_dir=ecfg.harness_data_dir,
            include=ecfg.harness_include,
            include_defaults=ecfg.harness_defaults,
            batch_size=ecfg.batch_size,
            num_fewshot=ecfg.harness_num_fewshot,
            limit=ecfg.harness_limit,
            seed=seed,
        )
    return result


def _gather(work: Path, out: Path, world_size: int) -> dict[str, tuple[dict[str, Any], dict[str, float]]]:
    """Rank 0: the other ranks' results (``work/rank<r>/results.json``), their files moved into ``out``."""
    gathered: dict[str, tuple[dict[str, Any], dict[str, float]]] = {}
    for rank in range(1, world_size):
        folder = work / f"rank{rank}"
        if not (folder / "results.json").is_file():
            continue  # it had no model
        for name, (res, flat) in json.loads((folder / "results.json").read_text(encoding="utf-8")).items():
            gathered[name] = (res, flat)
        for kind in sorted(p for p in folder.iterdir() if p.is_dir()):  # routing/, harness/
            for item in sorted(kind.iterdir()):
                (out / kind.name).mkdir(parents=True, exist_ok=True)
                shutil.move(str(item), str(out / kind.name / item.name))
        shutil.rmtree(folder)
    return gathered


def evaluate(ecfg: EvalConfig, out: Path, *, seed: int, work: Path | None = None) -> dict[str, Any]:
    """Evaluate every checkpoint of ``ecfg.models`` into ``out`` and return the stage summary.

    ``seed`` draws the held-out sample and the bootstrap resamples. Paths in the summary are relative
    to the stage folder. Under torchrun the ranks share the models (rank ``r`` of ``W``: models
    ``r, r+W, ...``, on its own device when ``eval.device=auto``), the other ranks hand their results and
    files to rank 0 through ``work`` (a folder every rank sees), and rank 0 writes the same files as one
    process; the other ranks return ``{}``.
    """
    _check_inputs(ecfg)
    heldout = None
    if ecfg.heldout is not None:
        heldout = load_heldout(
            ecfg.heldout,
            languages=ecfg.languages,
            max_docs=ecfg.max_docs_per_language,
            seed=seed,
            tokenizer=ecfg.tokenizer,
        )
    else:
        log.warning("eval: eval.heldout is null; skipping held-out loss and routing analysis")
    benches: dict[str, dict[str, MCSet]] = {}
    for i, bench in enumerate(ecfg.benchmarks):
        benches[bench.name] = cap_items(
            {
                lang: load_mc_items(
                    f, parallel_key=bench.parallel_key, key=f"eval.benchmarks[{i}].files.{lang}"
                )
                for lang, f in bench.files.items()
            },
            ecfg.benchmark_max_items,
            bench.source_lang,
        )
    results: dict[str, Any] = {"models": {}}
    if heldout is not None:
        results["heldout"] = {
            "dir": str(ecfg.heldout),
            "documents": {lang: len(d) for lang, d in heldout.docs.items()},
            "available": heldout.available,
            "tokens": heldout.tokens,
            "bytes_from": heldout.token_sizes.method if heldout.token_sizes is not None else None,
        }
    results["benchmarks"] = {
        name: {
            lang: {
                "file": str(ecfg.benchmarks[i].files[lang]),
                "items": len(mc.items),
                "malformed": mc.malformed,
            }
            | ({"malformed_examples": mc.examples} if mc.examples else {})
            for lang, mc in langs.items()
        }
        for i, (name, langs) in enumerate(benches.items())
    }
    dist = distributed.current()
    if dist.is_distributed and work is None:
        raise MoEAdaptError("eval under torchrun needs a folder every rank sees (the stage's work folder)")
    # under torchrun rank r evaluates models r, r+W, ... (the others' files go through work/rank<r>)
    mine = out if dist.is_main or work is None else work / f"rank{dist.rank}"
    mine.mkdir(parents=True, exist_ok=True)
    done: dict[str, tuple[dict[str, Any], dict[str, float]]] = {}
    for i, entry in enumerate(ecfg.models):
        if i % dist.world_size != dist.rank:
            continue
        log.info("eval: %s <- %s", entry.name, entry.path)
        model = _load_model(entry.path, ecfg, i, dist.device if dist.is_distributed else None)
        try:
            res = evaluate_model(model, entry.name, entry.path, ecfg, heldout, benches, mine, seed)
        finally:
            del model
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        # as eval.json will hold it: every rank's results alike, whichever rank measured them
        done[entry.name] = (json.loads(json.dumps(res, default=str)), _flat(entry.name, res))
    if dist.is_distributed:
        assert work is not None
        if not dist.is_main:
            atomic_write_text(mine / "results.json", json.dumps(done))
        distributed.barrier(dist)
        if not dist.is_main:
            distributed.barrier(dist)  # rank 0 has collected this rank's files
            return {}
        done.update(_gather(work, out, dist.world_size))
    metrics: dict[str, float] = {}
    for entry in ecfg.models:
        results["models"][entry.name], flat = done[entry.name]
        metrics.update(flat)
    contamination = Path(ecfg.contamination) if ecfg.contamination else None
    if contamination is not None and not contamination.is_file():
        log.info("eval: no contamination report at %s; report.md leaves it out", contamination)
        contamination = None
    results["contamination"] = str(contamination) if contamination else None
    settings = dataclasses.asdict(ecfg) if dataclasses.is_dataclass(ecfg) else {}
    results["settings"] = settings
    atomic_write_text(out / "metrics.json", json.dumps(metrics, indent=1, sort_keys=True))
    atomic_write_text(out / "eval.json", json.dumps(results, indent=1, default=str))
    atomic_write_text(out / "report.md", render_markdown(results, contamination))
    for line in log_table(results):
        log.info("eval: %s", line)
    if dist.is_distributed:
        distributed.barrier(dist)
    malformed = sum(v["malformed"] for b in results["benchmarks"].values() for v in b.values())
    return {
        "metrics": "metrics.json",
        "eval": "eval.json",
        "report": "report.md",
        "models": [m.name for m in ecfg.models],
        "malformed_items": malformed,
        "headline": {
            k: round(v, 4) for k, v in metrics.items() if "/loss_" in k or "/bpb_" in k or ".acc_" in k
        },
    }
