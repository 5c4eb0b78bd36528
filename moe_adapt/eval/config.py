"""Typed schemas of the ``eval`` and ``report`` config groups (``conf/eval/``, ``conf/report/``).

Hydra merges the YAML into these dataclasses, so an unknown key or a value of the wrong type fails
while the config is composed; ``__post_init__`` checks values that involve several fields and
raises :class:`~moe_adapt.errors.MoEAdaptConfigError` with one line naming the key, the value and
what is allowed. Every field carries a docstring: this file is the reference for every option.
Paths that default to the run directory (``${run_dir}/...``) are set in the YAML, not here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from moe_adapt.errors import invalid

__all__ = ["BenchmarkEntry", "EvalConfig", "ModelEntry", "ReportConfig"]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_DTYPES = ("auto", "float32", "bfloat16", "float16")


_fail = invalid


def _is_missing(value: object) -> bool:
    return value is None or value == "???" or value == ""


@dataclass
class ModelEntry:
    """One checkpoint to evaluate."""

    name: str = "???"
    """Short label used as the metric prefix (``<name>/loss_ar``) and folder name; letters, digits, _.-"""

    path: str = "???"
    """Local Hugging Face checkpoint directory (config.json + *.safetensors), dense or MoE."""


@dataclass
class BenchmarkEntry:
    """A multiple-choice benchmark: one JSONL file per language, items parallel across languages."""

    name: str = "???"
    """Label used in metric names (``<model>/<name>.acc_<lang>``); letters, digits, _.-"""

    files: dict[str, str] = field(default_factory=dict)
    """Language code -> JSONL file, one item a line: {id, source_key, question, choices, answer}.
    Malformed lines are skipped with a warning; a file with more than half of them bad is refused."""

    parallel_key: str = "source_key"
    """Item field that pairs the versions of one question across languages (bilingual metrics)."""

    source_lang: str = "en"
    """Language the others are compared with for LPG and CLCS (must be one of ``files``)."""

    target_delimiter: str = " "
    """String put between the question and each choice before scoring (lm-eval's default is a space)."""


@dataclass
class EvalConfig:
    """The ``eval`` stage: held-out loss, benchmark accuracy, bilingual metrics, routing, harness."""

    models: list[ModelEntry] = field(default_factory=list)
    """Checkpoints to evaluate, each {name, path}. Empty (the default): the eval stage takes model.dense
    (as ``dense``) and the newest model of the run directory: distill/model (``distill``), else cpt/model
    (``cpt``), else upcycle/model (``moe``)."""

    heldout: str | None = None
    """Folder of held-out shards with manifest.json (the data stage's ``data/heldout``); null skips
    held-out loss/perplexity and routing analysis."""

    languages: list[str] = field(default_factory=list)
    """Languages of the held-out shards to evaluate; empty = every language in the manifest."""

    max_docs_per_language: int | None = 200
    """Held-out documents per language (a seeded sample); null = all of them."""

    window: int | None = 512
    """Tokens per perplexity window; null = the model's max_position_embeddings."""

    stride: int | None = 256
    """Step between window starts (1..window); smaller than window gives every token context;
    null = window (disjoint chunks)."""

    batch_size: int = 8
    """Sequences per forward pass (held-out windows, benchmark choices, routing, harness)."""

    device: str = "auto"
    """Torch device to evaluate on: auto (cuda if available, else cpu), cpu, cuda, cuda:1, ..."""

    dtype: str = "float32"
    """Weights dtype while evaluating: auto (the checkpoint's), float32, bfloat16 or float16."""

    tokenizer: str | None = None
    """Tokenizer for benchmark text (a tokenizer.json or a folder holding one); null = the
    checkpoint's own tokenizer, else the held-out manifest's."""

    benchmarks: list[BenchmarkEntry] = field(default_factory=list)
    """Multiple-choice benchmarks scored by log-likelihood of each choice given the question."""

    benchmark_max_items: int | None = None
    """Items scored per benchmark and language (null = all): the first N of the ``source_lang`` file,
    and in every other language the items parallel to those (same ``parallel_key``), else its first N.
    For quick checks; the harness has its own cap, harness_limit."""

    ece_bins: int = 10
    """Equal-width confidence bins of the expected calibration error."""

    routing: bool = True
    """Analyse expert routing of MoE checkpoints per language on held-out tokens (JSON + heatmaps)."""

    routing_max_tokens: int = 512
    """Longest document (in tokens) fed to the routing analysis; longer ones are cut."""

    specialization_threshold: float = 0.7
    """An expert is language-specialised when one language's normalised share of it is >= this."""

    harness_tasks: list[str] = field(default_factory=list)
    """lm-evaluation-harness task names to run in-process, e.g. [hadith_qa_ar, hadith_qa_en];
    empty = no harness run. Shipped tasks live in moe_adapt/eval/tasks/."""

    harness_include: list[str] = field(default_factory=list)
    """Extra folders of lm-eval task YAMLs (your local ArabicMMLU, AraDiCE, ... configs)."""

    harness_data_dir: str | None = None
    """Folder holding hadith_qa_{ar,en}.jsonl for the shipped tasks; null = $MOE_ADAPT_BENCHMARKS."""

    harness_defaults: bool = False
    """Also index lm-eval's built-in tasks (slower start; their datasets must already be cached)."""

    harness_num_fewshot: int = 0
    """Few-shot examples per harness prompt."""

    harness_limit: int | None = None
    """Items per harness task (null = all); for quick checks only."""

    bootstrap_resamples: int = 1000
    """Bootstrap resamples for the per-item confidence intervals of benchmark accuracy."""

    confidence: float = 0.95
    """Coverage of the confidence intervals."""

    contamination: str | None = None
    """The data stage's contamination.json; its summary goes into report.md when the file exists."""

    def __post_init__(self) -> None:
        names: set[str] = set()
        for i, m in enumerate(self.models):
            if _is_missing(m.name) or not _NAME_RE.match(str(m.name)):
                _fail(f"eval.models[{i}].name", m.name, "use letters, digits, '_', '.', '-' (e.g. moe)")
            if m.name in names:
                _fail(f"eval.models[{i}].name", m.name, "model names must be unique")
            names.add(m.name)
            if _is_missing(m.path):
                _fail(f"eval.models[{i}].path", m.path, "give a local checkpoint directory")
        bench_names: set[str] = set()
        for i, b in enumerate(self.benchmarks):
            key = f"eval.benchmarks[{i}]"
            if _is_missing(b.name) or not _NAME_RE.match(str(b.name)) or b.name in bench_names:
                _fail(f"{key}.name", b.name, "a unique name of letters, digits, '_', '.', '-'")
            bench_names.add(b.name)
            if not b.files:
                _fail(f"{key}.files", dict(b.files), "give at least one {lang: path/to/items.jsonl}")
            if len(b.files) > 1 and b.source_lang not in b.files:
                _fail(f"{key}.source_lang", b.source_lang, f"must be one of its languages {sorted(b.files)}")
        if self.max_docs_per_language is not None and self.max_docs_per_language < 1:
            _fail("eval.max_docs_per_language", self.max_docs_per_language, "must be >= 1 or null")
        if self.window is not None and self.window < 2:
            _fail("eval.window", self.window, "must be >= 2 (one context token, one target) or null")
        if self.stride is not None:
            if self.stride < 1:
                _fail("eval.stride", self.stride, "must be >= 1 or null")
            if self.window is not None and self.stride > self.window:
                _fail("eval.stride", self.stride, f"must be <= eval.window={self.window}")
        for name in ("batch_size", "ece_bins", "routing_max_tokens", "bootstrap_resamples"):
            if getattr(self, name) < 1:
                _fail(f"eval.{name}", getattr(self, name), "must be >= 1")
        if self.dtype not in _DTYPES:
            _fail("eval.dtype", self.dtype, f"choose one of {', '.join(_DTYPES)}")
        if not re.match(r"^(auto|cpu|cuda(:\d+)?|mps)$", self.device):
            _fail("eval.device", self.device, "choose auto, cpu, cuda, cuda:N or mps")
        if not 0.5 < self.specialization_threshold <= 1:
            _fail("eval.specialization_threshold", self.specialization_threshold, "must be in (0.5, 1]")
        if not 0 < self.confidence < 1:
            _fail("eval.confidence", self.confidence, "must be in (0, 1), e.g. 0.95")
        if self.harness_num_fewshot < 0:
            _fail("eval.harness_num_fewshot", self.harness_num_fewshot, "must be >= 0")
        if self.benchmark_max_items is not None and self.benchmark_max_items < 1:
            _fail("eval.benchmark_max_items", self.benchmark_max_items, "must be >= 1 or null")
        if self.harness_limit is not None and self.harness_limit < 1:
            _fail("eval.harness_limit", self.harness_limit, "must be >= 1 or null")


@dataclass
class ReportConfig:
    """The ``report`` stage: one Markdown report with CIs over a Hydra multirun sweep (t-intervals over
    seeds; a percentile bootstrap from 30 seeds on: :func:`moe_adapt.eval.stats.seed_interval`)."""

    sweep_dir: str | None = None
    """The multirun folder (holding 0/, 1/, ... each with .hydra/); required when the stage runs."""

    metrics_path: str = "eval/metrics.json"
    """Flat metrics JSON inside each job folder (what the eval stage writes)."""

    metrics: list[str] = field(default_factory=list)
    """Metric names to report, e.g. [moe/loss_ar, moe/hadith_qa.acc_ar]; empty = every metric."""

    seed_key: str = "seed"
    """The override that names the seed: runs are grouped over it and paired on it."""

    contamination: str | None = None
    """A contamination.json to include as a table (must exist when set); null = none."""

    n_resamples: int = 10000
    """Bootstrap resamples, for the intervals over 30 or more seeds (fewer: a t-interval, no resampling)."""

    confidence: float = 0.95
    """Coverage of the intervals."""

    def __post_init__(self) -> None:
        if self.n_resamples < 1:
            _fail("report.n_resamples", self.n_resamples, "must be >= 1")
        if not 0 < self.confidence < 1:
            _fail("report.confidence", self.confidence, "must be in (0, 1), e.g. 0.95")
        if _is_missing(self.metrics_path) or self.metrics_path.startswith("/"):
            _fail("report.metrics_path", self.metrics_path, "a path relative to each job folder")
        if _is_missing(self.seed_key):
            _fail("report.seed_key", self.seed_key, "name the seed override, e.g. seed")
