"""The root schema: :class:`Config` (which stages run, where, and every group's settings), the
``model`` group (:class:`ModelConfig`), :data:`STAGE_ORDER` and the checks that involve several groups.

Each group's own schema lives beside its code, in ``<package>/config.py`` (``data``, ``upcycle``,
``cpt``/``mixture``/``curriculum``, ``distill``/``teacher``, ``eval``/``report``, ``logger``,
``init_dense`` in ``demo``; the ``engine`` group in :mod:`moe_adapt.engines.hf`). Hydra merges the
YAML under ``conf/`` (and a recipe, and the command line) into these dataclasses, so an unknown key
or a value of the wrong type fails while the config is composed. ``__post_init__`` runs the checks
that involve several fields; it is called when the composed config is turned into objects
(:func:`moe_adapt.config.to_config`), before any stage runs.

Every field carries a docstring: with the group schemas it names, this file is the reference for
every option.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moe_adapt.cpt.config import CptConfig, CurriculumConfig, MixtureConfig
from moe_adapt.data.config import DataConfig
from moe_adapt.demo.config import InitDenseConfig
from moe_adapt.distill.config import DistillConfig, TeacherConfig
from moe_adapt.engines.base import EngineConfig
from moe_adapt.errors import MoEAdaptConfigError, check_path_component, invalid
from moe_adapt.eval.config import EvalConfig, ReportConfig
from moe_adapt.export.config import ExportConfig
from moe_adapt.train.config import LoggerConfig
from moe_adapt.upcycle.config import UpcycleConfig

_fail = invalid


@dataclass
class ModelConfig:
    """The dense model the pipeline starts from."""

    dense: str | None = None
    """Path to a local Hugging Face dense checkpoint directory (config.json + *.safetensors), or a
    ``.gguf`` file that the runner imports into ``<run_dir>/import/<stem>/`` first (docs/upcycle.md).
    Required by the upcycle stage (so it is checked when that stage is selected, not always)."""

    trust_remote_code: bool = False
    """Allow custom modelling code shipped with a checkpoint. Off: it runs code from the checkpoint."""


STAGE_ORDER: tuple[str, ...] = (
    "init_dense",
    "data",
    "upcycle",
    "cpt",
    "teacher",
    "distill",
    "eval",
    "export",
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
    """Name of the run directory under runs/; re-running the same name resumes and skips done stages.
    A single folder name: not empty, not '.' or '..', without '/', '\\' or NUL."""

    run_dir: str = "${hydra:runtime.output_dir}"
    """Where every stage writes its artifacts. Defaults to Hydra's run dir (runs/<run_name>, or a sweep's
    job folder); when set, Hydra's run dir (.hydra/, the log) follows it (conf/config.yaml)."""

    seed: int = 0
    """Seed for everything random (router init, drop re-initialisation, probes, demo model); in
    [0, 2**32) (numpy's seeds are non-negative)."""

    deterministic: bool = True
    """Deterministic kernels (``torch.use_deterministic_algorithms``; megatron-core's
    ``deterministic_mode``): the same config, seed, thread count and machine give bit-identical metrics
    and weights, across processes and across a kill and resume. Without it, multi-threaded CPU kernels
    (the MoE's token scatter and gather backward) sum in a different order on each run. Measured cost
    on the CPU demo's cpt stage: docs/config.md. An op with no deterministic kernel warns, naming
    itself, rather than failing the run. Not part of any stage's fingerprint."""

    model: ModelConfig = field(default_factory=ModelConfig)
    """The dense model."""

    init_dense: InitDenseConfig = field(default_factory=InitDenseConfig)
    """Settings of the init_dense stage (demo and tests only)."""

    data: DataConfig = field(default_factory=DataConfig)
    """Settings of the data stage (moe_adapt/data/config.py)."""

    upcycle: UpcycleConfig = field(default_factory=UpcycleConfig)
    """Settings of the upcycle stage."""

    cpt: CptConfig = field(default_factory=CptConfig)
    """Settings of the cpt stage: the training loop (moe_adapt/cpt/config.py)."""

    mixture: MixtureConfig = field(default_factory=MixtureConfig)
    """The training data mixture, e.g. 80% target language / 20% English (moe_adapt/cpt/config.py)."""

    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    """Difficulty phases of the training stream (moe_adapt/cpt/config.py)."""

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

    export: ExportConfig = field(default_factory=ExportConfig)
    """Settings of the export stage: pruned / GGUF artefacts and their retention
    (moe_adapt/export/config.py)."""

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
        if "report" in self.stages and not self.report.sweep_dir:
            raise MoEAdaptConfigError(
                "report.sweep_dir is required by stage report: "
                "set report.sweep_dir=runs/<name>-multirun/<time>"
            )
        phase_weights = self.mixture.phase_weights
        if phase_weights is not None and len(phase_weights) != self.curriculum.num_phases:
            _fail(
                "mixture.phase_weights",
                [dict(p) for p in phase_weights],
                f"give one entry per curriculum phase: the curriculum has {self.curriculum.num_phases} "
                f"(curriculum.phase_steps/phase_tokens list {self.curriculum.num_phases - 1} lengths, "
                "and the last phase runs to the end)",
            )
        check_path_component("run_name", self.run_name)
        if not 0 <= self.seed < 2**32:
            _fail("seed", self.seed, "must be in [0, 2**32)")
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
