"""Tensor-by-tensor safetensors reading and writing, with memory bounded by one tensor.

The ``safetensors`` library reads through an mmap (every page touched stays in the process's
resident set until the file is closed) and writes a file from a dict of in-memory tensors. To
convert a model larger than memory we need neither: :class:`SafetensorsReader` reads one tensor's
bytes with positional reads into a fresh buffer, and :class:`ShardedWriter` writes each shard's
header first (shapes and dtypes are known in advance) and then each tensor at its planned offset,
in any order and from several threads.
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
import threading
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
        """Read one tensor into newly allocated memory (thread-safe)."""
        t = self.tensors[name]
        buf = bytearray(t.end - t.begin)
        view, offset = memoryview(buf), self._data_start + t.begin
        while view:  # positional reads: safe from several threads at once
            n = os.preadv(self._f.fileno(), [view], offset)
            if n == 0:
                raise CheckpointError(f"{self.path}: short read for tensor {name!r} (file truncated?)")
            view, offset = view[n:], offset + n
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
_CHUNK = 64 * 2**20


def _short_read(src: FileBytes) -> CheckpointError:
    return CheckpointError(f"short read copying {src.nbytes} bytes at offset {src.offset} (file truncated?)")


def _copy_file_bytes(src: FileBytes, fd: int, at: int) -> None:
    """Write ``src``'s bytes at offset ``at`` of ``fd``: ``os.copy_file_range`` where the kernel and
    file systems allow it (Linux; across file systems since 5.3), else ``pread`` and ``pwrite`` in
    64 MiB chunks. Both are positional, so several threads may copy into one file at once."""
    global _KERNEL_COPY
    offset, left = src.offset, src.nbytes
    while left and _KERNEL_COPY:
        try:
            n = os.copy_file_range(src.fd, fd, left, offset, at)
        except OSError as e:
            if e.errno not in _NO_KERNEL_COPY:
                raise
            _KERNEL_COPY = False
            break
        if n == 0:
            raise _short_read(src)
        offset, at, left = offset + n, at + n, left - n
    while left:
        chunk = os.pread(src.fd, min(left, _CHUNK), offset)
        if not chunk:
            raise _short_read(src)
        _pwrite_all(fd, chunk, at)
        offset, at, left = offset + len(chunk), at + len(chunk), left - len(chunk)


def _pwrite_all(fd: int, data: bytes | memoryview, at: int) -> None:
    """``os.pwrite`` until all of ``data`` is written (one call writes at most ~2 GiB on Linux)."""
    view = memoryview(data).cast("B")
    while view:
        n = os.pwrite(fd, view[:_CHUNK], at)
        view, at = view[n:], at + n


def _sync_and_close(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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

    Every tensor's place is fixed by the plan, so each shard's header is written when the writer is
    made and each tensor goes straight to its offset: :meth:`write` accepts the tensors in any order
    and from several threads at once. A shard is fsynced on a background thread as soon as its last
    tensor has arrived, so it goes to disk while later shards are still being written. :meth:`close`
    checks that every tensor arrived, waits for the fsyncs and writes ``model.safetensors.index.json``
    when there is more than one shard; :meth:`abort` closes the files after an error.
    """

    def __init__(self, directory: str | os.PathLike[str], plan: list[PlannedTensor], max_shard_bytes: int):
        self.dir = Path(directory)
        self.shards = plan_shards(plan, max_shard_bytes)
        self.names = shard_file_names(len(self.shards))
        self.total_bytes = sum(t.nbytes for t in plan)
        self._lock = threading.Lock()
        self._slots: dict[str, tuple[int, int, PlannedTensor]] = {}  # name -> (shard, file offset, plan)
        self._left = [len(shard) for shard in self.shards]  # tensors each shard still waits for
        self._fds: list[int | None] = []
        self._syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fsync")
        self._syncs: list[Future[None]] = []
        try:
            for index, shard in enumerate(self.shards):
                self._fds.append(self._open(index, shard))
        except BaseException:
            self.abort()
            raise

    def _open(self, index: int, shard: list[PlannedTensor]) -> int:
        """Create shard ``index`` at its full size with its header; note where each tensor goes."""
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for t in shard:
            header[t.name] = {
                "dtype": DTYPE_NAMES[t.dtype],
                "shape": list(t.shape),
                "data_offsets": [offset, offset + t.nbytes],
            }
            offset += t.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # keep the data section 8-byte aligned
        start = 8 + len(blob)
        fd = os.open(self.dir / self.names[index], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _pwrite_all(fd, struct.pack("<Q", len(blob)) + blob, 0)
            os.ftruncate(fd, start + offset)
        except BaseException:
            os.close(fd)
            raise
        for t in shard:
            self._slots[t.name] = (index, start, t)
            start += t.nbytes
        return fd

    def write(self, name: str, tensor: torch.Tensor | FileBytes) -> None:
        """Write one planned tensor at its place; it must match the plan's dtype and shape and arrive
        once. A :class:`FileBytes` is copied from its file by the kernel. Thread-safe."""
        with self._lock:
            slot = self._slots.get(name)
            if slot is not None and (tensor.dtype, tuple(tensor.shape)) == (slot[2].dtype, slot[2].shape):
                del self._slots[name]
        if slot is None:
            raise ValueError(f"tensor {name!r} was not planned, or was written already")
        index, at, expected = slot
        if (tensor.dtype, tuple(tensor.shape)) != (expected.dtype, expected.shape):
            raise ValueError(
                f"expected {expected.name} {expected.dtype} {expected.shape}, got {name} {tensor.dtype} "
                f"{tuple(tensor.shape)}"
            )
        fd = self._fds[index]
        assert fd is not None, "writing into a closed writer"
        if isinstance(tensor, FileBytes):
            _copy_file_bytes(tensor, fd, at)
        else:
            data = tensor.detach().cpu().contiguous().reshape(-1)
            if data.numel():
                _pwrite_all(fd, data.view(torch.uint8).numpy().data, at)  # a view: no copy of the bytes
        with self._lock:
            self._left[index] -= 1
            if self._left[index] == 0:
                self._sync(index)

    def _sync(self, index: int) -> None:
        """fsync and close shard ``index`` in the background (on disk before its folder is renamed)."""
        fd, self._fds[index] = self._fds[index], None
        if fd is not None:
            self._syncs.append(self._syncer.submit(_sync_and_close, fd))

    def close(self) -> dict[str, str]:
        """Wait for every shard to be on disk and write the index; returns the weight map (tensor ->
        file). Raises if a planned tensor was never written."""
        leftover = next(iter(self._slots), None)
        if leftover is not None:
            self.abort()
            raise ValueError(f"tensor {leftover!r} was planned but never written")
        with self._lock:
            for shard in range(len(self.shards)):  # a shard of no tensors (an empty plan)
                self._sync(shard)
        self._syncer.shutdown(wait=True)
        syncs, self._syncs = self._syncs, []
        for done in syncs:
            done.result()  # the first fsync error
        weight_map = {t.name: self.names[i] for i, shard in enumerate(self.shards) for t in shard}
        if len(self.shards) > 1:
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return weight_map

    def abort(self) -> None:
        """Close every file without waiting for the disk (after an error: the folder is discarded)."""
        self._syncer.shutdown(wait=True)
        for index, fd in enumerate(self._fds):
            if fd is not None:
                os.close(fd)
                self._fds[index] = None
