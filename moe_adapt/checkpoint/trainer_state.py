"""The trainer-checkpoint format: a folder ``step_NNNNNN/`` holding ``tensors.safetensors`` (every
tensor of the trainer state) and ``state.json`` (the rest, with ``{"__tensor__": "<key>"}`` where a
tensor was). Nothing is pickled, so loading a checkpoint never runs code. A sharded engine adds a
folder ``engine/`` that its ranks write together (see :mod:`moe_adapt.train.callbacks`).

A run resumes from the newest *intact* checkpoint (:func:`latest_checkpoint`): each candidate's files
are opened and checked (:func:`checkpoint_problem`: ``state.json`` parses and holds the expected keys,
the safetensors header is whole and fits the file, every tensor ``state.json`` names is there), and a
damaged one (a disk that filled up, a copy cut short) is logged as a warning, renamed
``damaged-step_NNNNNN`` (so pruning never keeps it in place of a good one) and passed over for the one
before it.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from moe_adapt.checkpoint.safetensors_io import SafetensorsReader
from moe_adapt.errors import CheckpointError, MoEAdaptError
from moe_adapt.fs import atomic_dir, atomic_write_json

log = logging.getLogger(__name__)

TENSORS_FILE = "tensors.safetensors"
STATE_FILE = "state.json"
ENGINE_DIR = "engine"
"""Folder of a checkpoint that a sharded engine's ranks write together."""
DAMAGED_PREFIX = "damaged-"
"""A damaged checkpoint ``step_NNNNNN`` is renamed ``damaged-step_NNNNNN``: kept to look at, never resumed."""
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
    problem = checkpoint_problem(folder)
    if problem is not None:
        raise CheckpointError(f"cannot read checkpoint {folder}: {problem}")
    try:
        skeleton = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
        tensors = load_file(str(folder / TENSORS_FILE))
    except (OSError, ValueError, SafetensorError) as err:
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


def _tensor_keys(skeleton: Any) -> Iterable[str]:
    """The tensor keys a :func:`split_tensors` skeleton refers to."""
    if isinstance(skeleton, dict):
        if set(skeleton) == {_TENSOR_TAG}:
            yield str(skeleton[_TENSOR_TAG])
            return
        for v in skeleton.values():
            yield from _tensor_keys(v)
    elif isinstance(skeleton, list):
        for v in skeleton:
            yield from _tensor_keys(v)


def checkpoint_problem(folder: str | Path, keys: Iterable[str] = ()) -> str | None:
    """What is wrong with the checkpoint ``folder`` (one phrase), or None when it looks intact.

    Opens every file the checkpoint needs without loading the tensors: ``state.json`` must parse to
    an object holding ``keys``; ``tensors.safetensors`` must have a whole header whose tensors fit the
    file's size, and hold every tensor ``state.json`` names.
    """
    folder = Path(folder)
    state_file, tensors_file = folder / STATE_FILE, folder / TENSORS_FILE
    for needed in (state_file, tensors_file):
        if not needed.is_file():
            return f"{needed.name} is missing"
    try:
        skeleton = json.loads(state_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return f"{STATE_FILE} is not valid JSON ({err})"
    if not isinstance(skeleton, dict):
        return f"{STATE_FILE} is not a JSON object"
    missing = [k for k in keys if k not in skeleton]
    if missing:
        return f"{STATE_FILE} lacks {', '.join(missing)}"
    try:
        with SafetensorsReader(tensors_file) as reader:
            names = set(reader.tensors)
    except CheckpointError as err:
        return str(err).replace(f"{tensors_file} ", f"{TENSORS_FILE} ", 1)
    absent = sorted(set(_tensor_keys(skeleton)) - names)
    if absent:
        return f"{TENSORS_FILE} lacks tensor {absent[0]!r} that {STATE_FILE} names"
    return None


def latest_checkpoint(
    root: str | Path, problem: Callable[[Path], str | None] = checkpoint_problem
) -> Path | None:
    """The newest intact checkpoint folder under ``root``, or None.

    ``problem(folder)`` says what is wrong with a candidate (:func:`checkpoint_problem` by default; the
    trainer adds its keys and the engine's folder). A damaged one is logged as a warning naming it and
    the problem, renamed ``damaged-step_NNNNNN`` (call this on one process only) and passed over for
    the one before it; when every checkpoint is damaged, a warning says training starts from scratch.
    """
    found = list_checkpoints(root)
    damaged = 0
    for folder in reversed(found):
        what = problem(folder)
        if what is None:
            if damaged:
                log.warning("resuming from %s, the newest intact checkpoint", folder)
            return folder
        damaged += 1
        aside = folder.with_name(DAMAGED_PREFIX + folder.name)
        log.warning(
            "checkpoint %s is damaged: %s; setting it aside as %s and falling back to the one before it",
            folder, what, aside.name,
        )  # fmt: skip
        if aside.exists():
            aside = aside.with_name(f"{aside.name}-{os.getpid()}")
        try:
            os.replace(folder, aside)
        except OSError as err:
            raise CheckpointError(
                f"checkpoint {folder} is damaged ({what}) and cannot be set aside ({err}): remove it"
            ) from None
    if damaged:
        log.warning("no intact checkpoint in %s (%d damaged): training starts from scratch", root, damaged)
    return None
