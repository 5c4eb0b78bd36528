"""Bits per byte and per character against hand computations: a uniform fake model (every token costs
ln V nats) on ASCII and Arabic text (two UTF-8 bytes per letter), tokenized byte by byte so that a
token can hold half a character."""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from moe_adapt.eval.bits import bits, token_sizes
from moe_adapt.eval.perplexity import evaluate_perplexity

EOD = "<|endoftext|>"


def byte_tokenizer(merges_from: list[str] | None = None, vocab_size: int = 300) -> Any:
    """A byte-level BPE: with ``merges_from`` merges learnt from that text, else none (one token per
    UTF-8 byte, ids 0..255 in the byte-level alphabet's order, then EOD at 256)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if merges_from is None:
        vocab = {c: i for i, c in enumerate(sorted(alphabet))}
        tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    else:
        tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if merges_from is None:
        tok.add_special_tokens([EOD])
    else:
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOD], initial_alphabet=alphabet)
        tok.train_from_iterator(merges_from, trainer)
    return tok


class Uniform(torch.nn.Module):
    """Equal logits over ``vocab`` tokens: every scored token costs exactly ln(vocab) nats."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.config = SimpleNamespace(vocab_size=vocab, max_position_embeddings=64)
        self.bias = torch.nn.Parameter(torch.zeros(vocab))

    def forward(self, input_ids: torch.Tensor, attention_mask: Any = None, **_: Any) -> Any:
        return SimpleNamespace(logits=self.bias.expand(*input_ids.shape, -1))


ASCII = "ab cd"
ARABIC = "سل ما"  # four letters of two UTF-8 bytes each and a space: 9 bytes, 5 characters


def test_byte_level_sizes_sum_to_the_texts_bytes_and_characters() -> None:
    text = [f"{ASCII} {ARABIC} hello سلام عليكم"] * 20
    for tok in (byte_tokenizer(), byte_tokenizer(text)):
        sizes = token_sizes(tok)
        assert sizes.method == "byte_level"
        eod = tok.token_to_id(EOD)
        assert sizes.bytes_V[eod] == 0 and sizes.chars_V[eod] == 0  # special tokens spell no text
        for s in (ASCII, ARABIC, text[0]):
            ids = tok.encode(s).ids
            assert tok.decode(ids) == s
            assert sizes.count([*ids, eod]) == (len(s.encode("utf-8")), len(s))
    # one token per byte: an Arabic letter is two tokens, its first (lead) byte carries the character
    sizes = token_sizes(byte_tokenizer())
    ids = byte_tokenizer().encode("س").ids
    assert len(ids) == 2 and [int(sizes.bytes_V[i]) for i in ids] == [1, 1]
    assert [int(sizes.chars_V[i]) for i in ids] == [1, 0]


def test_bits_per_byte_and_per_char_by_hand() -> None:
    tok = byte_tokenizer()
    eod = tok.token_to_id(EOD)
    vocab = tok.get_vocab_size()
    docs = {lang: [np.array([*tok.encode(t).ids, eod])] for lang, t in (("en", ASCII), ("ar", ARABIC))}
    res = evaluate_perplexity(Uniform(vocab), docs, window=64, token_sizes=token_sizes(tok))
    # en: 5 byte tokens + EOD; the first byte ("a") has no context and is not scored, EOD has no bytes.
    # Scored: "b cd" (4 bytes, 4 characters) and EOD: 5 tokens at ln V each.
    en = res["en"]
    assert (en.tokens, en.bytes, en.chars) == (5, 4, 4)
    assert en.nll_sum == pytest.approx(5 * math.log(vocab))
    assert en.bits_per_byte == pytest.approx(5 * math.log2(vocab) / 4)
    assert en.bits_per_char == pytest.approx(5 * math.log2(vocab) / 4)
    # ar: 9 byte tokens + EOD; the unscored first token is half of "س" (its lead byte), so the scored
    # text is 8 bytes holding 4 characters ("ل", " ", "م", "ا"; the tail byte of "س" starts none).
    ar = res["ar"]
    assert (ar.tokens, ar.bytes, ar.chars) == (9, 8, 4)
    assert ar.bits_per_byte == pytest.approx(9 * math.log2(vocab) / 8)
    assert ar.bits_per_char == pytest.approx(9 * math.log2(vocab) / 4)
    # per token Arabic and English cost the same here (a uniform model); per byte they do too, but
    # per character Arabic costs about twice as much: two bytes per letter
    assert ar.mean_loss == pytest.approx(en.mean_loss)
    assert ar.to_dict()["bits_per_byte"] == ar.bits_per_byte


@pytest.mark.parametrize(
    ("window", "stride", "scored"), [(4, 4, "bcdfgh"), (4, 2, "bcdefgh"), (3, 3, "bcefh")]
)
def test_only_the_scored_tokens_bytes_count(window: int, stride: int, scored: str) -> None:
    """Disjoint windows leave each window's first token unscored: its bytes are not counted either."""
    tok = byte_tokenizer()
    doc = np.array(tok.encode("abcdefgh").ids)
    res = evaluate_perplexity(
        Uniform(tok.get_vocab_size()),
        {"en": [doc]},
        window=window,
        stride=stride,
        token_sizes=token_sizes(tok),
    )["en"]
    assert res.tokens == res.bytes == res.chars == len(scored)
    assert res.bits_per_byte == pytest.approx(math.log2(tok.get_vocab_size()))


def test_without_sizes_or_with_no_bytes_there_is_no_bpb() -> None:
    tok = byte_tokenizer()
    eod = tok.token_to_id(EOD)
    model = Uniform(tok.get_vocab_size())
    res = evaluate_perplexity(model, {"en": [np.array([eod, eod, eod])]}, window=8)["en"]
    assert res.bytes is None and res.bits_per_byte is None and res.bits_per_char is None
    res = evaluate_perplexity(
        model, {"en": [np.array([eod, eod, eod])]}, window=8, token_sizes=token_sizes(tok)
    )["en"]
    assert res.bytes == 0 and res.bits_per_byte is None  # only EOD scored: no text to divide by
    assert bits(1.0, 0) is None and bits(math.log(2), 1) == pytest.approx(1.0)


def test_a_shorter_table_than_the_ids_is_refused() -> None:
    from moe_adapt.errors import MoEAdaptError

    sizes = token_sizes(byte_tokenizer())
    with pytest.raises(MoEAdaptError, match="the held-out shards and the tokenizer differ"):
        sizes.count([sizes.bytes_V.size])


def test_metaspace_sizes() -> None:
    """SentencePiece style: ``▁`` is a space and ``<0xD8>`` one byte (a lead byte: one character)."""
    from tokenizers import Tokenizer, decoders, models

    vocab = {"<unk>": 0, "▁ab": 1, "cd": 2, "<0xD8>": 3, "<0xB3>": 4}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    tok.add_special_tokens(["<unk>"])
    sizes = token_sizes(tok)
    assert sizes.method == "metaspace"
    assert sizes.bytes_V.tolist() == [0, 3, 2, 1, 1] and sizes.chars_V.tolist() == [0, 3, 2, 1, 0]


def test_heldout_sizes_come_from_the_manifests_tokenizer(run_dir, tokenizer_dir, tmp_path, caplog) -> None:
    """load_heldout sizes the text with the tokenizer the manifest names; when that one is gone, with
    the ``tokenizer`` given; with neither it warns and reports no bits per byte."""
    import json
    import shutil

    from moe_adapt.eval.heldout import load_heldout

    assert load_heldout(run_dir / "data" / "heldout").token_sizes is not None
    moved = tmp_path / "heldout"
    shutil.copytree(run_dir / "data" / "heldout", moved)
    manifest = json.loads((moved / "manifest.json").read_text())
    manifest["tokenizer"] = str(tmp_path / "gone" / "tokenizer.json")
    (moved / "manifest.json").write_text(json.dumps(manifest))
    assert load_heldout(moved, tokenizer=tokenizer_dir).token_sizes is not None
    with caplog.at_level("WARNING"):
        assert load_heldout(moved, key="cpt.heldout").token_sizes is None
    assert any(
        "cpt.heldout: no tokenizer" in r.getMessage() and "gone" in r.getMessage() for r in caplog.records
    )


def test_scored_bytes_are_the_data_stages_text_bytes_less_the_unscored_tokens(tmp_path) -> None:
    """End to end: shards written by the data stage's write_shards (which counts the raw text's bytes
    and characters), read back by load_heldout, scored with stride < window: every token but each
    document's first is scored, so the bytes scored plus the first tokens' bytes are the text's."""
    pytest.importorskip("megatron.core")
    from moe_adapt.data.shards import write_shards
    from moe_adapt.eval.heldout import load_heldout

    texts = {"en": ["The quick brown fox.", "Ibn Umar narrated it"], "ar": ["حدثنا قتيبة بن سعيد", "عن نافع"]}
    tok = byte_tokenizer([t for ts in texts.values() for t in ts] * 5)
    tok.save(str(tmp_path / "tokenizer.json"))
    docs = [{"text": t, "lang": lang, "source": "s"} for lang, ts in texts.items() for t in ts]
    manifest = write_shards(docs, tmp_path / "tokenizer.json", tmp_path / "heldout")
    held = load_heldout(tmp_path / "heldout")
    assert held.token_sizes is not None and held.token_sizes.method == "byte_level"
    res = evaluate_perplexity(
        Uniform(tok.get_vocab_size()), held.docs, window=4, stride=2, token_sizes=held.token_sizes
    )
    for row in manifest["shards"]:
        lang = row["lang"]
        first = held.token_sizes.count([int(d[0]) for d in held.docs[lang]])
        assert res[lang].bytes + first[0] == row["bytes"] == sum(len(t.encode()) for t in texts[lang])
        assert res[lang].chars + first[1] == row["chars"] == sum(len(t) for t in texts[lang])
