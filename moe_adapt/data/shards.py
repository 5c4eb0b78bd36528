"""Tokenize documents into megatron-core indexed dataset shards (``.bin``/``.idx``) plus ``manifest.json``.

The tokenizer is a local Hugging Face fast tokenizer: a ``tokenizer.json`` file or a folder holding
one (as written by ``tokenizers`` or ``transformers``' ``save_pretrained``); nothing is downloaded.
Shards are megatron-core's ``IndexedDataset`` format (megatron-core 0.16.1), one shard per (source,
language, bucket), each document one sequence, so megatron's ``IndexedDataset`` and ``GPTDataset``
read them unchanged. They are written by :class:`_IndexedWriter`, which writes exactly the bytes
megatron's ``IndexedDatasetBuilder`` writes (``tests/data/test_shards.py`` compares them) without
importing megatron-core: that import costs every data task process about 4.5 s of CPU.
Token ids are stored as uint16 when the vocabulary fits
(< 65,500), else int32 -- the rule of megatron's ``DType.optimal_dtype``.

Atomicity: each shard is written to ``<prefix>.tmp.{bin,idx}`` and renamed when complete; the
manifest is written last (temp file + ``os.replace``), so a manifest always describes whole shards.

Importing ``megatron.core`` runs its package ``__init__`` (4.5 s on CPU, with warnings about
TransformerEngine/Apex); it is imported lazily, only when shards are read.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from moe_adapt.errors import MoEAdaptConfigError, MoEAdaptError
from moe_adapt.fs import atomic_write_json

MANIFEST_VERSION = 1
_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def load_tokenizer(path: str | Path) -> Any:
    """Load a ``tokenizers.Tokenizer`` from a local ``tokenizer.json`` or a folder containing one."""
    from tokenizers import Tokenizer

    p = Path(path)
    file = p / "tokenizer.json" if p.is_dir() else p
    if not file.is_file():
        raise MoEAdaptError(
            f"tokenizer {path} not found: expected a tokenizer.json file or a folder containing one"
        )
    try:
        return Tokenizer.from_file(str(file))
    except Exception as err:  # tokenizers raises a bare Exception on malformed files
        raise MoEAdaptError(f"cannot load tokenizer {file}: {err}") from err


def _indexed_dataset_module() -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            from megatron.core.datasets import indexed_dataset
        except ImportError as err:
            raise MoEAdaptError(
                "writing shards needs megatron-core: pip install megatron-core==0.16.1"
            ) from err
    return indexed_dataset


@dataclass(frozen=True)
class ShardConfig:
    """How :func:`write_shards` tokenizes and groups documents."""

    eod_token: str | None = "<|endoftext|>"
    """Token appended to every document (must exist in the vocabulary); ``None`` appends nothing."""
    batch_size: int = 512
    """Documents per ``encode_batch`` call."""
    bucket_key: str = "bucket"
    """Document field naming its difficulty bucket (absent -> bucket 0)."""
    add_special_tokens: bool = False
    """Let the tokenizer's post-processor add its special tokens (BOS etc.)."""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise MoEAdaptConfigError(f"shards.batch_size={self.batch_size} must be >= 1")


def shard_name(source: str, lang: str, bucket: Any) -> str:
    """Return the file-name-safe shard prefix for (source, lang, bucket), e.g. ``hadith__ar__b0``."""
    return f"{_SAFE.sub('_', str(source))}__{_SAFE.sub('_', str(lang))}__b{_SAFE.sub('_', str(bucket))}"


_IDX_MAGIC = b"MMIDIDX\x00\x00"
_IDX_HEADER = 34
"""Bytes of a megatron-core index header: magic (9), version (8), dtype code (1), sequence count (8),
document count (8). Then int32 sequence lengths, int64 sequence pointers (bytes into the ``.bin``),
int64 document indices."""
_DTYPE_CODES = {
    "uint8": 1,
    "int8": 2,
    "int16": 3,
    "int32": 4,
    "int64": 5,
    "float64": 6,
    "float32": 7,
    "uint16": 8,
}
"""megatron-core's ``DType`` codes, stored in byte 17 of every ``.idx``."""


class _IndexedWriter:
    """One megatron-core ``IndexedDataset`` (``<prefix>.bin`` + ``.idx``, no multimodal modes) with
    the bytes its ``IndexedDatasetBuilder`` writes: token ids appended to the ``.bin``; the ``.idx``
    holds the header (magic, version 1, dtype code, sequence and document counts), int32 sequence
    lengths, int64 byte pointers and int64 document indices. Sequence pointers by ``np.cumsum``
    (megatron's loop is Python per sequence)."""

    def __init__(self, bin_path: str, dtype: type[np.number]) -> None:
        self.dtype = np.dtype(dtype)
        self.bin = open(bin_path, "wb")  # noqa: SIM115 (closed by finalize)
        self.lengths: list[int] = []
        self.documents: list[np.ndarray] = [np.zeros(1, dtype=np.int64)]

    def add_document(self, ids: np.ndarray) -> None:
        """Append one document as one sequence."""
        self.bin.write(np.asarray(ids, dtype=self.dtype).tobytes())
        self.lengths.append(len(ids))
        self.documents.append(np.array([len(self.lengths)], dtype=np.int64))

    def add_index(self, prefix: str) -> None:
        """Append every sequence and document of the shard ``prefix`` (same dtype), as megatron's
        ``add_index`` does: its lengths, its document indices shifted by the sequences before."""
        idx = Path(f"{prefix}.idx").read_bytes()
        if idx[17] != _DTYPE_CODES[self.dtype.name]:
            raise MoEAdaptError(f"shard {prefix}.idx: dtype code {idx[17]}, expected {self.dtype.name}")
        sequences, documents = struct.unpack("<QQ", idx[18:_IDX_HEADER])
        lengths = np.frombuffer(idx, np.int32, sequences, offset=_IDX_HEADER)
        docs = np.frombuffer(idx, np.int64, documents, offset=_IDX_HEADER + 12 * sequences)
        self.documents.append(docs[1:] + len(self.lengths))
        self.lengths.extend(lengths.tolist())
        with open(f"{prefix}.bin", "rb") as src:
            shutil.copyfileobj(src, self.bin, 1 << 20)

    def finalize(self, idx_path: str) -> None:
        """Close the ``.bin`` and write the ``.idx``."""
        self.bin.close()
        lengths = np.asarray(self.lengths, dtype=np.int32)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1].astype(np.int64) * self.dtype.itemsize, out=pointers[1:])
        documents = np.concatenate(self.documents)
        with open(idx_path, "wb") as f:
            f.write(_IDX_MAGIC + struct.pack("<QB", 1, _DTYPE_CODES[self.dtype.name]))
            f.write(struct.pack("<QQ", len(lengths), len(documents)))
            f.write(lengths.tobytes() + pointers.tobytes() + documents.tobytes())


class _Shard:
    def __init__(self, out_dir: Path, name: str, dtype: type[np.number]) -> None:
        self.final = out_dir / name
        self.tmp = out_dir / f"{name}.tmp"
        self.builder = _IndexedWriter(str(self.tmp) + ".bin", dtype)
        self.documents = 0
        self.tokens = 0
        # size of the text tokenized, for the tokenizer's fertility: its tokens without EOD,
        # whitespace-separated words, characters and UTF-8 bytes
        self.text = {"text_tokens": 0, "words": 0, "chars": 0, "bytes": 0}

    def add(self, ids: list[int], text: str = "", text_tokens: int = 0) -> None:
        arr = np.asarray(ids, dtype=np.int64)
        self.builder.add_document(arr)
        self.documents += 1
        self.tokens += int(arr.size)
        self.text["text_tokens"] += text_tokens
        self.text["words"] += len(text.split())
        self.text["chars"] += len(text)
        self.text["bytes"] += len(text.encode("utf-8"))

    def close(self) -> None:
        self.builder.finalize(str(self.tmp) + ".idx")
        os.replace(str(self.tmp) + ".bin", str(self.final) + ".bin")
        os.replace(str(self.tmp) + ".idx", str(self.final) + ".idx")


class ShardSink:
    """Tokenize documents one at a time (:meth:`add`) into one megatron-core shard per (source, lang,
    bucket) under ``out_dir``; :meth:`close` finishes the shards and returns (and writes) the manifest
    (see :func:`write_shards`). Memory: one tokenizer batch and the open shards' index arrays."""

    def __init__(self, tokenizer_path: str | Path, out_dir: str | Path, config: ShardConfig | None = None):
        self.cfg = config or ShardConfig()
        self.tokenizer_path = tokenizer_path
        self.tok = load_tokenizer(tokenizer_path)
        self.vocab_size = int(self.tok.get_vocab_size(with_added_tokens=True))
        self.eod_id: int | None = None
        if self.cfg.eod_token is not None:
            self.eod_id = self.tok.token_to_id(self.cfg.eod_token)
            if self.eod_id is None:
                raise MoEAdaptConfigError(
                    f"shards.eod_token={self.cfg.eod_token!r} is not in the vocabulary of {tokenizer_path}; "
                    "set it to one of the tokenizer's special tokens or to null"
                )
        self.dtype: type[np.number] = np.uint16 if self.vocab_size < 65500 else np.int32
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.shards: dict[tuple[str, str, str], _Shard] = {}
        self.skipped = 0
        self.batch: list[dict[str, Any]] = []

    def _flush(self) -> None:
        batch, self.batch = self.batch, []
        if not batch:
            return
        encodings = self.tok.encode_batch(
            [d["text"] for d in batch], add_special_tokens=self.cfg.add_special_tokens
        )
        for doc, enc in zip(batch, encodings, strict=True):
            ids = list(enc.ids)
            if not ids:
                self.skipped += 1
                continue
            text_tokens = len(ids)
            if self.eod_id is not None:
                ids.append(self.eod_id)
            key = (
                str(doc.get("source", "unknown")),
                str(doc.get("lang", "und")),
                str(doc.get(self.cfg.bucket_key, 0)),
            )
            if key not in self.shards:
                self.shards[key] = _Shard(self.out, shard_name(*key), self.dtype)
            self.shards[key].add(ids, doc["text"], text_tokens)

    def add(self, doc: dict[str, Any]) -> None:
        """Queue ``doc`` (``text``, ``source``, ``lang``, the bucket key); a document with empty text is
        skipped and counted."""
        text = doc.get("text")
        if not isinstance(text, str) or not text.strip():
            self.skipped += 1
            return
        self.batch.append(doc)
        if len(self.batch) >= self.cfg.batch_size:
            self._flush()

    def close(self) -> dict[str, Any]:
        """Finish every shard and write ``manifest.json`` last; return the manifest."""
        self._flush()
        entries: list[dict[str, Any]] = []
        for (source, lang, bucket), shard in sorted(self.shards.items()):
            shard.close()
            entries.append(
                {
                    "prefix": shard.final.name,
                    "source": source,
                    "lang": lang,
                    "bucket": bucket,
                    "documents": shard.documents,
                    "tokens": shard.tokens,
                    **shard.text,
                }
            )
        manifest = _manifest(
            np.dtype(self.dtype).name, str(self.tokenizer_path), self.vocab_size, self.eod_id
        )
        manifest["shards"] = entries
        manifest["totals"] = _totals(entries, self.skipped)
        atomic_write_json(self.out / "manifest.json", manifest)
        return manifest


def _manifest(dtype: str, tokenizer: str, vocab_size: int, eod_id: int | None) -> dict[str, Any]:
    return {
        "version": MANIFEST_VERSION,
        "format": "megatron-core IndexedDataset (mmap .bin/.idx)",
        "dtype": dtype,
        "tokenizer": tokenizer,
        "vocab_size": vocab_size,
        "eod_id": eod_id,
    }


def _totals(entries: list[dict[str, Any]], skipped: int) -> dict[str, int]:
    return {
        "documents": sum(e["documents"] for e in entries),
        "tokens": sum(e["tokens"] for e in entries),
        "skipped_documents": skipped,
    }


def write_shards(
    docs: Iterable[dict[str, Any]],
    tokenizer_path: str | Path,
    out_dir: str | Path,
    config: ShardConfig | None = None,
) -> dict[str, Any]:
    """Tokenize ``docs`` into one megatron-core shard per (source, lang, bucket) under ``out_dir``.

    Returns the manifest (also written to ``out_dir/manifest.json``): per shard its prefix, source,
    lang, bucket, documents, tokens (EOD included) and the size of the text tokenized (``text_tokens``:
    without EOD; ``words``, ``chars``, ``bytes``: UTF-8); totals; the dtype, the tokenizer path,
    vocabulary size and EOD id.
    Documents with empty text or that tokenize to nothing are skipped and counted.
    """
    sink = ShardSink(tokenizer_path, out_dir, config)
    for doc in docs:
        sink.add(doc)
    return sink.close()


def merge_shards(parts: list[Path], out_dir: str | Path) -> dict[str, Any] | None:
    """Concatenate the shards of the folders ``parts`` (each written by a :class:`ShardSink`, in
    corpus order) into one shard per (source, lang, bucket) under ``out_dir``, with its manifest:
    the same bytes a single :class:`ShardSink` fed every document in that order writes. None when no
    part holds a document."""
    manifests = [json.loads((p / "manifest.json").read_text(encoding="utf-8")) for p in parts]
    if not manifests or not any(m["shards"] for m in manifests):
        return None
    first = manifests[0]
    dtype = np.dtype(first["dtype"]).type
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    by_key: dict[tuple[str, str, str], list[tuple[Path, dict[str, Any]]]] = {}
    for part, m in zip(parts, manifests, strict=True):
        for e in m["shards"]:
            by_key.setdefault((e["source"], e["lang"], e["bucket"]), []).append((part, e))
    entries: list[dict[str, Any]] = []
    for key in sorted(by_key):
        name = shard_name(*key)
        tmp = out / f"{name}.tmp"
        builder = _IndexedWriter(str(tmp) + ".bin", dtype)
        entry: dict[str, Any] = {"prefix": name, "source": key[0], "lang": key[1], "bucket": key[2]}
        for k in ("documents", "tokens", "text_tokens", "words", "chars", "bytes"):
            entry[k] = 0
        for part, e in by_key[key]:
            builder.add_index(str(part / e["prefix"]))
            for k in ("documents", "tokens", "text_tokens", "words", "chars", "bytes"):
                entry[k] += int(e[k])
        builder.finalize(str(tmp) + ".idx")
        os.replace(str(tmp) + ".bin", str(out / name) + ".bin")
        os.replace(str(tmp) + ".idx", str(out / name) + ".idx")
        entries.append(entry)
    manifest = _manifest(first["dtype"], first["tokenizer"], first["vocab_size"], first["eod_id"])
    manifest["shards"] = entries
    manifest["totals"] = _totals(entries, sum(m["totals"]["skipped_documents"] for m in manifests))
    return manifest


_RERUN = "rerun the data stage with force=[data]"


def check_shard(out_dir: str | Path, prefix: str) -> None:
    """Refuse, in one line naming the file, a shard whose ``.idx`` is not a whole megatron-core index
    or whose ``.bin`` is not the size its index says (a copy cut short, a disk that filled up): read
    as they are, the memmaps would hand out short or garbage documents."""
    path = Path(out_dir) / prefix
    idx, bin_ = Path(f"{path}.idx"), Path(f"{path}.bin")
    if not idx.is_file() or not bin_.is_file():
        raise MoEAdaptError(f"shard {path}.bin/.idx not found")
    idx_size, bin_size = idx.stat().st_size, bin_.stat().st_size
    with open(idx, "rb") as f:
        head = f.read(_IDX_HEADER)
    version = struct.unpack("<Q", head[9:17])[0] if len(head) == _IDX_HEADER else None
    if version != 1 or head[:9] != _IDX_MAGIC:
        raise MoEAdaptError(
            f"shard index {idx} is truncated or corrupt: {idx_size} bytes, no megatron-core index "
            f"header; {_RERUN}"
        )
    try:
        itemsize = np.dtype(next(name for name, code in _DTYPE_CODES.items() if code == head[17])).itemsize
    except StopIteration:
        raise MoEAdaptError(
            f"shard index {idx} is corrupt: unknown dtype code {head[17]}; {_RERUN}"
        ) from None
    sequences, documents = struct.unpack("<QQ", head[18:_IDX_HEADER])
    expected_idx = _IDX_HEADER + sequences * (4 + 8) + documents * 8
    if idx_size < expected_idx:
        raise MoEAdaptError(
            f"shard index {idx} is truncated: {idx_size} bytes, but its header expects {expected_idx} "
            f"({sequences} sequences, {documents} documents); {_RERUN}"
        )
    expected_bin = 0
    if sequences:
        last_length = np.fromfile(idx, np.int32, 1, offset=_IDX_HEADER + 4 * (sequences - 1))[0]
        last_pointer = np.fromfile(
            idx, np.int64, 1, offset=_IDX_HEADER + 4 * sequences + 8 * (sequences - 1)
        )[0]
        expected_bin = int(last_pointer) + int(last_length) * itemsize
    if bin_size != expected_bin:
        how = "truncated" if bin_size < expected_bin else "longer than its index says"
        raise MoEAdaptError(
            f"shard {bin_} is {how}: {bin_size} bytes, but its index {idx.name} expects {expected_bin}; "
            f"{_RERUN}"
        )


def open_shard(out_dir: str | Path, prefix: str) -> Any:
    """Open shard ``prefix`` under ``out_dir`` as a megatron-core ``IndexedDataset`` (mmap), once
    :func:`check_shard` found its two files whole."""
    check_shard(out_dir, prefix)
    return _indexed_dataset_module().IndexedDataset(str(Path(out_dir) / prefix), mmap=True)
