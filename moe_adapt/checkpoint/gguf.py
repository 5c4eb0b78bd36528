"""Import a GGUF file (llama.cpp's format) as a Hugging Face safetensors checkpoint folder.

transformers 5 loads a GGUF file (``from_pretrained(dir, gguf_file=...)``) but refuses to
``save_pretrained`` the result, and it dequantizes the whole model in memory first. The rest of
moe_adapt reads HF folders, so this module writes one, **tensor by tensor**: each GGUF tensor is
dequantized on its own (``gguf.dequantize``), llama.cpp's rotary permutation of the query and key
rows is undone for the ``llama`` architecture (which llama.cpp also uses for Mistral), and the
tensor goes straight to :class:`~moe_adapt.checkpoint.safetensors_io.ShardedWriter`. Peak memory is
about one dequantized tensor plus the pages of the GGUF file the OS keeps mapped (file-backed, so
reclaimable). The folder appears in one rename (:func:`moe_adapt.fs.atomic_dir`).

The config and the tokenizer come from transformers' own GGUF metadata parsing (``AutoConfig`` and
``AutoTokenizer`` with ``gguf_file=``, which read no tensors), so the folder loads with vanilla
transformers exactly as transformers' GGUF loader would build the model.

Command line::

    python -m moe_adapt.checkpoint.gguf SRC.gguf DEST_DIR [--dtype float32|bfloat16|float16]
        [--max-shard-mb 2048] [--force]

Needs the ``gguf`` package: ``pip install 'moe-adapt[gguf]'``.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moe_adapt.checkpoint.hf import DTYPES
from moe_adapt.checkpoint.safetensors_io import PlannedTensor, ShardedWriter
from moe_adapt.errors import CheckpointError
from moe_adapt.fs import atomic_dir

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")
"""GGUF ``general.architecture`` values imported (llama.cpp writes Mistral models as ``llama``):
the dense families moe_adapt upcycles."""

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_IGNORED = ("rope_freqs.weight",)
"""Tensors transformers' GGUF loader ignores too (llama 3's rope factors: the config's job)."""


def hf_name(gguf_name: str) -> str | None:
    """The transformers parameter name of a GGUF tensor of a llama/qwen2/qwen3 model; None for a
    tensor that is not imported (:data:`_IGNORED`).

    Raises:
        CheckpointError: a tensor this importer does not know (an unsupported layout).
    """
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    if gguf_name in _IGNORED:
        return None
    m = _BLOCK.fullmatch(gguf_name)
    if m and m[2] in _BLOCK_NAMES:
        return f"model.layers.{m[1]}.{_BLOCK_NAMES[m[2]]}.{m[3]}"
    raise CheckpointError(f"GGUF tensor {gguf_name!r} has no Hugging Face counterpart in this importer")


def unpermute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's ``permute`` of the q/k rows (its convert script interleaves the two rotary
    halves of each head; transformers' rotate_half wants them as halves)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@dataclass
class ImportReport:
    """What :func:`import_gguf` wrote."""

    dest: Path
    model_type: str
    tensors: int
    parameters: int
    bytes_written: int
    seconds: float
    quant_types: dict[str, int]


def _field(reader: Any, key: str) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return None
    return field.contents()


def _require_gguf() -> Any:
    try:
        import gguf
    except ImportError:
        raise CheckpointError(
            "importing a GGUF file needs the gguf package: pip install 'moe-adapt[gguf]'"
        ) from None
    return gguf


def import_gguf(
    src: str | Path,
    dest: str | Path,
    *,
    dtype: torch.dtype = torch.float32,
    max_shard_bytes: int = 2048 * 2**20,
    force: bool = False,
) -> ImportReport:
    """Write the GGUF file ``src`` as an HF checkpoint folder ``dest`` (config.json, safetensors
    weights in ``dtype``, tokenizer files, generation_config.json), one tensor at a time.

    Raises:
        CheckpointError: ``src`` is missing or not a GGUF file of a supported architecture, ``dest``
            exists and ``force`` is false, or the ``gguf`` package is missing.
    """
    gguf = _require_gguf()
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    start = time.perf_counter()
    src, dest = Path(src), Path(dest)
    if not src.is_file():
        raise CheckpointError(f"GGUF file {src} does not exist")
    if dest.exists() and not force:
        raise CheckpointError(f"{dest} exists: remove it or pass --force to replace it")
    try:
        reader = gguf.GGUFReader(str(src))
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{src} is not a readable GGUF file: {e}") from None
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise CheckpointError(
            f"{src}: GGUF architecture {arch!r} is not imported "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )

    # Config and tokenizer: transformers' parsing of the GGUF metadata (reads no tensors).
    where: dict[str, Any] = dict(
        pretrained_model_name_or_path=str(src.parent), gguf_file=src.name, local_files_only=True
    )
    config = AutoConfig.from_pretrained(**where)
    config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    config.dtype = dtype
    tokenizer = AutoTokenizer.from_pretrained(**where)

    plan: list[tuple[Any, str]] = []
    for t in reader.tensors:
        name = hf_name(t.name)
        if name is None:
            log.warning("%s: tensor %s is not imported (transformers ignores it too)", src, t.name)
            continue
        plan.append((t, name))
    if config.tie_word_embeddings != all(n != "lm_head.weight" for _, n in plan):
        raise CheckpointError(f"{src}: tie_word_embeddings disagrees with the presence of output.weight")
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    q_rows = next((int(t.shape[1]) for t, n in plan if n == "model.layers.0.self_attn.q_proj.weight"), None)
    if q_rows is not None and q_rows // heads != getattr(config, "head_dim", None):
        # transformers reads no head size for qwen2/qwen3 GGUFs and keeps its class default (qwen3: 128);
        # the query projection's rows say what it is
        log.info("%s: head_dim %s from the query projection's shape", src, q_rows // heads)
        config.head_dim = q_rows // heads

    quant_types: dict[str, int] = {}
    parameters = 0
    with atomic_dir(dest) as tmp:
        writer = ShardedWriter(
            tmp,
            [PlannedTensor(n, dtype, tuple(int(d) for d in reversed(t.shape))) for t, n in plan],
            max_shard_bytes,
        )
        for t, name in plan:
            w = gguf.dequantize(t.data, t.tensor_type)  # numpy, rows first: the HF layout
            if arch == "llama" and (".attn_q." in t.name or ".attn_k." in t.name):
                w = unpermute_rotary(w, heads if ".attn_q." in t.name else kv_heads)
            w = np.asarray(w, dtype=np.float32)
            if np.may_share_memory(w, t.data):  # an F32 tensor comes back as a view of the mapped file
                w = w.copy()
            tensor = torch.from_numpy(w).to(dtype)
            writer.write(name, tensor)
            parameters += tensor.numel()
            quant_types[t.tensor_type.name] = quant_types.get(t.tensor_type.name, 0) + 1
            del w, tensor
        writer.close()
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        generation = GenerationConfig.from_model_config(config)
        generation.save_pretrained(tmp)
        (tmp / "gguf_import.json").write_text(
            json.dumps(
                {"source": str(src.absolute()), "architecture": arch, "quant_types": quant_types},
                indent=2,
            )
            + "\n"
        )
    return ImportReport(
        dest=dest,
        model_type=config.model_type,
        tensors=len(plan),
        parameters=parameters,
        bytes_written=writer.total_bytes,
        seconds=time.perf_counter() - start,
        quant_types=quant_types,
    )


def import_into_run(src: str | Path, run_dir: str | Path) -> Path:
    """``model.dense=FILE.gguf``: the HF folder ``<run_dir>/import/<stem>/`` imported from ``src``, made
    by :func:`import_gguf` unless an earlier run made it from the same file (path, size and mtime,
    recorded in its ``gguf_import.json``)."""
    src = Path(src)
    dest = Path(run_dir) / "import" / src.stem
    if not src.is_file():
        raise CheckpointError(f"model.dense={src} does not exist (a .gguf file is imported into {dest})")
    stat = src.stat()
    origin = {"source": str(src.absolute()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    record = dest / "gguf_import.json"
    try:
        done = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        done = None
    if isinstance(done, dict) and all(done.get(k) == v for k, v in origin.items()):
        log.info("model.dense: %s was imported from %s already", dest, src)
        return dest
    log.info("model.dense: importing %s into %s", src, dest)
    report = import_gguf(src, dest, force=True)
    done = json.loads(record.read_text(encoding="utf-8"))
    (dest / "gguf_import.json").write_text(json.dumps(done | origin, indent=2) + "\n")
    log.info(
        "model.dense: %d tensors, %.1f MiB in %.1f s",
        report.tensors,
        report.bytes_written / 2**20,
        report.seconds,
    )
    return dest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m moe_adapt.checkpoint.gguf",
        description="Import a GGUF file as a Hugging Face safetensors checkpoint folder (tensor by tensor).",
    )
    parser.add_argument("src", help="the .gguf file")
    parser.add_argument("dest", help="the checkpoint folder to write (must not exist, unless --force)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weights' dtype")
    parser.add_argument("--max-shard-mb", type=int, default=2048, help="largest safetensors file (MiB)")
    parser.add_argument("--force", action="store_true", help="replace DEST if it exists")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        report = import_gguf(
            args.src,
            args.dest,
            dtype=DTYPES[args.dtype],
            max_shard_bytes=args.max_shard_mb * 2**20,
            force=args.force,
        )
    except CheckpointError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(
        f"wrote {report.dest} ({report.model_type}, {report.tensors} tensors, "
        f"{report.parameters:,} parameters, "
        f"{report.bytes_written / 2**20:.1f} MiB) in {report.seconds:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
