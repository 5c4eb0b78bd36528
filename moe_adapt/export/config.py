"""Schema of the ``export`` config group (``conf/export/default.yaml``): which artefacts the export
stage makes from a checkpoint, and how their retention is measured.

Every field carries a docstring: this file is the reference for every option. ``__post_init__``
refuses an unknown method or a bad value with one line naming the key, the value and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moe_adapt.errors import invalid

__all__ = [
    "GGUF_TYPES",
    "GPTQ_SCHEMES",
    "METHODS",
    "ONNX_TYPES",
    "PLANNED",
    "SPARSE_PATTERNS",
    "CalibrationConfig",
    "ExpertPruneConfig",
    "ExportConfig",
    "GGUFConfig",
    "GPTQConfig",
    "ONNXConfig",
    "SparseConfig",
    "SpeedConfig",
    "WebConfig",
]

METHODS = ("expert_prune", "gguf", "gptq", "int8", "nf4", "onnx", "sparsegpt", "wanda")
"""The export methods, each writing its own folder ``<stage>/<method>/``."""

PLANNED: tuple[str, ...] = ()
"""Methods of issue 17 not built yet (none left): named in the error so nobody thinks they were skipped."""

CALIBRATED = ("gptq", "sparsegpt", "wanda")
"""Methods that calibrate on ``export.calibration`` and write compressed-tensors checkpoints."""

GPTQ_SCHEMES = ("W4A16", "W8A16", "W8A8")
"""GPTQ schemes (symmetric int weights; W8A8 adds per-token dynamic int8 activations)."""

SPARSE_PATTERNS = ("unstructured", "2:4")
"""Sparsity patterns of sparsegpt and wanda: 50% of each row, or 2 of every 4 consecutive inputs."""

GGUF_TYPES = ("f32", "f16", "q8_0", "q4_0")
"""GGUF weight types written (one file each); the quantized ones by ``gguf.quants``' numpy reference."""

ONNX_TYPES = ("fp32", "int4")
"""ONNX graphs written (one folder each): fp32, and int4 weight-only (onnxruntime's MatMulNBits)."""

_fail = invalid


@dataclass
class ExpertPruneConfig:
    """``expert_prune``: drop the routed experts the target languages' routing uses least."""

    drop_per_layer: int = 1
    """Routed experts dropped in every MoE layer (HF MoE configs hold one expert count for all layers,
    so every layer loses the same number; which ones is chosen per layer). 0 copies the model."""

    languages: list[str] = field(default_factory=list)
    """Target languages whose routing decides what is used; each counts equally (its per-layer
    distribution of top-k assignments). Empty = every language of the routing counts."""

    routing: str | None = None
    """A ``routing.json`` of the eval stage (``eval/routing/<model>/routing.json``) for the model being
    pruned; null = the eval stage's one of the same model when it exists in the run, else routing is
    counted here on the held-out documents (``export.heldout``)."""

    routing_max_tokens: int = 512
    """Longest held-out document (tokens) fed to the routing count when it is computed here."""

    def __post_init__(self) -> None:
        if self.drop_per_layer < 0:
            _fail("export.expert_prune.drop_per_layer", self.drop_per_layer, "must be >= 0")
        if self.routing_max_tokens < 2:
            _fail("export.expert_prune.routing_max_tokens", self.routing_max_tokens, "must be >= 2")


@dataclass
class CalibrationConfig:
    """Calibration text of ``gptq``, ``sparsegpt`` and ``wanda`` (:mod:`moe_adapt.export.calibrate`)."""

    data: str | None = None
    """Shards + manifest.json to calibrate on (the data stage's training ``data/shards``); null =
    ``export.heldout`` (then the retention is measured on the text that calibrated: said in the report)."""

    mix: dict[str, float] = field(default_factory=dict)
    """Share of the calibration windows per language, e.g. {ar: 0.8, en: 0.2} (normalised); empty =
    every language of the manifest equally."""

    samples: int = 128
    """Calibration windows (sequences) in all."""

    seq_len: int = 512
    """Tokens per calibration window (capped at the model's max_position_embeddings)."""

    min_expert_tokens: int = 16
    """A routed expert that the router sent fewer calibration tokens is calibrated on all the layer's
    calibration tokens instead (computed beside the forward; the layer's output is unchanged), so no
    expert is compressed from (almost) no samples. Listed per layer in the report."""

    batch_size: int = 8
    """Windows per forward pass while calibrating."""

    def __post_init__(self) -> None:
        bad = {k: v for k, v in self.mix.items() if not float(v) >= 0}
        if bad or (self.mix and sum(float(v) for v in self.mix.values()) <= 0):
            _fail("export.calibration.mix", dict(self.mix), "shares must be >= 0 and sum to more than 0")
        if self.samples < 1:
            _fail("export.calibration.samples", self.samples, "must be >= 1")
        if self.seq_len < 2:
            _fail("export.calibration.seq_len", self.seq_len, "must be >= 2")
        if self.min_expert_tokens < 0:
            _fail("export.calibration.min_expert_tokens", self.min_expert_tokens, "must be >= 0")
        if self.batch_size < 1:
            _fail("export.calibration.batch_size", self.batch_size, "must be >= 1")


@dataclass
class GPTQConfig:
    """``gptq``: second-order weight quantization (:mod:`moe_adapt.export.gptq`), one artefact per scheme."""

    schemes: list[str] = field(default_factory=lambda: ["W8A16", "W4A16"])
    """Schemes, one folder ``gptq/<scheme>/model`` each: W4A16, W8A16 (group-wise int4/int8 weights),
    W8A8 (per-row int8 weights + per-token dynamic int8 activations at run time)."""

    group_size: int = 128
    """Input columns per scale in W4A16/W8A16: must divide every quantized matrix's input width
    (compressed-tensors and vLLM hold one group size per model)."""

    act_order: bool = False
    """Quantize columns in decreasing Hessian diagonal (scales fixed beforehand: plain group layout)."""

    damp: float = 0.01
    """Dampening added to the Hessian's diagonal, as a share of its mean."""

    block: int = 128
    """Columns per lazy-update block (speed only)."""

    def __post_init__(self) -> None:
        bad = [s for s in self.schemes if s not in GPTQ_SCHEMES]
        if bad or not self.schemes or len(set(self.schemes)) != len(self.schemes):
            _fail(
                "export.gptq.schemes",
                list(self.schemes),
                f"one or more of {', '.join(GPTQ_SCHEMES)}, once each",
            )
        if self.group_size < 1:
            _fail("export.gptq.group_size", self.group_size, "must be >= 1")
        if not 0 < self.damp < 1:
            _fail("export.gptq.damp", self.damp, "must be in (0, 1)")
        if self.block < 1:
            _fail("export.gptq.block", self.block, "must be >= 1")


@dataclass
class SparseConfig:
    """``sparsegpt`` / ``wanda``: 50% pruning, one artefact per pattern."""

    patterns: list[str] = field(default_factory=lambda: ["unstructured", "2:4"])
    """Patterns, one folder ``<method>/<pattern>/model`` each (``2:4`` is written ``2of4``):
    unstructured (50% of each row), 2:4 (2 of every 4 consecutive inputs; widths must divide by 4)."""

    damp: float = 0.01
    """sparsegpt: dampening added to the Hessian's diagonal, as a share of its mean (wanda: unused)."""

    block: int = 128
    """sparsegpt: columns per mask-selection block (wanda: unused)."""

    def __post_init__(self) -> None:
        bad = [p for p in self.patterns if p not in SPARSE_PATTERNS]
        if bad or not self.patterns or len(set(self.patterns)) != len(self.patterns):
            _fail(
                "export.<sparsegpt|wanda>.patterns",
                list(self.patterns),
                f"one or more of {', '.join(SPARSE_PATTERNS)}",
            )
        if not 0 < self.damp < 1:
            _fail("export.sparsegpt.damp", self.damp, "must be in (0, 1)")
        if self.block < 4:
            _fail("export.sparsegpt.block", self.block, "must be >= 4")


@dataclass
class GGUFConfig:
    """``gguf``: llama.cpp files written with the ``gguf`` package's ``GGUFWriter``."""

    types: list[str] = field(default_factory=lambda: ["f16", "q8_0", "q4_0"])
    """Weight types, one file ``model-<type>.gguf`` each: f32, f16, q8_0, q4_0. Norms, biases and the
    router stay f32 (as llama.cpp's converter keeps them); a matrix whose rows are not a multiple of
    32 wide falls back to f16 in a quantized file (counted in the report)."""

    pre_tokenizer: str = "auto"
    """llama.cpp's name of the tokenizer's pre-tokenizer (``tokenizer.ggml.pre``): auto = ``gpt-2``
    for a plain byte-level BPE (the demo's), ``qwen2`` for Qwen models, ``llama-bpe`` for Llama 3;
    anything else must be named here."""

    from_pruned: bool = False
    """Convert expert_prune's checkpoint instead of the source (needs expert_prune in
    export.methods): the pruned and quantized model llama.cpp would serve."""

    def __post_init__(self) -> None:
        bad = [t for t in self.types if t not in GGUF_TYPES]
        if bad or not self.types:
            _fail("export.gguf.types", list(self.types), f"pick one or more of {', '.join(GGUF_TYPES)}")


@dataclass
class ONNXConfig:
    """``onnx``: the model as an ONNX graph (``torch.onnx.export``, dynamo) for onnxruntime."""

    types: list[str] = field(default_factory=lambda: ["fp32", "int4"])
    """Graphs, one folder ``onnx/<type>/`` each: fp32; int4 = 2-D MatMul weights (attention,
    lm_head, dense and shared-expert MLPs) in symmetric 4-bit blocks (MatMulNBits), routed experts
    as set by ``experts``."""

    block_size: int = 32
    """Weights per int4 block (one scale each): 16, 32, 64, 128 or 256."""

    experts: bool = True
    """In the int4 graph, also store the routed experts (3-D weights MatMulNBits does not take) as
    int4 blocks behind a ``DequantizeLinear`` (opset 21): 4-bit on disk, dequantized to float32 at
    run time. false = experts stay float32."""

    def __post_init__(self) -> None:
        bad = [t for t in self.types if t not in ONNX_TYPES]
        if bad or not self.types:
            _fail("export.onnx.types", list(self.types), f"pick one or more of {', '.join(ONNX_TYPES)}")
        if self.block_size not in (16, 32, 64, 128, 256):
            _fail("export.onnx.block_size", self.block_size, "one of 16, 32, 64, 128, 256")


@dataclass
class WebConfig:
    """The browser page (``moe_adapt/export/web``) that ``export.serve=true`` serves."""

    gguf_type: str = "q8_0"
    """Which of the gguf method's files the page loads (``gguf/model-<type>.gguf``); must be one of
    ``export.gguf.types``."""

    host: str = "127.0.0.1"
    """Address the server binds: 127.0.0.1 = this machine only."""

    port: int = 8000
    """Port of the page (0 = any free one, printed)."""

    def __post_init__(self) -> None:
        if self.gguf_type not in GGUF_TYPES:
            _fail("export.web.gguf_type", self.gguf_type, f"one of {', '.join(GGUF_TYPES)}")
        if not 0 <= self.port <= 65535:
            _fail("export.web.port", self.port, "must be in [0, 65535]")


@dataclass
class SpeedConfig:
    """CPU tokens/s per artefact in the retention report (:mod:`moe_adapt.export.speed`)."""

    enabled: bool = True
    """Measure greedy decoding speed of the source and every artefact in its runtime (transformers,
    llama.cpp, onnxruntime); false = no tokens/s column and no time spent on it."""

    new_tokens: int = 32
    """Tokens generated per run (EOS ignored: every run makes exactly this many)."""

    threads: int = 1
    """CPU threads of every runtime (torch, llama.cpp, onnxruntime), the same for all rows."""

    repeats: int = 3
    """Timed runs per artefact and language after one warm-up run; the median is reported."""

    prompts: dict[str, str] = field(default_factory=lambda: {"ar": "قال رسول الله", "en": "The Prophet said"})
    """The fixed prompt per language (the browser page's), tokenized once by the source's tokenizer."""

    def __post_init__(self) -> None:
        if self.new_tokens < 1:
            _fail("export.speed.new_tokens", self.new_tokens, "must be >= 1")
        if self.threads < 1:
            _fail("export.speed.threads", self.threads, "must be >= 1")
        if self.repeats < 1:
            _fail("export.speed.repeats", self.repeats, "must be >= 1")
        if self.enabled and (not self.prompts or not all(str(v).strip() for v in self.prompts.values())):
            _fail("export.speed.prompts", dict(self.prompts), "one non-empty prompt per language")


@dataclass
class ExportConfig:
    """The ``export`` stage: compressed or converted artefacts of one checkpoint, and what each keeps."""

    model: str | None = None
    """The HF checkpoint folder to export; null = the newest model of the run directory:
    distill/model, else cpt/model, else upcycle/model."""

    methods: list[str] = field(default_factory=lambda: ["expert_prune", "gguf"])
    """Export methods, each into its own folder: expert_prune (a pruned HF checkpoint), gguf
    (llama.cpp files), int8 / nf4 (bitsandbytes LLM.int8 / NF4 HF checkpoints: Linear layers only,
    so an MoE's fused experts stay in float; needs bitsandbytes, whose backend is probed on
    ``export.device`` before anything is written), onnx (ONNX graphs for onnxruntime, measured on
    CPU by onnxruntime), gptq (W4A16/W8A16/W8A8), sparsegpt and wanda (50% unstructured / 2:4): calibrated
    on ``export.calibration``, written as compressed-tensors checkpoints (vLLM, transformers)."""

    heldout: str | None = None
    """Held-out shards + manifest.json (the data stage's ``data/heldout``) for the retention report and
    for routing counts; null = no held-out measures (sizes only)."""

    languages: list[str] = field(default_factory=list)
    """Held-out languages to measure; empty = every language of the manifest."""

    max_docs_per_language: int | None = 50
    """Held-out documents per language (a seeded sample, the same for every artefact); null = all."""

    window: int = 256
    """Tokens per perplexity window (capped at the model's max_position_embeddings)."""

    stride: int = 128
    """Step between window starts (1..window)."""

    batch_size: int = 8
    """Sequences per forward pass while measuring."""

    device: str = "auto"
    """Torch device for measuring and routing counts: auto (cuda if available, else cpu), cpu, cuda,
    cuda:1, ... Weights are measured in float32."""

    benchmarks: bool = False
    """Also score every artefact on the eval stage's multiple-choice benchmarks (``eval.benchmarks``,
    ``eval.benchmark_max_items``, its scoring and bootstrap CIs) and report accuracy retention."""

    expert_prune: ExpertPruneConfig = field(default_factory=ExpertPruneConfig)
    """Settings of the expert_prune method."""

    gguf: GGUFConfig = field(default_factory=GGUFConfig)
    """Settings of the gguf method."""

    onnx: ONNXConfig = field(default_factory=ONNXConfig)
    """Settings of the onnx method."""

    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    """Calibration text of gptq, sparsegpt and wanda."""

    gptq: GPTQConfig = field(default_factory=GPTQConfig)
    """Settings of the gptq method."""

    sparsegpt: SparseConfig = field(default_factory=SparseConfig)
    """Settings of the sparsegpt method."""

    wanda: SparseConfig = field(default_factory=SparseConfig)
    """Settings of the wanda method."""

    speed: SpeedConfig = field(default_factory=SpeedConfig)
    """CPU tokens/s of the source and every artefact (the report's tokens/s table)."""

    serve: bool = False
    """Once the pipeline is done (the stage ran or was complete already), serve the browser page with
    the ``export.web.gguf_type`` file until Ctrl-C (needs ``python -m moe_adapt.export.web install``).
    How the stage is used, not what it writes: left out of its fingerprint."""

    web: WebConfig = field(default_factory=WebConfig)
    """Settings of the browser page's server."""

    def __post_init__(self) -> None:
        for m in self.methods:
            if m in PLANNED:
                _fail(
                    "export.methods",
                    list(self.methods),
                    f"{m!r} is not built yet; built: {', '.join(METHODS)}",
                )
            if m not in METHODS:
                _fail(
                    "export.methods",
                    list(self.methods),
                    f"unknown method {m!r}; methods: {', '.join(METHODS)}",
                )
        if any(m in CALIBRATED for m in self.methods) and not (self.calibration.data or self.heldout):
            _fail(
                "export.calibration.data",
                None,
                "gptq, sparsegpt and wanda need calibration text: set it (the data stage's data/shards) or "
                "export.heldout",
            )
        if len(set(self.methods)) != len(self.methods):
            _fail("export.methods", list(self.methods), "list each method once")
        if self.gguf.from_pruned and not ("gguf" in self.methods and "expert_prune" in self.methods):
            _fail(
                "export.gguf.from_pruned",
                True,
                f"needs both expert_prune and gguf in export.methods (got {list(self.methods)})",
            )
        if self.serve and ("gguf" not in self.methods or self.web.gguf_type not in self.gguf.types):
            _fail(
                "export.serve",
                True,
                f"the page loads gguf/model-{self.web.gguf_type}.gguf: needs gguf in export.methods "
                f"(got {list(self.methods)}) and export.web.gguf_type in export.gguf.types "
                f"(got {list(self.gguf.types)})",
            )
        if self.window < 2:
            _fail("export.window", self.window, "must be >= 2")
        if not 1 <= self.stride <= self.window:
            _fail("export.stride", self.stride, f"must be in [1, export.window={self.window}]")
        if self.batch_size < 1:
            _fail("export.batch_size", self.batch_size, "must be >= 1")
        if self.max_docs_per_language is not None and self.max_docs_per_language < 1:
            _fail("export.max_docs_per_language", self.max_docs_per_language, "must be >= 1 or null")
