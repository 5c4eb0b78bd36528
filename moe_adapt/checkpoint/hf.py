"""Hugging Face checkpoint folders: reading a dense one tensor by tensor, loading a causal LM whole,
the dtype names of the configs and the side files copied beside new weights.

Weights are read from safetensors only; a folder with nothing but ``pytorch_model.bin`` (a pickle)
is refused rather than unpickled. :func:`load_causal_lm` is the one place a transformers model is
loaded from a folder (engines, teacher, evaluation, verification, the difficulty scorer's reference
model). Code shipped with a checkpoint runs only with ``model.trust_remote_code=true``, and then with
a warning (:func:`warn_remote_code`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError

from moe_adapt.checkpoint.router_bias import load_router_bias
from moe_adapt.checkpoint.safetensors_io import FileBytes, SafetensorsReader, TensorInfo
from moe_adapt.errors import CheckpointError, config_error

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}
"""Parameter dtypes by the names the configs use (``engine.dtype``, ``upcycle.dtype``, ``eval.dtype``)."""

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "added_tokens.json",
)
"""The tokenizer's files of an HF checkpoint folder: the engines copy them beside the weights they
export (``save_pretrained`` writes the model config and generation config itself)."""

SIDE_FILES = ("generation_config.json", *TOKENIZER_FILES, "chat_template.json")
"""Files copied from the source checkpoint next to the new weights (tokenizer, generation config)."""


def pickle_only_error(what: str, path: str | Path) -> CheckpointError:
    """The error for a checkpoint folder whose weights are pickles (``pytorch_model.bin``, ``*.pt``)."""
    return CheckpointError(
        f"{what}={path} holds only pickle weights (*.bin/*.pt); moe_adapt reads safetensors only, since "
        "unpickling can run arbitrary code. Convert it once, in an environment you trust: "
        "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)"
    )


_warned_remote_code: set[str] = set()
"""The checkpoints :func:`warn_remote_code` has warned about in this process."""


def warn_remote_code(path: str | Path) -> None:
    """Log a warning, once per process and checkpoint, that the checkpoint's own Python code will run
    (``trust_remote_code=True`` reaches transformers)."""
    where = str(Path(path).absolute())
    if where in _warned_remote_code:
        return
    _warned_remote_code.add(where)
    log.warning(
        "model.trust_remote_code=true: the Python code shipped with the checkpoint %s will run in this "
        "process, with your permissions; use it only with checkpoints whose code you have read or trust",
        where,
    )


def check_seq_len(key: str, seq_len: int, model: str | os.PathLike[str], what: str) -> None:
    """Refuse a sequence length the model was not built for: ``seq_len`` above the
    ``max_position_embeddings`` of ``model``'s config.json (the stages call this before training, so
    the error is one line naming the setting, not a crash inside the model or a silent extrapolation).

    ``key`` is the setting that gave ``seq_len`` (``mixture.seq_len``), ``what`` the one that names the
    model (``cpt.init_from``). A folder without a readable config.json, or a config without the field,
    passes: loading the model reports those.

    Raises:
        MoEAdaptConfigError: ``KEY=SEQ_LEN is invalid: must be <= max_position_embeddings=N of WHAT=PATH``.
    """
    try:
        config = json.loads((Path(model) / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return
    limit = config.get("max_position_embeddings") if isinstance(config, dict) else None
    if isinstance(limit, int) and not isinstance(limit, bool) and seq_len > limit:
        allowed = f"must be <= max_position_embeddings={limit} of {what}={model} (its config.json)"
        raise config_error(key, seq_len, allowed)


def load_causal_lm(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    *,
    device: str | torch.device | None = None,
    router_bias: bool = True,
    trust_remote_code: bool = False,
    strict: bool = False,
    what: str = "checkpoint",
) -> PreTrainedModel:
    """A transformers causal LM from a local HF checkpoint folder (safetensors only; no download), in
    eval mode, on ``device`` (None: where transformers puts it, the CPU).

    With ``router_bias`` the router biases of aux-loss-free balancing are re-installed when the folder
    has ``router_bias.json``, so the model routes as in training (the engines read that file
    themselves and pass False). ``trust_remote_code`` runs the modelling code shipped with the
    checkpoint (``model.trust_remote_code``; a warning says so). With ``strict`` a missing, unexpected
    or mismatched tensor is an error. ``what`` names the setting that gave ``path`` in errors.

    Raises:
        CheckpointError: ``path`` is not a folder with ``config.json`` and safetensors weights, a
            weights file is truncated or corrupt (named), or transformers cannot load it.
    """
    from transformers import AutoModelForCausalLM

    folder = Path(path)
    if not folder.is_dir():
        raise CheckpointError(f"{what}={folder} does not exist or is not a directory")
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{what}={folder} is not an HF checkpoint folder (no config.json)")
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        if any(folder.glob("*.bin")) or any(folder.glob("*.pt")):
            raise pickle_only_error(what, folder)
        raise CheckpointError(
            f"{what}={folder} holds no .safetensors weights (only safetensors checkpoints are read)"
        )
    for file in weights:  # a truncated or corrupt file is named, not reported by safetensors' Rust
        SafetensorsReader(file).close()  # raises CheckpointError naming the file
    if trust_remote_code:
        warn_remote_code(folder)
    try:
        loaded: Any = AutoModelForCausalLM.from_pretrained(
            str(folder),
            dtype=dtype,
            local_files_only=True,
            use_safetensors=True,
            trust_remote_code=trust_remote_code,
            output_loading_info=strict,
        )
    except (OSError, ValueError, KeyError, SafetensorError) as err:
        raise CheckpointError(f"cannot load {what}={folder} as a causal LM: {err}") from err
    model, info = loaded if strict else (loaded, {})
    problems = {
        k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")
    }
    if problems:
        raise CheckpointError(f"{what}={folder} does not load cleanly in transformers: {problems}")
    if device is not None:
        model.to(device)
    if router_bias:
        load_router_bias(model, folder)
    model.eval()
    qc = getattr(model.config, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    if str(getattr(method, "value", method)) == "compressed-tensors":
        # compressed-tensors decompresses on the model's first forward (a hook on the top module);
        # callers that run its decoder alone (moe_adapt.eval.lm) would skip it: run it now
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=model.device), use_cache=False)
    return model  # type: ignore[no-any-return]


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
            raise pickle_only_error(self.what, self.path)
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

    def view(self, name: str) -> torch.Tensor:
        """One tensor mapped from its file (copy-on-write; :meth:`SafetensorsReader.view`)."""
        try:
            file, _ = self.index[name]
        except KeyError:
            raise CheckpointError(f"{self.path} has no tensor {name!r}") from None
        return self._reader(file).view(name)

    def file_bytes(self, name: str, rows: slice | None = None) -> FileBytes:
        """Where one tensor's bytes (or its rows ``rows``) are in its file, for the writer to copy
        unchanged (:meth:`SafetensorsReader.file_bytes`)."""
        try:
            file, _ = self.index[name]
        except KeyError:
            raise CheckpointError(f"{self.path} has no tensor {name!r}") from None
        return self._reader(file).file_bytes(name, rows)

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
