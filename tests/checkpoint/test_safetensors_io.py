"""Streaming safetensors I/O round-trips through the safetensors library and transformers."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moe_adapt.checkpoint.safetensors_io import PlannedTensor, SafetensorsReader, ShardedWriter, plan_shards
from moe_adapt.errors import CheckpointError
from moe_adapt.fs import atomic_dir


def sample():
    torch.manual_seed(0)
    return {
        "a": torch.randn(3, 5),
        "b": torch.randn(7).to(torch.bfloat16),
        "c": torch.arange(10, dtype=torch.int64).reshape(2, 5),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(3.5, dtype=torch.float16),
    }


def test_reader_reads_library_files(tmp_path):
    tensors = sample()
    save_file(tensors, tmp_path / "x.safetensors")
    with SafetensorsReader(tmp_path / "x.safetensors") as r:
        for k, v in tensors.items():
            assert torch.equal(r.get(k), v) and r.get(k).dtype == v.dtype


@pytest.mark.parametrize("max_bytes", [10**9, 64])
def test_writer_output_loads_with_the_library(tmp_path, max_bytes):
    tensors = sample()
    plan = [PlannedTensor(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    w = ShardedWriter(tmp_path, plan, max_bytes)
    for k, v in tensors.items():
        w.write(k, v)
    weight_map = w.close()
    files = sorted({*weight_map.values()})
    assert (len(files) > 1) == (max_bytes == 64)
    assert (tmp_path / "model.safetensors.index.json").exists() == (len(files) > 1)
    if len(files) > 1:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert index["weight_map"] == weight_map
        assert index["metadata"]["total_size"] == sum(p.nbytes for p in plan)
    for k, v in tensors.items():
        with safe_open(str(tmp_path / weight_map[k]), framework="pt") as f:
            assert torch.equal(f.get_tensor(k), v)
            assert f.metadata() == {"format": "pt"}


def test_writer_refuses_out_of_plan_tensors(tmp_path):
    w = ShardedWriter(tmp_path, [PlannedTensor("a", torch.float32, (2,))], 100)
    with pytest.raises(ValueError, match="expected a"):
        w.write("a", torch.zeros(3))
    with pytest.raises(ValueError, match="'b' was not planned"):
        w.write("b", torch.zeros(2))
    w.write("a", torch.zeros(2))
    with pytest.raises(ValueError, match="written already"):
        w.write("a", torch.zeros(2))
    w.close()
    w2 = ShardedWriter(tmp_path, [PlannedTensor("a", torch.float32, (2,))], 100)
    with pytest.raises(ValueError, match="never written"):
        w2.close()


def test_writer_takes_tensors_in_any_order_from_several_threads(tmp_path):
    """Each tensor goes to its planned offset: reversed and concurrent writes give the same files."""
    from concurrent.futures import ThreadPoolExecutor

    torch.manual_seed(0)
    tensors = {f"t{i}": torch.randn(i + 1, 17).to(torch.bfloat16) for i in range(40)}
    plan = [PlannedTensor(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    (tmp_path / "ordered").mkdir()
    (tmp_path / "threads").mkdir()
    w = ShardedWriter(tmp_path / "ordered", plan, 4096)
    for k, v in tensors.items():
        w.write(k, v)
    w.close()
    w = ShardedWriter(tmp_path / "threads", plan, 4096)
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda k: w.write(k, tensors[k]), reversed(list(tensors))))
    w.close()
    ordered = {f.name: f.read_bytes() for f in (tmp_path / "ordered").iterdir()}
    assert len(ordered) > 3
    assert ordered == {f.name: f.read_bytes() for f in (tmp_path / "threads").iterdir()}


def test_plan_shards_keeps_order_and_limit():
    plan = [PlannedTensor(str(i), torch.float32, (10,)) for i in range(10)]  # 40 bytes each
    shards = plan_shards(plan, 100)
    assert [len(s) for s in shards] == [2, 2, 2, 2, 2]
    assert [t.name for s in shards for t in s] == [t.name for t in plan]


def test_reader_rejects_a_truncated_file(tmp_path):
    save_file(sample(), tmp_path / "x.safetensors")
    data = (tmp_path / "x.safetensors").read_bytes()
    (tmp_path / "x.safetensors").write_bytes(data[:-3])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        SafetensorsReader(tmp_path / "x.safetensors")


def test_atomic_dir_keeps_the_old_output_when_the_body_fails(tmp_path):
    final = tmp_path / "out"
    with atomic_dir(final) as d:
        (d / "f").write_text("one")
    with pytest.raises(RuntimeError), atomic_dir(final) as d:
        (d / "f").write_text("two")
        raise RuntimeError("crash")
    assert (final / "f").read_text() == "one"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with atomic_dir(final) as d:
        (d / "f").write_text("three")
    assert (final / "f").read_text() == "three" and [p.name for p in tmp_path.iterdir()] == ["out"]
