"""The last steps: per task :class:`ScoreStep` (held-out candidates, raw difficulty scores), once
for the corpus :class:`QuantilesStep` (held-out caps, per-language quantile buckets), per task
:class:`ShardStep` (one ``.bin/.idx`` per (source, language, bucket)), once :class:`MergeShardsStep`."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from moe_adapt.data.config import DataConfig
from moe_adapt.data.dtsteps.base import DocStep, rank_file, save_npz
from moe_adapt.data.steps import StepStats, is_heldout
from moe_adapt.errors import MoEAdaptConfigError
from moe_adapt.fs import atomic_write_json


class ScoreStep(DocStep):
    """Record, per document in task order, what the whole-corpus :class:`QuantilesStep` needs: the
    ordinal, the (source, language) group, whether its id puts it in the held-out candidates, and
    the raw value of each weighted difficulty scorer (``<root>/scores/<rank>.npz``)."""

    def __init__(self, root: str, cfg: DataConfig):
        super().__init__("score", root)
        self.fraction = cfg.heldout_fraction
        self.weights = dict(cfg.difficulty.weights)
        self.reference_model = cfg.difficulty.reference_model
        if self.reference_model:
            self.weights.setdefault("perplexity", 1.0)
        self.rows: dict[str, list[Any]] = {}
        self.scorers: dict[str, Any] = {}

    def start(self, rank: int, world_size: int) -> None:
        from moe_adapt.data.difficulty import SCORERS, perplexity_scorer

        self.scorers = dict(SCORERS)
        if self.reference_model:
            self.scorers["perplexity"] = perplexity_scorer(self.reference_model)
        unknown = sorted(set(self.weights) - set(self.scorers))
        if unknown:
            raise MoEAdaptConfigError(
                f"difficulty.weights has unknown scorer(s) {', '.join(unknown)}; "
                f"available: {', '.join(sorted(self.scorers))}"
            )
        self.rows = {k: [] for k in ("ordinal", "source", "lang", "candidate", *self.weights)}

    def process(self, doc: Document, st: StepStats) -> Document | None:
        self.rows["ordinal"].append(int(doc.metadata["ordinal"]))
        self.rows["source"].append(str(doc.metadata["source"]))
        self.rows["lang"].append(str(doc.metadata["lang"]))
        self.rows["candidate"].append(is_heldout({"id": doc.id}, self.fraction))
        for name, weight in self.weights.items():
            self.rows[name].append(self.scorers[name](doc.text) if weight != 0 else 0.0)
        return doc

    def finish(self, rank: int, st: StepStats) -> dict[str, Any]:
        arrays = {
            "ordinal": np.array(self.rows["ordinal"], dtype="<u8"),
            "source": np.array(self.rows["source"], dtype=str),
            "lang": np.array(self.rows["lang"], dtype=str),
            "candidate": np.array(self.rows["candidate"], dtype=bool),
            **{f"score_{n}": np.array(self.rows[n], dtype=np.float64) for n in self.weights},
        }
        save_npz(rank_file(self.root / "scores", rank, ".npz"), **arrays)
        self.rows = {}
        return {}


class QuantilesStep(PipelineStep):
    """Whole corpus, in corpus order: the held-out documents (candidates up to
    ``heldout_max_docs`` per (source, language)), the z-scores of each scorer over the training
    documents, their weighted sum and the per-language quantile buckets (ties by corpus order).
    Writes ``<root>/plan/<rank>.npz`` (held, difficulty, bucket per document of each task) and
    ``<root>/stats/buckets.json``. Holds 8 bytes per scorer and ~30 per document of the corpus."""

    type = "moe_adapt"
    name = "quantiles"

    def __init__(self, root: str, tasks: int, cfg: DataConfig):
        super().__init__()
        self.root, self.tasks, self.cfg = Path(root), tasks, cfg

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        t0 = time.perf_counter()
        parts = [dict(np.load(rank_file(self.root / "scores", r, ".npz"))) for r in range(self.tasks)]
        sizes = [len(p["ordinal"]) for p in parts]
        cat = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        order = np.argsort(cat["ordinal"], kind="stable")  # corpus order
        n = len(order)
        held = np.zeros(n, dtype=bool)  # in corpus order
        cap = self.cfg.heldout_max_docs
        counts: Counter[tuple[str, str]] = Counter()
        src, lang, cand = cat["source"][order], cat["lang"][order], cat["candidate"][order]
        for i in np.flatnonzero(cand):
            group = (str(src[i]), str(lang[i]))
            if counts[group] < cap:
                counts[group] += 1
                held[i] = True
        train = np.flatnonzero(~held)
        total = np.zeros(len(train))
        weights = dict(self.cfg.difficulty.weights)
        if self.cfg.difficulty.reference_model:
            weights.setdefault("perplexity", 1.0)
        for name, weight in weights.items():
            if weight == 0:
                continue
            values = cat[f"score_{name}"][order][train]
            std = values.std()
            z = (values - values.mean()) / std if std > 0 else np.zeros_like(values)
            total += weight * z
        k = self.cfg.difficulty.buckets
        buckets = np.zeros(len(train), dtype=np.int64)
        train_lang = lang[train]
        table: dict[str, list[int]] = {}
        for lg in sorted(set(train_lang.tolist())):
            idx = np.flatnonzero(train_lang == lg)
            ranked = idx[np.lexsort((idx, total[idx]))]
            m = len(ranked)
            buckets[ranked] = np.minimum(np.arange(m) * k // m, k - 1)
            present = Counter(buckets[idx].tolist())
            table[lg] = [present[b] for b in sorted(present)]
        difficulty = np.zeros(n)
        bucket = np.zeros(n, dtype=np.int64)
        difficulty[train] = total
        bucket[train] = buckets
        # back to each task's order
        inverse = np.empty(n, dtype=np.int64)
        inverse[order] = np.arange(n)
        start = 0
        for r, size in enumerate(sizes):
            pos = inverse[start : start + size]
            start += size
            plan = {"held": held[pos], "difficulty": difficulty[pos], "bucket": bucket[pos]}
            save_npz(rank_file(self.root / "plan", r, ".npz"), **plan)
        atomic_write_json(
            self.root / "stats" / "buckets.json",
            {
                "seconds": round(time.perf_counter() - t0, 3),
                "buckets": k,
                "per_language": table,
                "heldout_documents": int(held.sum()),
            },
        )
        return
        yield


class ShardStep(DocStep):
    """Tokenize the task's documents into ``<root>/shards/<rank>/{train,heldout}``: one ``.bin/.idx``
    per (source, language, bucket), held-out documents in bucket 0, as :class:`QuantilesStep` planned."""

    def __init__(self, root: str, tokenizer: str, eod_token: str | None, batch_size: int):
        super().__init__("shards", root)
        self.tokenizer, self.eod_token, self.batch_size = tokenizer, eod_token, batch_size
        self.sinks: dict[str, Any] = {}
        self.plan: dict[str, np.ndarray] = {}
        self.idx = 0

    def start(self, rank: int, world_size: int) -> None:
        from moe_adapt.data.shards import ShardConfig, ShardSink

        cfg = ShardConfig(eod_token=self.eod_token, batch_size=self.batch_size)
        folder = self.root / "shards" / f"{rank:05d}"
        self.sinks = {s: ShardSink(self.tokenizer, folder / s, cfg) for s in ("train", "heldout")}
        self.plan = dict(np.load(rank_file(self.root / "plan", rank, ".npz")))
        self.idx = 0

    def process(self, doc: Document, st: StepStats) -> Document | None:
        i, self.idx = self.idx, self.idx + 1
        rec = {"text": doc.text, "source": doc.metadata["source"], "lang": doc.metadata["lang"]}
        if self.plan["held"][i]:
            self.sinks["heldout"].add(rec)
        else:
            self.sinks["train"].add({**rec, "bucket": int(self.plan["bucket"][i])})
        return doc

    def finish(self, rank: int, st: StepStats) -> dict[str, Any]:
        for sink in self.sinks.values():
            sink.close()
        self.sinks = {}
        return {}


class MergeShardsStep(PipelineStep):
    """Whole corpus: the tasks' shards concatenated, in task order (corpus order), into
    ``<root>/merged/{shards,heldout}`` with one manifest each naming every shard's role."""

    type = "moe_adapt"
    name = "merge shards"

    def __init__(self, root: str, tasks: int, roles: dict[str, str]):
        super().__init__()
        self.root, self.tasks, self.roles = Path(root), tasks, roles

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        from moe_adapt.data.shards import merge_shards

        t0 = time.perf_counter()
        merged = self.root / "merged"
        summary: dict[str, Any] = {}
        for split, folder in (("train", "shards"), ("heldout", "heldout")):
            parts = [self.root / "shards" / f"{r:05d}" / split for r in range(self.tasks)]
            manifest = merge_shards(parts, merged / folder)
            if manifest is not None:
                for shard in manifest.get("shards", []):
                    shard["role"] = self.roles.get(shard["source"], "other")
                atomic_write_json(merged / folder / "manifest.json", manifest)
            summary[split] = manifest
        atomic_write_json(self.root / "stats" / "merge.json", {"seconds": time.perf_counter() - t0})
        return
        yield
