"""Tensor-by-tensor safetensors reading and writing, with memory bounded by one tensor.

The ``safetensors`` library reads through an mmap (every page touched stays in the process's
resident set until the file is closed) and writes a file from a dict of in-memory tensors. To
convert a model larger than memory we need neither: :class:`SafetensorsReader` reads one tensor's
bytes with ``readinto`` into a fresh buffer, and :class:`ShardedWriter` writes each shard's header
first (shapes and dtypes are known in advance) and then streams the tensors in header order.
Files are in the standard format (8-byte little-endian header length, JSON header, raw data), so
``safetensors`` and ``transformers`` read them as usual.
"""

from __future__ import annotations

import errno
import io
import json
import mmap
import os
import struct
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from moe_adapt.errors import CheckpointError

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024  # the format's own limit


def itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives in a safetensors file."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # offset of the first byte, from the start of the data section
    end: int

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


class SafetensorsReader:
    """Reads tensors from one ``.safetensors`` file without mapping the whole file.

    The header is validated on open: a truncated or corrupt file raises :class:`CheckpointError`
    naming the file, instead of failing later in the middle of a conversion.
    """

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)
        try:
            self._f: io.BufferedReader = open(self.path, "rb")  # noqa: SIM115 (closed in close())
        except OSError as e:
            raise CheckpointError(f"cannot open {self.path}: {e.strerror}") from None
        try:
            self.tensors, self.metadata, self._data_start = self._read_header()
        except BaseException:
            self._f.close()  # a corrupt file is not left open
            raise

    def _read_header(self) -> tuple[dict[str, TensorInfo], dict[str, str], int]:
        size = os.fstat(self._f.fileno()).st_size
        raw = self._f.read(8)
        if len(raw) != 8:
            raise CheckpointError(
                f"{self.path} is not a safetensors file: {size} bytes, too short for a header"
            )
        (n,) = struct.unpack("<Q", raw)
        if n > _MAX_HEADER or 8 + n > size:
            raise CheckpointError(f"{self.path} is corrupt: header length {n} does not fit in {size} bytes")
        try:
            header = json.loads(self._f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{self.path} is corrupt: its header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path} is corrupt: its header is not a JSON object")
        metadata = header.pop("__metadata__", {}) or {}
        data_len = size - 8 - n
        tensors: dict[str, TensorInfo] = {}
        for name, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(x) for x in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise CheckpointError(
                    f"{self.path} is corrupt or uses an unsupported dtype: entry {name!r} = {info!r}"
                ) from None
            t = TensorInfo(name, dtype, shape, begin, end)
            if not 0 <= begin <= end <= data_len or end - begin != t.numel * itemsize(dtype):
                raise CheckpointError(
                    f"{self.path} is truncated or corrupt: tensor {name!r} claims bytes [{begin}, {end}) "
                    f"of a {data_len}-byte data section for shape {shape} {info['dtype']}"
                )
            tensors[name] = t
        return tensors, metadata, 8 + n

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor into newly allocated memory."""
        t = self.tensors[name]
        buf = bytearray(t.end - t.begin)
        self._f.seek(self._data_start + t.begin)
        if self._f.readinto(buf) != len(buf):
            raise CheckpointError(f"{self.path}: short read for tensor {name!r} (file truncated?)")
        if not buf:
            return torch.empty(t.shape, dtype=t.dtype)
        return torch.frombuffer(buf, dtype=t.dtype).reshape(t.shape)

    def view(self, name: str) -> torch.Tensor:
        """One tensor as a copy-on-write map of its bytes in the file: no read until pages are touched.

        Only this tensor's pages are mapped, and the map is unmapped when the last tensor made from it
        is freed, so resident memory stays bounded by the tensors the caller keeps. Writing a slice of
        it to another file copies page-cache bytes once, without a read into a fresh buffer first;
        writes to it stay private to the process.
        """
        t = self.tensors[name]
        if t.end == t.begin:
            return torch.empty(t.shape, dtype=t.dtype)
        start = self._data_start + t.begin
        aligned = start - start % mmap.ALLOCATIONGRANULARITY
        m = mmap.mmap(
            self._f.fileno(), start + (t.end - t.begin) - aligned, access=mmap.ACCESS_COPY, offset=aligned
        )
        data = torch.frombuffer(m, dtype=torch.uint8, count=t.end - t.begin, offset=start - aligned)
        return data.view(t.dtype).reshape(t.shape)

    def file_bytes(self, name: str, rows: slice | None = None) -> FileBytes:
        """Where one tensor's bytes are in this file, or those of its rows ``rows`` (a contiguous slice
        of the first dimension), for :meth:`ShardedWriter.write` to copy file to file unchanged."""
        t = self.tensors[name]
        offset, shape = self._data_start + t.begin, t.shape
        if rows is not None:
            start, stop, step = rows.indices(shape[0])
            if step != 1:
                raise ValueError(f"rows {rows} of {name!r} are not contiguous")
            row_bytes = (t.end - t.begin) // shape[0] if shape[0] else 0
            offset += start * row_bytes
            shape = (max(stop - start, 0), *shape[1:])
        return FileBytes(self._f.fileno(), offset, t.dtype, shape)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class PlannedTensor:
    """A tensor the writer will receive later: its name, dtype and shape are fixed up front."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = itemsize(self.dtype)
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class FileBytes:
    """A tensor of ``dtype`` and ``shape`` that is, unchanged, the bytes from ``offset`` of the open
    file ``fd``. :meth:`ShardedWriter.write` copies them file to file in the kernel
    (``os.copy_file_range``): no read into the process, no page faults, no Python-side copy."""

    fd: int
    offset: int
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return PlannedTensor("", self.dtype, self.shape).nbytes


_KERNEL_COPY = hasattr(os, "copy_file_range")
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.EPERM}


def _copy_file_bytes(src: FileBytes, f: io.BufferedWriter) -> None:
    """Append ``src``'s bytes to ``f``: ``os.copy_file_range`` where the kernel and file systems allow
    it (Linux; across file systems since 5.3), else ``pread`` and ``write`` in 64 MiB chunks."""
    global _KERNEL_COPY
    f.flush()
    out = f.fileno()
    offset, left = src.offset, src.nbytes
    while left and _KERNEL_COPY:
        try:
            n = os.copy_file_range(src.fd, out, left, offset)  # appends at out's position
        except OSError as e:
            if e.errno not in _NO_KERNEL_COPY:
                raise
            _KERNEL_COPY = False
            break
        if n == 0:
            raise CheckpointError(
                f"short read copying {src.nbytes} bytes at offset {src.offset} (file truncated?)"
            )
        offset, left = offset + n, left - n
    while left:
        chunk = os.pread(src.fd, min(left, 64 * 2**20), offset)
        if not chunk:
            raise CheckpointError(
                f"short read copying {src.nbytes} bytes at offset {src.offset} (file truncated?)"
            )
        f.write(chunk)
        offset, left = offset + len(chunk), left - len(chunk)
    f.flush()
    f.seek(0, os.SEEK_END)  # the buffered file learns the position the kernel copy moved


def _sync_and_close(f: io.BufferedWriter) -> None:
    try:
        os.fsync(f.fileno())
    finally:
        f.close()


def plan_shards(tensors: list[PlannedTensor], max_shard_bytes: int) -> list[list[PlannedTensor]]:
    """Split tensors, in order, into shards of at most ``max_shard_bytes`` (one tensor may exceed it)."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def shard_file_names(n: int) -> list[str]:
    """Hugging Face's names: ``model.safetensors`` alone, else ``model-0000i-of-0000n.safetensors``."""
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


class ShardedWriter:
    """Writes a planned list of tensors as HF-style sharded safetensors, one tensor at a time.

    Call :meth:`write` with the tensors in plan order; :meth:`close` checks that all arrived and
    writes ``model.safetensors.index.json`` when there is more than one shard.
    """

    def __init__(self, directory: str | os.PathLike[str], plan: list[PlannedTensor], max_shard_bytes: int):
        self.dir = Path(directory)
        self.shards = plan_shards(plan, max_shard_bytes)
        self.names = shard_file_names(len(self.shards))
        self._order: Iterator[tuple[int, PlannedTensor]] = (
            (i, t) for i, shard in enumerate(self.shards) for t in shard
        )
        self._f: io.BufferedWriter | None = None
        self._shard = -1
        self._syncer: ThreadPoolExecutor | None = None
        self._syncs: list[Future[None]] = []
        self.total_bytes = sum(t.nbytes for t in plan)

    def _finish_shard(self) -> None:
        """Flush the open shard and fsync it (on disk before the folder is renamed into place) on a
        background thread, so that the next shard is written while this one goes to disk."""
        if self._f is not None:
            self._f.flush()
            if self._syncer is None:
                self._syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fsync")
            self._syncs.append(self._syncer.submit(_sync_and_close, self._f))
            self._f = None

    def _wait_for_syncs(self) -> None:
        """Wait for every shard's fsync; raises the first one's error."""
        if self._syncer is not None:
            self._syncer.shutdown(wait=True)
            self._syncer = None
        syncs, self._syncs = self._syncs, []
        for done in syncs:
            done.result()

    def _open(self, index: int) -> None:
        self._finish_shard()
        self._shard = index
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for t in self.shards[index]:
            header[t.name] = {
                "dtype": DTYPE_NAMES[t.dtype],
                "shape": list(t.shape),
                "data_offsets": [offset, offset + t.nbytes],
            }
            offset += t.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # keep the data section 8-byte aligned
        self._f = open(self.dir / self.names[index], "wb")  # noqa: SIM115 (closed in close())
        self._f.write(struct.pack("<Q", len(blob)))
        self._f.write(blob)

    def write(self, name: str, tensor: torch.Tensor | FileBytes) -> None:
        """Append the next tensor; it must match the plan's name, dtype and shape. A
        :class:`FileBytes` is copied from its file by the kernel."""
        try:
            index, expected = next(self._order)
        except StopIteration:
            raise ValueError(f"tensor {name!r} was not planned") from None
        if (name, tensor.dtype, tuple(tensor.shape)) != (expected.name, expected.dtype, expected.shape):
            raise ValueError(
                f"expected {expected.name} {expected.dtype} {expected.shape}, got {name} {tensor.dtype} "
                f"{tuple(tensor.shape)}"
            )
        if index != self._shard:
            self._open(index)
        assert self._f is not None
        if isinstance(tensor, FileBytes):
            _copy_file_bytes(tensor, self._f)
            return
        data = tensor.detach().cpu().contiguous().reshape(-1)
        if data.numel():
            self._f.write(data.view(torch.uint8).numpy().data)  # a view: no copy of the bytes

    def close(self) -> dict[str, str]:
        """Finish the last shard and write the index; returns the weight map (tensor -> file)."""
        leftover = next(self._order, None)
        if leftover is not None:
            raise ValueError(f"tensor {leftover[1].name!r} was planned but never written")
        self._finish_shard()
        self._wait_for_syncs()
        weight_map = {t.name: self.names[i] for i, shard in enumerate(self.shards) for t in shard}
        if len(self.shards) > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return weight_map
