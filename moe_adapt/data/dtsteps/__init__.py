"""The data stage's steps as datatrove ``PipelineStep``s: generators over ``Document``s, one task's
share of the corpus at a time, so memory is bounded by the task and not by the corpus.

Per-document steps (run in ``data.tasks`` tasks): :class:`ReadSources` (each task reads a byte range
of every JSONL source, or a contiguous row range of a Parquet / saved dataset), :class:`CleanStep`,
:class:`LangIdStep`, :class:`QualityStep`, :class:`ExactHashStep`, :class:`SignatureStep` (datatrove's
MinHash signatures with our word tokenizer), :class:`DedupFilterStep`, :class:`DecontamCountStep`,
:class:`DecontamMatchStep`, :class:`ScoreStep`, :class:`PlanStep` (held-out split and bucket) and
:class:`ShardStep` (one ``.bin/.idx`` per task and (source, language, bucket)). :class:`DocWriter` and
:class:`DocReader` keep a task's documents between executor stages.

Whole-corpus steps (one task each; :mod:`moe_adapt.data.pipeline` chains them with ``depends=``):
:class:`DuplicatesStep` (exact-duplicate hashes merged across tasks, MinHash pairs clustered),
:class:`CommonNgramsStep` (the decontamination's document frequencies), :class:`QuantilesStep`
(held-out caps, z-scores and per-language quantiles over the whole corpus) and :class:`MergeShardsStep`
(the tasks' shards concatenated into one shard per (source, language, bucket), manifest merged).

Every document carries ``metadata["ordinal"]``: its source's position in ``data.sources`` times 2**48
plus its byte offset (JSONL) or row (Parquet) in the source, so the corpus order is the order of the
ordinals whatever the number of tasks. Every choice that depends on order (which duplicate is kept,
which documents are held out under the cap, ties between difficulty scores) follows it, so the output
is the same bytes for any number of tasks and workers.

Each step writes its counts (documents and characters in/out per language, drop reasons, its own
seconds) to ``<root>/stats/<step>/<rank>.json`` at the end of its task; datatrove's own stats
(``total``, ``forwarded``, ``dropped``, reasons) go to the executor's logging folder.
"""

from moe_adapt.data.dtsteps.base import SOURCE_SHIFT, DocReader, DocStep, DocWriter, write_stats
from moe_adapt.data.dtsteps.decontam import (
    CommonNgramsStep,
    DecontamCountStep,
    DecontamMatchStep,
    benchmark_index,
)
from moe_adapt.data.dtsteps.dedup import DedupFilterStep, DuplicatesStep, ExactHashStep, SignatureStep
from moe_adapt.data.dtsteps.filters import CleanStep, LangIdStep, QualityStep
from moe_adapt.data.dtsteps.plan import MergeShardsStep, QuantilesStep, ScoreStep, ShardStep
from moe_adapt.data.dtsteps.read import ReadSources, source_ranges

__all__ = [
    "SOURCE_SHIFT",
    "CleanStep",
    "CommonNgramsStep",
    "DecontamCountStep",
    "DecontamMatchStep",
    "DedupFilterStep",
    "DocReader",
    "DocStep",
    "DocWriter",
    "DuplicatesStep",
    "ExactHashStep",
    "LangIdStep",
    "MergeShardsStep",
    "QualityStep",
    "QuantilesStep",
    "ReadSources",
    "ScoreStep",
    "ShardStep",
    "SignatureStep",
    "benchmark_index",
    "source_ranges",
    "write_stats",
]
