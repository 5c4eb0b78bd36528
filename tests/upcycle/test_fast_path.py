"""The upcycle's fast path (issue 13, speed) writes the same bytes as the straightforward one.

Fast: source tensors are mapped (``HFCheckpoint.view``), unchanged slices go to the writer without a
copy, unchanged whole tensors and gate/up row ranges are copied file to file by the kernel
(``HFCheckpoint.file_bytes``), and scaled shards are multiplied in the output dtype when it is the
checkpoint's own.
Reference: every tensor read into fresh memory (``HFCheckpoint.get``) and every scaling done in fp32,
then cast, as before the fast path existed.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from moe_adapt.checkpoint.hf import HFCheckpoint
from moe_adapt.upcycle import fine_grained
from moe_adapt.upcycle.config import UpcycleConfig
from moe_adapt.upcycle.convert import Upcycler
from tests.upcycle.test_bf16 import dense_in, settings, upcycle  # noqa: F401 (dense_in is a fixture)

CASES = [
    # (family, source dtype, upcycle settings)
    ("llama", "bfloat16", settings("mixtral", 4, 0)),
    ("llama", "float32", settings("mixtral", 2, 0)),
    ("qwen2", "bfloat16", settings("qwen2_moe", 6, 2)),
    ("qwen3", "float16", settings("qwen3_moe", 2, 0)),
    ("llama", "bfloat16", {**settings("mixtral", 2, 0), "dtype": "float32"}),
    ("llama", "float32", {**settings("mixtral", 4, 0), "dtype": "bfloat16"}),
    ("llama", "bfloat16", {**settings("mixtral", 3, 0), "allow_inexact": True}),
    ("llama", "bfloat16", {**settings("mixtral", 1, 0), "method": "copy"}),
    ("llama", "bfloat16", {**settings("mixtral", 2, 0), "method": "drop", "drop_ratio": 0.5}),
]


def weights(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.glob("*.safetensors*"))}


@pytest.mark.parametrize(("family", "dtype", "kw"), CASES)
def test_fast_path_writes_the_reference_bytes(dense_in, tmp_path, monkeypatch, family, dtype, kw):  # noqa: F811
    dense = dense_in(family, dtype)
    kw = {"verify": "none", **kw}
    upcycle(dense, tmp_path / "fast", **kw)
    with monkeypatch.context() as m:
        m.setattr(HFCheckpoint, "view", HFCheckpoint.get)
        m.setattr(
            HFCheckpoint, "file_bytes", lambda self, name, rows=None: self.get(name)[rows or slice(None)]
        )
        m.setattr(fine_grained, "write_dtype", lambda cfg, dense: None)
        upcycle(dense, tmp_path / "reference", **kw)
    fast, reference = weights(tmp_path / "fast"), weights(tmp_path / "reference")
    assert fast and fast.keys() == reference.keys()
    for name in fast:
        assert fast[name] == reference[name], name


def test_kernel_copy_fallback_writes_the_same_bytes(dense_in, tmp_path, monkeypatch):  # noqa: F811
    """Where ``copy_file_range`` is refused (another file system on an old kernel), the bytes are
    read and written instead."""
    import errno
    import os

    from moe_adapt.checkpoint import safetensors_io

    dense = dense_in("llama", "bfloat16")
    upcycle(dense, tmp_path / "kernel", verify="none", **settings("mixtral", 4, 0))

    def refuse(*args: object) -> int:
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    with monkeypatch.context() as m:
        m.setattr(os, "copy_file_range", refuse, raising=False)
        m.setattr(safetensors_io, "_KERNEL_COPY", True)
        upcycle(dense, tmp_path / "fallback", verify="none", **settings("mixtral", 4, 0))
        assert safetensors_io._KERNEL_COPY is False
    assert weights(tmp_path / "kernel") == weights(tmp_path / "fallback")


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[-1]], ids=["mixtral", "qwen2_shared", "drop"])
def test_the_files_do_not_depend_on_the_number_of_writing_threads(dense_in, tmp_path, case):  # noqa: F811
    """Threads take experts in plan order but finish in any order; each tensor lands at its planned
    offset, so one thread and four write the same bytes, across several shards."""
    family, dtype, kw = case
    dense = dense_in(family, dtype)
    kw = {"verify": "none", **kw, "num_experts": 24 * kw["top_k"], "max_shard_mb": 1}
    written = {}
    for threads in (1, 4):
        up = Upcycler(str(dense), UpcycleConfig(**kw), seed=0)  # type: ignore[arg-type]
        try:
            (tmp_path / str(threads)).mkdir()
            up.write(tmp_path / str(threads), progress=False, threads=threads)
        finally:
            up.close()
        written[threads] = weights(tmp_path / str(threads))
    assert len(written[1]) > 2  # several shards and their index
    assert written[1] == written[4]
