from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from moe_adapt.data.shards import ShardConfig, load_tokenizer, open_shard, write_shards
from moe_adapt.errors import MoEAdaptConfigError, MoEAdaptError

pytest.importorskip("megatron.core")

DOCS = [
    {
        "id": "a1",
        "text": "حدثنا قتيبة بن سعيد قال حدثنا الليث",
        "lang": "ar",
        "source": "hadith",
        "bucket": 0,
    },
    {
        "id": "e1",
        "text": "The quick brown fox jumps over the lazy dog.",
        "lang": "en",
        "source": "hadith",
        "bucket": 0,
    },
    {"id": "a2", "text": "عن نافع عن ابن عمر قال رسول الله", "lang": "ar", "source": "hadith", "bucket": 1},
    {"id": "h1", "text": "מאימתי קורין את שמע בערבית", "lang": "he", "source": "mishnah"},
    {"id": "a3", "text": "قال رسول الله صلى الله عليه وسلم", "lang": "ar", "source": "hadith", "bucket": 0},
    {"id": "x", "text": "   ", "lang": "en", "source": "hadith"},
    {"id": "y", "lang": "en", "source": "hadith"},
]


def test_shards_round_trip(tiny_tokenizer: Path, tmp_path: Path) -> None:
    tok = load_tokenizer(tiny_tokenizer)
    eod = tok.token_to_id("<|endoftext|>")
    manifest = write_shards(DOCS, tiny_tokenizer, tmp_path, ShardConfig(batch_size=2))
    assert json.loads((tmp_path / "manifest.json").read_text()) == manifest
    assert manifest["dtype"] == "uint16" and manifest["eod_id"] == eod
    names = [s["prefix"] for s in manifest["shards"]]
    assert names == ["hadith__ar__b0", "hadith__ar__b1", "hadith__en__b0", "mishnah__he__b0"]
    assert manifest["totals"]["documents"] == 5 and manifest["totals"]["skipped_documents"] == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"{n}.{ext}" for n in names for ext in ("bin", "idx")] + ["manifest.json"]
    )
    by_shard = {
        "hadith__ar__b0": ["a1", "a3"],
        "hadith__ar__b1": ["a2"],
        "hadith__en__b0": ["e1"],
        "mishnah__he__b0": ["h1"],
    }
    texts = {d["id"]: d.get("text") for d in DOCS}
    for entry in manifest["shards"]:
        ds = open_shard(tmp_path, entry["prefix"])
        assert len(ds) == entry["documents"] == len(by_shard[entry["prefix"]])
        assert int(ds.sequence_lengths.sum()) == entry["tokens"]
        for i, doc_id in enumerate(by_shard[entry["prefix"]]):
            ids = ds[i]
            assert ids.dtype == np.uint16 and int(ids[-1]) == eod
            assert tok.decode([int(t) for t in ids[:-1]]) == texts[doc_id]


def test_shard_errors(tiny_tokenizer: Path, tmp_path: Path) -> None:
    with pytest.raises(MoEAdaptConfigError, match="eod_token='<eos>'"):
        write_shards(DOCS, tiny_tokenizer, tmp_path, ShardConfig(eod_token="<eos>"))
    with pytest.raises(MoEAdaptError, match="tokenizer.json"):
        load_tokenizer(tmp_path)
    manifest = write_shards(
        DOCS[:1], tiny_tokenizer / "tokenizer.json", tmp_path, ShardConfig(eod_token=None)
    )
    assert manifest["eod_id"] is None and manifest["totals"]["tokens"] == manifest["shards"][0]["tokens"]


@pytest.mark.parametrize(
    ("ext", "keep", "message"),
    [
        (".bin", -1, r"shard {bin} is truncated: {size} bytes, but its index {name}\.idx expects {full}"),
        (".bin", 0, r"shard {bin} is truncated: 0 bytes, but its index {name}\.idx expects {full}"),
        (".idx", -1, r"shard index {idx} is truncated: {size} bytes, but its header expects"),
        (".idx", 10, r"shard index {idx} is truncated or corrupt: 10 bytes, no megatron-core index header"),
    ],
)
def test_a_truncated_shard_is_named_with_its_size_and_the_fix(
    tiny_tokenizer: Path, tmp_path: Path, ext: str, keep: int, message: str
) -> None:
    """A ``.bin`` or ``.idx`` cut short (a full disk, a copy that died) is refused in one line naming
    the file and its size against what the index expects, and how to rebuild it (issue 12)."""
    manifest = write_shards(DOCS, tiny_tokenizer, tmp_path, ShardConfig())
    name = manifest["shards"][0]["prefix"]
    path = tmp_path / f"{name}{ext}"
    full = (tmp_path / f"{name}.bin").stat().st_size
    size = path.stat().st_size - 1 if keep < 0 else keep
    with open(path, "r+b") as fh:
        fh.truncate(size)
    bin_, idx = re.escape(str(tmp_path / f"{name}.bin")), re.escape(str(tmp_path / f"{name}.idx"))
    expected = message.format(bin=bin_, idx=idx, name=re.escape(name), size=size, full=full)
    with pytest.raises(MoEAdaptError, match=expected + r".*rerun the data stage with force=\[data\]"):
        open_shard(tmp_path, name)


def test_manifest_sizes_the_text_and_stats_give_the_tokenizers_fertility(tmp_path: Path) -> None:
    """With one token per UTF-8 byte (no merges) fertility is known by hand: an Arabic letter is two
    bytes, so two tokens; EOD is left out of the text's tokens."""
    from moe_adapt.data.pipeline import _shard_table, fertility, render_stats
    from tests.eval.test_bits import byte_tokenizer

    byte_tokenizer().save(str(tmp_path / "tokenizer.json"))
    docs = [
        {"text": "ab cd", "lang": "en", "source": "s"},  # 5 bytes, 5 chars, 2 words
        {"text": "abc", "lang": "en", "source": "s"},  # 3 bytes, 3 chars, 1 word
        {"text": "سل ما", "lang": "ar", "source": "s"},  # 9 bytes, 5 chars, 2 words
    ]
    manifest = write_shards(docs, tmp_path / "tokenizer.json", tmp_path / "out")
    rows = {s["lang"]: s for s in manifest["shards"]}
    assert {k: rows["en"][k] for k in ("tokens", "text_tokens", "words", "chars", "bytes")} == {
        "tokens": 10,  # 8 byte tokens + 2 EOD
        "text_tokens": 8,
        "words": 3,
        "chars": 8,
        "bytes": 8,
    }
    assert (rows["ar"]["text_tokens"], rows["ar"]["words"], rows["ar"]["chars"], rows["ar"]["bytes"]) == (
        9,
        2,
        5,
        9,
    )
    table = _shard_table(manifest)
    fert = fertility(table, {"ar": table["ar"]})  # splits add up: the Arabic text counted twice
    one = {"tokens_per_char": 1.0, "tokens_per_byte": 1.0, "bytes_per_char": 1.0}
    assert fert["en"] == {"tokens_per_word": round(8 / 3, 4), **one}
    assert fert["ar"] == {
        "tokens_per_word": 4.5,
        "tokens_per_char": 1.8,
        "tokens_per_byte": 1.0,
        "bytes_per_char": 1.8,
    }
    assert fertility({"en": {"documents": 1, "tokens": 3}}) == {}  # an old manifest without text sizes
    md = render_stats({"steps": {}, "train": table, "heldout": {}, "fertility": fert})
    assert "| language | tokens/word | tokens/char | tokens/byte | bytes/char |" in md
    assert "| ar | 4.500 | 1.800 | 1.000 | 1.800 |" in md


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_our_index_writer_writes_megatrons_bytes(tmp_path: Path, dtype: type[np.number]) -> None:
    """``_IndexedWriter`` (no megatron-core import in the data tasks) writes, and merges, byte for
    byte what megatron-core's ``IndexedDatasetBuilder`` writes and merges; megatron reads it back."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder

    from moe_adapt.data.shards import _IndexedWriter

    rng = np.random.default_rng(0)
    parts = [[rng.integers(0, 60000, rng.integers(1, 50)) for _ in range(n)] for n in (7, 1, 13)]
    for i, docs in enumerate(parts):
        ours, theirs = (
            _IndexedWriter(str(tmp_path / f"o{i}.bin"), dtype),
            IndexedDatasetBuilder(str(tmp_path / f"m{i}.bin"), dtype=dtype),
        )
        for ids in docs:
            ours.add_document(ids)
            theirs.add_document(ids, [len(ids)])
        ours.finalize(str(tmp_path / f"o{i}.idx"))
        theirs.finalize(str(tmp_path / f"m{i}.idx"))
        for ext in ("bin", "idx"):
            assert (tmp_path / f"o{i}.{ext}").read_bytes() == (tmp_path / f"m{i}.{ext}").read_bytes()
    ours, theirs = (
        _IndexedWriter(str(tmp_path / "o.bin"), dtype),
        IndexedDatasetBuilder(str(tmp_path / "m.bin"), dtype=dtype),
    )
    for i in range(len(parts)):
        ours.add_index(str(tmp_path / f"o{i}"))
        theirs.add_index(str(tmp_path / f"m{i}"))
    ours.finalize(str(tmp_path / "o.idx"))
    theirs.finalize(str(tmp_path / "m.idx"))
    for ext in ("bin", "idx"):
        assert (tmp_path / f"o.{ext}").read_bytes() == (tmp_path / f"m.{ext}").read_bytes()
    ds = IndexedDataset(str(tmp_path / "o"), mmap=True)
    flat = [ids for docs in parts for ids in docs]
    assert len(ds) == len(flat) and all(
        np.array_equal(ds[i], ids.astype(dtype)) for i, ids in enumerate(flat)
    )
