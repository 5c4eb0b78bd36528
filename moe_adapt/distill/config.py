"""Schemas of the ``distill`` and ``teacher`` config groups.

``distill.phases`` is a list, so the Arabic-DeepSeek-R1 recipe ``[generate, verify, seq_kd, token_kd]``
and the browser-LLM report's ``[sft, seq_kd, token_kd, select_kd]`` are configurations of one stage.
Training phases share :class:`TrainPhaseConfig`; each starts from the previous training phase's model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NoReturn

from moe_adapt.distill.backends import BACKENDS, ServerConfig, VLLMConfig
from moe_adapt.distill.format import ResponseFormat
from moe_adapt.distill.verify import VerifyConfig
from moe_adapt.engines.lora import LoRAConfig
from moe_adapt.errors import invalid

PHASES: dict[str, str] = {
    "generate": "the teacher writes chain-of-thought responses to distill.prompts",
    "verify": "keep the generated traces that pass every distill.verify check",
    "sft": "fine-tune on the prompts' reference responses (response tokens only)",
    "seq_kd": "fine-tune on the verified teacher traces (sequence-level KD)",
    "token_kd": "α·CE + (1−α)·T²·KL to the teacher on the verified traces (distill.select.theta masks it)",
    "select_kd": "token KD with SelecTKD's confidence mask (θ = distill.select.theta, default 0.7)",
}
"""Every phase the distill stage knows, and what it does."""

TRAINING_PHASES = ("sft", "seq_kd", "token_kd", "select_kd")
SELECT_KD_DEFAULT_THETA = 0.7
"""SelecTKD's threshold when the select_kd phase runs and distill.select.theta is null."""


def _fail(key: str, value: object, allowed: str) -> NoReturn:
    invalid(key, value, allowed)


@dataclass
class GenerateConfig:
    """The generate phase: how the teacher samples its responses."""

    samples: int = 2
    """Responses per prompt."""

    temperature: float = 0.7
    """Sampling temperature (0: greedy, then samples must be 1)."""

    top_p: float = 0.95
    """Nucleus sampling mass (1: off)."""

    top_k: int = 0
    """Sample among the top_k tokens only (0: off)."""

    max_new_tokens: int = 256
    """Longest response in tokens; longer ones are cut (and usually fail the format check)."""

    batch_size: int = 16
    """Prompts per generate() call."""

    shard_size: int = 128
    """Prompts per output shard; a finished shard survives a crash and is not generated again."""

    store_topk: int = 8
    """Keep the teacher's top-k log-probabilities of every response token for offline token KD
    (0: off; then token KD needs distill.<phase>.teacher=online)."""

    backend: str = "hf"
    """Who runs the teacher: hf (distill.teacher in this process), server (an OpenAI-compatible
    endpoint, distill.generate.server) or vllm (distill.teacher with vLLM's offline engine in this
    process, distill.generate.vllm); see moe_adapt/distill/backends.py."""

    server: ServerConfig = field(default_factory=ServerConfig)
    """The server backend's endpoint, client and tokenizer settings (unused by the other backends)."""

    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    """The vllm backend's engine settings (unused by the other backends)."""

    def __post_init__(self) -> None:
        key = "distill.generate"
        if self.backend not in BACKENDS:
            _fail(f"{key}.backend", self.backend, f"choose one of {', '.join(BACKENDS)}")
        if self.backend == "server":
            self.server.validate(f"{key}.server")
        if self.backend == "vllm":
            self.vllm.validate(f"{key}.vllm")
        for name in ("samples", "max_new_tokens", "batch_size", "shard_size"):
            if getattr(self, name) < 1:
                _fail(f"{key}.{name}", getattr(self, name), "must be >= 1")
        if self.temperature < 0:
            _fail(f"{key}.temperature", self.temperature, "must be >= 0 (0: greedy)")
        if self.temperature == 0 and self.samples > 1:
            _fail(f"{key}.samples", self.samples, "must be 1 with greedy decoding (temperature=0)")
        if not 0 < self.top_p <= 1:
            _fail(f"{key}.top_p", self.top_p, "must be in (0, 1]")
        if self.top_k < 0 or self.store_topk < 0:
            _fail(f"{key}.top_k/store_topk", (self.top_k, self.store_topk), "must be >= 0")


@dataclass
class TrainPhaseConfig:
    """One training phase (sft, seq_kd, token_kd, select_kd): loop, optimizer and KD settings."""

    steps: int = 100
    """Optimizer steps."""

    batch_size: int = 8
    """Packed rows per step."""

    seq_len: int = 512
    """Tokens per packed row; prompt + response examples are packed without attending to each other.
    At most the student's max_position_embeddings (and an online teacher's), checked when the stage
    starts."""

    lr: float = 1e-4
    """Peak learning rate (the engine group's schedule shape, warmup then cosine to the end)."""

    warmup_steps: int = 10
    """Linear warmup steps."""

    alpha: float = 0.5
    """Token KD: weight of the cross-entropy on the trace's tokens; 1 − alpha weighs T²·KL."""

    temperature: float = 2.0
    """Token KD: softening temperature T."""

    kl: str = "forward"
    """Token KD: forward = KL(teacher ‖ student), reverse = KL(student ‖ teacher)."""

    teacher: str = "topk"
    """Token KD: online (run distill.teacher beside the student) or topk (the generate phase's stored
    top-k log-probabilities; the teacher is not loaded)."""

    checkpoint_every: int = 50
    """Steps between checkpoints (a crashed phase resumes from the latest)."""

    l2_anchor_coef: float = 0.0
    """Weight of Σ||θ − θ0||² to the weights the phase starts from (0: off). A distill phase takes its
    anchors from here, not from engine.l2_anchor_coef / engine.kl_anchor_coef (those are cpt's)."""

    kl_anchor_coef: float = 0.0
    """Weight of KL(p_start ‖ p) to the next-token distribution of the model the phase starts from, on
    every batch (the task's and the replayed general text's; 0: off). Loads a frozen copy of it."""

    lora: LoRAConfig = field(default_factory=LoRAConfig)
    """LoRA / QLoRA on the student (moe_adapt/engines/lora.py; rank 0: off, every weight trains). The
    adapters are saved beside the phase's model (``<phase>/adapter``), the model merged into them."""

    def validate(self, key: str) -> None:
        self.lora.validate(f"{key}.lora")
        for name in ("steps", "batch_size", "seq_len", "checkpoint_every"):
            if getattr(self, name) < 1:
                _fail(f"{key}.{name}", getattr(self, name), "must be >= 1")
        for name in ("l2_anchor_coef", "kl_anchor_coef"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                _fail(f"{key}.{name}", value, "must be a finite number >= 0 (0: off)")
        if self.warmup_steps < 0 or self.warmup_steps >= self.steps:
            _fail(f"{key}.warmup_steps", self.warmup_steps, f"must be in [0, steps={self.steps})")
        if not self.lr > 0:
            _fail(f"{key}.lr", self.lr, "must be > 0")
        if not 0 <= self.alpha <= 1:
            _fail(f"{key}.alpha", self.alpha, "must be in [0, 1]")
        if not self.temperature > 0:
            _fail(f"{key}.temperature", self.temperature, "must be > 0")
        if self.kl not in ("forward", "reverse"):
            _fail(f"{key}.kl", self.kl, "choose forward or reverse")
        if self.teacher not in ("online", "topk"):
            _fail(f"{key}.teacher", self.teacher, "choose online or topk")


@dataclass
class SelectConfig:
    """SelecTKD: distil only where the teacher is confident."""

    theta: float | None = None
    """Count the token-KD KL term only where the teacher's max softmax(z/T) > theta (the paper uses
    0.7); null: every token (plain token KD). The select_kd phase uses 0.7 when this is null."""

    def __post_init__(self) -> None:
        if self.theta is not None and not 0 <= self.theta < 1:
            _fail("distill.select.theta", self.theta, "must be in [0, 1), or null for plain token KD")


@dataclass
class DistillEvalConfig:
    """Held-out accuracy of the teacher and the student (greedy decoding, answer check)."""

    max_prompts: int = 200
    """Held-out prompts per language (a fixed subset of distill.eval_prompts)."""

    max_new_tokens: int = 256
    """Longest answer in tokens."""

    batch_size: int = 32
    """Prompts per generate() call."""

    after_each_phase: bool = True
    """Evaluate after every training phase (false: before the first and after the last only)."""

    teacher: bool = True
    """Evaluate the teacher too (the ceiling the student distils towards)."""

    def __post_init__(self) -> None:
        for name in ("max_prompts", "max_new_tokens", "batch_size"):
            if getattr(self, name) < 1:
                _fail(f"distill.eval.{name}", getattr(self, name), "must be >= 1")


@dataclass
class DistillConfig:
    """The ``distill`` stage: chain-of-thought distillation from a teacher in configurable phases."""

    teacher: str | None = None
    """HF checkpoint folder of the teacher (generate, online token KD, teacher accuracy)."""

    student: str | None = None
    """HF checkpoint folder the first training phase starts from (the recipes set the cpt model)."""

    prompts: str | None = None
    """JSONL prompt set: one {id, lang, prompt, answer?, answer_type?, reference_response?} per line."""

    eval_prompts: str | None = None
    """JSONL held-out prompt set in the same format, for accuracy before and after (null: no eval)."""

    langs: list[str] = field(default_factory=lambda: ["ar", "en"])
    """Languages kept from the prompt sets (others are skipped, and counted)."""

    phases: list[str] = field(default_factory=lambda: ["generate", "verify", "seq_kd", "token_kd"])
    """Phases in order; see moe_adapt.distill.config.PHASES."""

    chat_template: str | None = None
    """Jinja chat template for tokenizers that have none (null: the tokenizer's own; error if absent)."""

    format: ResponseFormat = field(default_factory=ResponseFormat)
    """Delimiters between the reasoning and the final answer."""

    generate: GenerateConfig = field(default_factory=GenerateConfig)
    """The generate phase."""

    verify: VerifyConfig = field(default_factory=VerifyConfig)
    """The verify phase: which checks run and their thresholds (moe_adapt/distill/verify/)."""

    sft: TrainPhaseConfig = field(default_factory=TrainPhaseConfig)
    """The sft phase (reference responses)."""

    seq_kd: TrainPhaseConfig = field(default_factory=TrainPhaseConfig)
    """The seq_kd phase (verified teacher traces)."""

    token_kd: TrainPhaseConfig = field(default_factory=TrainPhaseConfig)
    """The token_kd phase (verified teacher traces, KL to the teacher)."""

    select_kd: TrainPhaseConfig = field(default_factory=TrainPhaseConfig)
    """The select_kd phase (token KD with the confidence mask)."""

    select: SelectConfig = field(default_factory=SelectConfig)
    """SelecTKD's confidence threshold."""

    eval: DistillEvalConfig = field(default_factory=DistillEvalConfig)
    """Held-out accuracy before and after distillation."""

    replay: float = 0.0
    """Share of every training phase's batches that are general text (replay against forgetting):
    whole batches of distill.shards drawn by the cpt stage's mixture sampler with the mixture group's
    sources and ratio (e.g. 80/20), trained on plain next-token loss and logged as replay/<term>. In
    [0, 1); 0: off. Which steps replay is a deterministic schedule (within one batch of the share)."""

    replay_rows: bool = False
    """With replay: true puts general-text rows inside every batch of the LM phases (sft, seq_kd), the
    replay share of its rows, so every step sees the task; the token-KD phases replay whole batches
    either way. False: whole batches."""

    replay_adds_steps: bool = False
    """With replay: true keeps every phase's task batches at its steps and adds the replay batches
    on top (a phase runs about steps / (1 - replay) steps, its schedule stretched with it); false:
    replay takes its share of the steps from the task."""

    shards: str | None = None
    """The data stage's training shards (manifest.json) that replay draws from (the recipes: cpt.shards)."""

    heldout: str | None = None
    """Held-out shards: the per-language held-out loss of the student and of every training phase's
    model at its end, in summary.json and report.md (null: not measured)."""

    heldout_docs: int = 32
    """Held-out documents per language (a fixed sample, as cpt.eval_docs)."""

    forgetting_bound: dict[str, float] = field(default_factory=dict)
    """The stated bound on forgetting: per language, the largest rise of held-out loss (nats per token)
    from the student to the last training phase's model, e.g. {ar: 0.3, en: 0.3}; summary.json says
    for each language whether it held, a breach is logged as a warning. Needs distill.heldout. {}: none."""

    def __post_init__(self) -> None:
        unknown = [p for p in self.phases if p not in PHASES]
        if unknown:
            _fail(
                "distill.phases",
                list(self.phases),
                f"unknown phase {unknown[0]!r}; phases are {', '.join(PHASES)}",
            )
        if not self.phases:
            _fail("distill.phases", [], f"list at least one of {', '.join(PHASES)}")
        if len(set(self.phases)) != len(self.phases):
            _fail("distill.phases", list(self.phases), "list each phase once")
        ordered = "verify" not in self.phases or "generate" not in self.phases
        if not ordered and self.phases.index("verify") < self.phases.index("generate"):
            _fail("distill.phases", list(self.phases), "verify must come after generate")
        if not self.langs:
            _fail("distill.langs", [], "list at least one language")
        for name in TRAINING_PHASES:
            getattr(self, name).validate(f"distill.{name}")
        if not (isinstance(self.replay, int | float) and 0 <= self.replay < 1):
            _fail("distill.replay", self.replay, "must be in [0, 1) (the share of batches that replay)")
        if self.heldout_docs < 1:
            _fail("distill.heldout_docs", self.heldout_docs, "must be >= 1")
        for lang, bound in self.forgetting_bound.items():
            if not lang or not math.isfinite(bound) or bound < 0:
                _fail(
                    "distill.forgetting_bound",
                    dict(self.forgetting_bound),
                    f"each entry is a language and the largest held-out loss rise allowed, a number >= 0 "
                    f"(got {lang}: {bound})",
                )
        if self.forgetting_bound and not self.heldout:
            _fail(
                "distill.forgetting_bound",
                dict(self.forgetting_bound),
                "a bound on forgetting is checked on the held-out loss: set distill.heldout too",
            )


@dataclass
class TeacherConfig:
    """The ``teacher`` stage (demo): build a bilingual reasoning task and train a small teacher on it."""

    task: str = "arith"
    """Built-in task (moe_adapt.distill.tasks.TASKS): arith = arithmetic word problems with worked steps."""

    langs: list[str] = field(default_factory=lambda: ["ar", "en"])
    """Languages the task is rendered in (the same problems in each)."""

    train_per_lang: int = 2000
    """Training problems per language (the teacher learns them; distill prompts the teacher with them)."""

    test_per_lang: int = 200
    """Held-out problems per language (never trained on)."""

    ops: list[str] = field(default_factory=lambda: ["add", "sub"])
    """Operations in the problems: add, sub, mul, two_step."""

    max_operand: int = 10
    """Largest number in a problem."""

    tokenizer: str | None = None
    """HF folder whose tokenizer the teacher uses (the student's, so token KD can compare them)."""

    hidden_size: int = 128
    """Teacher residual width."""

    intermediate_size: int = 512
    """Teacher FFN width."""

    num_layers: int = 4
    """Teacher decoder layers."""

    num_heads: int = 4
    """Teacher attention heads."""

    train: TrainPhaseConfig = field(default_factory=TrainPhaseConfig)
    """How the teacher is trained on the reference solutions (an sft phase)."""

    def __post_init__(self) -> None:
        for name in (
            "train_per_lang",
            "test_per_lang",
            "max_operand",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
        ):
            if getattr(self, name) < 1:
                _fail(f"teacher.{name}", getattr(self, name), "must be >= 1")
        if self.hidden_size % self.num_heads:
            _fail("teacher.num_heads", self.num_heads, f"must divide hidden_size={self.hidden_size}")
        self.train.validate("teacher.train")
