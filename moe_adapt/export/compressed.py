"""Write a compressed model as a **compressed-tensors** checkpoint (the format vLLM and transformers'
compressed-tensors integration load), with the ``compressed-tensors`` package's own compressors.

- quantized (``gptq``): ``config.json`` gets ``quantization_config`` (``quant_method:
  compressed-tensors``, one config group targeting ``Linear``; ``lm_head`` and the routers ignored),
  and each quantized matrix is stored by ``PackedQuantizationCompressor`` (``pack-quantized``, W4A16
  and W8A16: integers packed in int32 words, ``weight_packed`` + ``weight_scale`` + ``weight_shape``)
  or ``IntQuantizationCompressor`` (``int-quantized``, W8A8: int8 ``weight`` + ``weight_scale``);
- sparse (``sparsegpt``, ``wanda``): dense weights (zeros stored) with a ``sparsity_config``
  (``format: dense``, the structure and the measured global sparsity).

The model is written by ``save_pretrained`` (so the tensor names are the checkpoint's own: per-expert
``experts.<e>.w1`` / ``gate_proj`` ... where transformers fuses them in memory), then every quantized
matrix is replaced by its compressed tensors; the integers are taken from the float32 weights, so
they are exact. Non-quantized tensors and scales are cast back to the source's dtype. Everything goes
to a temporary folder renamed at the end; a matrix whose scales cannot be placed is an error, and
nothing is left behind.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch

from moe_adapt.checkpoint.hf import SIDE_FILES
from moe_adapt.errors import MoEAdaptError
from moe_adapt.export.gptq import Scheme
from moe_adapt.fs import atomic_dir

__all__ = ["IGNORE", "check_compressed_tensors", "write_compressed"]

IGNORE = ["lm_head", "re:.*mlp.gate$", "re:.*block_sparse_moe.gate$", "re:.*shared_expert_gate$"]
"""Linear modules left in float (what vLLM's MoE loaders expect unquantized)."""

_EXTRA_FILES = ("router_bias.json",)
_EXPERT = re.compile(
    r"^(.*)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(w1|w2|w3|gate_proj|up_proj|down_proj)\.weight$"
)


def check_compressed_tensors() -> str:
    """The installed compressed-tensors version; refused in one line when it is missing."""
    try:
        import compressed_tensors
    except ImportError as err:
        raise MoEAdaptError(
            f"export.methods: gptq, sparsegpt and wanda write compressed-tensors checkpoints and need the "
            f"compressed-tensors package ({err}); pip install 'moe-adapt[export]'"
        ) from None
    return str(compressed_tensors.__version__)


def _scheme(scheme: Scheme, group_size: int) -> Any:
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    if scheme.grouped:
        w = QuantizationArgs(
            num_bits=scheme.bits, type="int", symmetric=True, strategy="group", group_size=group_size
        )
    else:
        w = QuantizationArgs(num_bits=scheme.bits, type="int", symmetric=True, strategy="channel")
    act = None
    if scheme.act_bits:
        act = QuantizationArgs(
            num_bits=scheme.act_bits, type="int", symmetric=True, strategy="token", dynamic=True
        )
    return QuantizationScheme(targets=["Linear"], weights=w, input_activations=act)


def _scale_for(key: str, scales: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The scales of the on-disk weight ``key`` (``...weight``), or None when it was not quantized."""
    base = key[: -len(".weight")]
    if base in scales:
        return scales[base]
    m = _EXPERT.match(key)
    if m is None:
        return None
    pre, e, which = m.groups()
    if which in ("w2", "down_proj"):
        return scales.get(f"{pre}.mlp.experts.down_proj.{e}")
    s = scales.get(f"{pre}.mlp.experts.gate_up_proj.{e}")
    if s is None:
        return None
    half = s.shape[0] // 2
    return s[:half] if which in ("w1", "gate_proj") else s[half:]


def _dtype(src: Path) -> torch.dtype:
    cfg = json.loads((src / "config.json").read_text())
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return getattr(torch, str(name), torch.float32)


def write_compressed(
    model: Any,
    src: str | Path,
    dst: str | Path,
    *,
    scheme: Scheme | None = None,
    group_size: int = 128,
    scales: dict[str, torch.Tensor] | None = None,
    sparsity: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Save ``model`` (compressed in memory, float32) at ``dst`` as a compressed-tensors checkpoint:
    quantized with ``scheme`` and ``scales`` ({weight name without ``.weight`` (an expert slice
    ``<experts>.gate_up_proj.<e>``): scales}), or sparse with ``sparsity`` ({structure,
    global_sparsity}). Returns ``{format, compressed_tensors, quantized_matrices}``."""
    import compressed_tensors
    from compressed_tensors.compressors.naive_quantized.base import IntQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from safetensors import safe_open
    from safetensors.torch import save_file

    src, dst = Path(src), Path(dst)
    dtype = _dtype(src)
    scales = scales or {}
    n_quant = 0
    qcfg: dict[str, Any] = {"quant_method": "compressed-tensors", "version": compressed_tensors.__version__}
    fmt = "dense"
    with atomic_dir(dst) as tmp:
        model.save_pretrained(str(tmp), safe_serialization=True)
        for name in (*SIDE_FILES, *_EXTRA_FILES):
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
        if scheme is not None:
            ct_scheme = _scheme(scheme, group_size)
            # weight-only schemes packed (as llm-compressor writes W4A16/W8A16), W8A8 as int8 tensors
            comp = IntQuantizationCompressor if scheme.act_bits else PackedQuantizationCompressor
            fmt = "int-quantized" if scheme.act_bits else "pack-quantized"
        weight_map: dict[str, str] = {}
        for file in sorted(tmp.glob("*.safetensors")):
            out: dict[str, torch.Tensor] = {}
            with safe_open(str(file), "pt") as f:
                for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    t = f.get_tensor(key)
                    s = _scale_for(key, scales) if scheme is not None else None
                    if s is None:
                        out[key] = t.to(dtype) if t.is_floating_point() else t
                        continue
                    n_quant += 1
                    s2 = s.float().reshape(t.shape[0], -1)
                    parts = comp.compress({"weight": t.float(), "weight_scale": s2}, ct_scheme)
                    for n, v in parts.items():
                        v = v.to(dtype) if n == "weight_scale" else v
                        out[key[: -len("weight")] + n] = v.contiguous()
            save_file(out, str(file), metadata={"format": "pt"})
            weight_map |= {k: file.name for k in out}
        index = tmp / "model.safetensors.index.json"
        if index.is_file():
            doc = json.loads(index.read_text())
            doc["weight_map"] = weight_map
            index.write_text(json.dumps(doc, indent=2))
        if scheme is not None:
            expect = sum(2 if ".gate_up_proj." in k else 1 for k in scales)
            if n_quant != expect or not expect:
                raise MoEAdaptError(
                    f"export: {n_quant} checkpoint tensors of {dst} matched the {expect} quantized matrices "
                    "(a weight layout this writer does not know); nothing written"
                )
            from compressed_tensors.quantization import QuantizationConfig

            qc = QuantizationConfig(
                config_groups={"group_0": ct_scheme},
                format=fmt,
                quantization_status="compressed",
                ignore=IGNORE,
            ).model_dump(exclude={"quant_method"})
            qcfg |= qc | {"sparsity_config": {}}
        if sparsity is not None:
            from compressed_tensors.config import DenseSparsityConfig

            qcfg |= {"format": "dense", "config_groups": {}, "quantization_status": "compressed"}
            qcfg["sparsity_config"] = DenseSparsityConfig(
                global_sparsity=sparsity["global_sparsity"],
                sparsity_structure=sparsity["structure"],
                targets=["Linear"],
                ignore=IGNORE,
            ).model_dump()
        cfg = json.loads((tmp / "config.json").read_text())
        cfg["quantization_config"] = qcfg
        cfg["dtype"] = str(dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    return {
        "format": fmt,
        "compressed_tensors": compressed_tensors.__version__,
        "quantized_matrices": n_quant,
    }


def dequantized_checkpoint(folder: str | Path, dest: str | Path) -> Path:
    """An HF folder at ``dest`` with the weights of the compressed-tensors checkpoint ``folder``
    decompressed to float by compressed-tensors' own compressors (and no ``quantization_config``):
    what the artefact computes, weights-wise, for a model transformers cannot load compressed
    (transformers 5.23 does not fuse int-quantized MoE experts). Per-token activation quantization
    (W8A8) is not applied in this copy."""
    from compressed_tensors.compressors.naive_quantized.base import IntQuantizationCompressor
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors import safe_open
    from safetensors.torch import save_file

    folder, dest = Path(folder), Path(dest)
    cfg = json.loads((folder / "config.json").read_text())
    q = cfg.pop("quantization_config")
    groups = q.get("config_groups") or {}
    scheme = QuantizationScheme.model_validate(next(iter(groups.values()))) if groups else None
    comp = PackedQuantizationCompressor if q.get("format") == "pack-quantized" else IntQuantizationCompressor
    dest.mkdir(parents=True, exist_ok=True)
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            sd = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        out: dict[str, torch.Tensor] = {}
        for key, t in sd.items():
            if key.endswith(".weight_scale") and scheme is not None:
                base = key[: -len("weight_scale")]
                parts = {
                    k[len(base) :]: v
                    for k, v in sd.items()
                    if k.startswith(base) and "." not in k[len(base) :]
                }
                out[base + "weight"] = comp.decompress(parts, scheme)["weight"].float().contiguous()
            elif not key.endswith((".weight_packed", ".weight_shape")) and not (
                scheme is not None
                and key.endswith(".weight")
                and key[: -len("weight")] + "weight_scale" in sd
            ):
                out[key] = t
        save_file(out, str(dest / file.name), metadata={"format": "pt"})
    (dest / "config.json").write_text(json.dumps(cfg, indent=2))
    for name in (*SIDE_FILES, *_EXTRA_FILES, "model.safetensors.index.json"):
        if (folder / name).is_file():
            shutil.copy2(folder / name, dest / name)
    return dest
