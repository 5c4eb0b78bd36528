"""Hugging Face checkpoint folders: reading a dense one, writing a new one atomically.

Weights are read from safetensors only; a folder with nothing but ``pytorch_model.bin`` (a pickle)
is refused rather than unpickled.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from moe_adapt.checkpoint.safetensors_io import SafetensorsReader, TensorInfo
from moe_adapt.errors import CheckpointError

SIDE_FILES = (
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
"""Files copied from the source checkpoint next to the new weights (tokenizer, generation config)."""


class HFCheckpoint:
    """A local Hugging Face checkpoint folder: ``config.json`` plus safetensors weights.

    Tensors are read one at a time (:meth:`get`); shapes and dtypes come from the headers alone.
    """

    def __init__(self, path: str | os.PathLike[str], what: str = "checkpoint"):
        self.path = Path(path)
        self.what = what
        if not self.path.exists():
            raise CheckpointError(
                f"{what}={self.path} does not exist: give a local Hugging Face checkpoint folder"
            )
        if not self.path.is_dir():
            raise CheckpointError(
                f"{what}={self.path} is a file: give the checkpoint folder that holds config.json"
            )
        config_file = self.path / "config.json"
        if not config_file.is_file():
            raise CheckpointError(
                f"{what}={self.path} has no config.json: not a Hugging Face checkpoint folder"
            )
        try:
            self.config: dict[str, Any] = json.loads(config_file.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{config_file} is not valid JSON: {e}") from None
        self.files = self._weight_files()
        self._readers: dict[str, SafetensorsReader] = {}
        self.index: dict[str, tuple[str, TensorInfo]] = {}
        for file in self.files:
            reader = self._reader(file)
            for name, info in reader.tensors.items():
                self.index[name] = (file, info)

    def _weight_files(self) -> list[str]:
        index_file = self.path / "model.safetensors.index.json"
        if index_file.is_file():
            try:
                weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
            except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index_file} is corrupt: {e}") from None
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.path / f).is_file()]
            if missing:
                raise CheckpointError(f"{index_file} lists {missing[0]}, which is missing from {self.path}")
            return files
        if (self.path / "model.safetensors").is_file():
            return ["model.safetensors"]
        if any(self.path.glob("*.bin")) or any(self.path.glob("*.pt")):
            raise CheckpointError(
                f"{self.what}={self.path} holds only pickle weights (*.bin/*.pt); "
                "moe_adapt reads safetensors "
                "only, since unpickling can run arbitrary code. Convert it once with "
                "model.save_pretrained(dir, safe_serialization=True) in an environment you trust"
            )
        raise CheckpointError(
            f"{self.what}={self.path} has no model.safetensors or model.safetensors.index.json"
        )

    def _reader(self, file: str) -> SafetensorsReader:
        if file not in self._readers:
            self._readers[file] = SafetensorsReader(self.path / file)
        return self._readers[file]

    def info(self, name: str) -> TensorInfo:
        return self.index[name][1]

    def get(self, name: str) -> torch.Tensor:
        """Read one tensor (fresh memory, not an mmap view)."""
        try:
            file, _ = self.index[name]
        except KeyError:
            raise CheckpointError(f"{self.path} has no tensor {name!r}") from None
        return self._reader(file).get(name)

    def __contains__(self, name: str) -> bool:
        return name in self.index

    def close(self) -> None:
        for r in self._readers.values():
            r.close()
        self._readers.clear()

    def copy_side_files(self, dest: Path) -> list[str]:
        """Copy the tokenizer and generation config next to new weights; returns what was copied."""
        copied = []
        for name in SIDE_FILES:
            if (self.path / name).is_file():
                shutil.copy2(self.path / name, dest / name)
                copied.append(name)
        return copied
