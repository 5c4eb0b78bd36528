"""The trainer-checkpoint format: a folder ``step_NNNNNN/`` holding ``tensors.safetensors`` (every
tensor of the trainer state) and ``state.json`` (the rest, with ``{"__tensor__": "<key>"}`` where a
tensor was). Nothing is pickled, so loading a checkpoint never runs code. A sharded engine adds a
folder ``engine/`` that its ranks write together (see :mod:`moe_adapt.train.callbacks`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from moe_adapt.errors import CheckpointError, MoEAdaptError
from moe_adapt.fs import atomic_dir, atomic_write_json

TENSORS_FILE = "tensors.safetensors"
STATE_FILE = "state.json"
ENGINE_DIR = "engine"
"""Folder of a checkpoint that a sharded engine's ranks write together."""
_TENSOR_TAG = "__tensor__"
_STEP_DIR = re.compile(r"^step_(\d{6,})$")
SHARED_TMP = re.compile(r"^\.step_(\d{6,})\.tmp-shared$")


# -- checkpoint files ---------------------------------------------------------------------------
def split_tensors(obj: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """Split a nested structure into a JSON-able skeleton and a flat ``{key: tensor}`` dict.

    Dict keys must be strings (JSON would silently turn other keys into strings).
    """
    tensors: dict[str, torch.Tensor] = {}

    def walk(x: Any, path: str) -> Any:
        if isinstance(x, torch.Tensor):
            tensors[path] = x.detach().cpu().contiguous()
            return {_TENSOR_TAG: path}
        if isinstance(x, dict):
            for k in x:
                if not isinstance(k, str):
                    raise MoEAdaptError(
                        f"checkpoint state key {k!r} under {path or '<root>'} is not a string"
                    )
            return {k: walk(v, f"{path}/{k}" if path else k) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return [walk(v, f"{path}/{i}") for i, v in enumerate(x)]
        if x is None or isinstance(x, bool | int | float | str):
            return x
        raise MoEAdaptError(
            f"checkpoint state at {path} has type {type(x).__name__}: not a tensor or JSON value"
        )

    return walk(obj, prefix), tensors


def join_tensors(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`split_tensors`."""
    if isinstance(skeleton, dict):
        if set(skeleton) == {_TENSOR_TAG}:
            key = skeleton[_TENSOR_TAG]
            if key not in tensors:
                raise CheckpointError(f"checkpoint names tensor {key!r} but {TENSORS_FILE} lacks it")
            return tensors[key]
        return {k: join_tensors(v, tensors) for k, v in skeleton.items()}
    if isinstance(skeleton, list):
        return [join_tensors(v, tensors) for v in skeleton]
    return skeleton


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` as ``tensors.safetensors`` + ``state.json`` into folder ``path``, atomically."""
    final = Path(path)
    with atomic_dir(final) as tmp:
        write_state_files(tmp, state)
    return final


def write_state_files(folder: Path, state: dict[str, Any]) -> None:
    """``tensors.safetensors`` + ``state.json`` of ``state`` into the existing ``folder``."""
    skeleton, tensors = split_tensors(state)
    save_file(tensors, str(folder / TENSORS_FILE))
    atomic_write_json(folder / STATE_FILE, skeleton)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a folder written by :func:`save_checkpoint`."""
    folder = Path(path)
    if not (folder / STATE_FILE).is_file() or not (folder / TENSORS_FILE).is_file():
        raise CheckpointError(
            f"{folder} is not a training checkpoint (needs {STATE_FILE} and {TENSORS_FILE})"
        )
    try:
        skeleton = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
        tensors = load_file(str(folder / TENSORS_FILE))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read checkpoint {folder}: {err}") from None
    state: dict[str, Any] = join_tensors(skeleton, tensors)
    return state


def list_checkpoints(root: str | Path) -> list[Path]:
    """``step_NNNNNN`` folders under ``root``, oldest step first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint folder under ``root``, or None."""
    complete = [p for p in list_checkpoints(root) if (p / STATE_FILE).is_file()]
    return complete[-1] if complete else None
