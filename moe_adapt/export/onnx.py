"""``onnx``: the causal LM as an ONNX graph for onnxruntime (and onnxruntime-web), fp32 and int4.

Exporter: ``torch.onnx.export(..., dynamo=True)`` (torch.export + onnxscript). Of transformers 5's
three MoE expert kernels only ``batched_mm`` exports: the default ``grouped_mm`` calls the custom op
``transformers.grouped_mm_fallback``, which has no ONNX function, and ``eager`` loops over the experts
that received tokens, a data-dependent shape torch.export refuses (``GuardOnDataDependentSymNode``).
``batched_mm`` gathers the top-k experts' weights per token and multiplies them in one batched
matmul: the same function, no data-dependent shape (docs/export.md has the exact errors). Its cost:
working memory of tokens × top-k × one expert's weights, so this path suits small models only. optimum's
ONNX exporter (optimum-onnx) pins transformers < 4.58 and cannot be installed beside our pins.

The graph takes ``input_ids`` (batch and length dynamic) and returns ``logits``; no KV cache (every
step recomputes the prefix). ``int4`` is onnxruntime's ``MatMulNBitsQuantizer`` (symmetric 4-bit
blocks, weight-only): it rewrites 2-D ``MatMul`` weights (attention, dense MLPs, shared experts,
``lm_head``). The routed experts are 3-D gathered tensors it does not take; they are stored as int4
with a blocked ``DequantizeLinear`` (opset 21) in front (:func:`_int4_experts`, ``export.onnx.experts``),
so they are 4-bit on disk and dequantized to float32 at run time.
Files: ``onnx/<type>/model.onnx`` (+ ``model.onnx.data`` for large models) with config and tokenizer.
"""

from __future__ import annotations

import gc
import logging
import os
import shutil
import tempfile
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from moe_adapt.checkpoint.hf import SIDE_FILES, load_causal_lm
from moe_adapt.errors import MoEAdaptError

log = logging.getLogger(__name__)

__all__ = ["OrtCausalLM", "check_onnx", "export_onnx"]

_EXTERNAL_BYTES = 1 << 30
"""Weights larger than this go to ``model.onnx.data`` (protobuf caps one file at 2 GiB)."""


def check_onnx() -> None:
    """Raise one line when onnx, onnxscript or onnxruntime is missing."""
    missing = []
    for mod in ("onnx", "onnxscript", "onnxruntime"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise MoEAdaptError(
            f"export.methods: onnx needs {', '.join(missing)} (not installed); pip install 'moe-adapt[onnx]'"
        )


class _Logits(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits  # type: ignore[no-any-return]


def _finish(tmp: Path, dst: Path, src: Path) -> None:
    for name in ("config.json", *SIDE_FILES):
        if (src / name).is_file():
            shutil.copy2(src / name, tmp / name)
    if dst.exists():
        shutil.rmtree(dst)
    os.replace(tmp, dst)


def _quantized_params(model_proto: Any) -> int:
    """Weights held by MatMulNBits nodes (K × N each)."""
    total = 0
    for node in model_proto.graph.node:
        if node.op_type == "MatMulNBits":
            attrs = {a.name: a.i for a in node.attribute}
            total += int(attrs["K"]) * int(attrs["N"])
    return total


def _int4_experts(proto: Any, num_experts: int, block_size: int) -> int:
    """Replace every float 3-D initializer ``[num_experts, out, in]`` (the routed experts, which
    MatMulNBits does not take) by a symmetric int4 tensor with one float scale per ``block_size``
    weights along ``in`` and a ``DequantizeLinear`` (opset 21, ``block_size``) that restores it at
    run time. Returns the weights so stored. The graph's default opset is raised to 21 (the ops of
    opsets 20 -> 21 only gained types)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    done = 0
    nodes = []
    for init in list(proto.graph.initializer):
        dims = list(init.dims)
        if not (
            len(dims) == 3
            and dims[0] == num_experts
            and dims[2] % block_size == 0
            and init.data_type == TensorProto.FLOAT
        ):
            continue
        w = numpy_helper.to_array(init).astype(np.float32)
        e, o, k = w.shape
        w_b = w.reshape(e, o, k // block_size, block_size)
        scale = np.abs(w_b).max(-1) / 7.0
        scale[scale == 0] = 1.0
        q = np.clip(np.rint(w_b / scale[..., None]), -8, 7).astype(np.int8).reshape(e, o, k)
        qname, sname = f"{init.name}_int4", f"{init.name}_int4_scale"
        proto.graph.initializer.remove(init)
        proto.graph.initializer.extend(
            [
                helper.make_tensor(qname, TensorProto.INT4, [e, o, k], q.reshape(-1).tolist()),
                numpy_helper.from_array(scale.astype(np.float32), sname),
            ]
        )
        nodes.append(
            helper.make_node(
                "DequantizeLinear",
                [qname, sname],
                [init.name],
                axis=-1,
                block_size=block_size,
                name=f"{init.name}_dequantize",
            )
        )
        done += e * o * k
    for node in reversed(nodes):
        proto.graph.node.insert(0, node)
    if nodes:
        for op in proto.opset_import:
            if op.domain in ("", "ai.onnx") and op.version < 21:
                op.version = 21
    return done


def export_onnx(
    src: str | Path, dst: str | Path, types: list[str], block_size: int = 32, experts_int4: bool = True
) -> dict[str, Any]:
    """Write ``dst/<type>/model.onnx`` for each of ``types`` from the HF checkpoint ``src``; each
    folder is written under a temporary name and renamed. Returns ``{types: {type: {...}}}``.

    Raises:
        MoEAdaptError: the exporter cannot take the model (its first error line).
    """
    import onnx

    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    model = load_causal_lm(src, torch.float32, device="cpu")
    n_params = sum(p.numel() for p in model.parameters())
    num_experts = int(
        getattr(model.config, "num_local_experts", None) or getattr(model.config, "num_experts", None) or 0
    )
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    if experts and hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("batched_mm")
    wrapped = _Logits(model).eval()
    external = n_params * 4 > _EXTERNAL_BYTES
    out: dict[str, Any] = {"exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}"}
    fp32_tmp = Path(tempfile.mkdtemp(dir=dst, prefix=".fp32."))
    try:
        example = torch.zeros((2, 8), dtype=torch.long)  # batch 2: a size-1 example dim would be fixed
        dim = torch.export.Dim.DYNAMIC
        try:
            program = torch.onnx.export(
                wrapped,
                (example,),
                dynamo=True,
                input_names=["input_ids"],
                output_names=["logits"],
                dynamic_shapes={"input_ids": {0: dim, 1: dim}},
            )
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise MoEAdaptError(
                f"export.methods: onnx cannot export {src} ({type(model).__name__}): "
                f"{type(err).__name__}: {first}"
            ) from None
        assert program is not None
        program.save(str(fp32_tmp / "model.onnx"), external_data=external)
        del program, wrapped, model
        gc.collect()
        info = {
            "params": n_params,
            "expert_params": experts,
            "quantized_params": 0,
            "expert_params_quantized": 0,
        }
        if "int4" in types:
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

            q = MatMulNBitsQuantizer(
                onnx.load(str(fp32_tmp / "model.onnx")), block_size=block_size, is_symmetric=True
            )
            q.process()
            int4_tmp = Path(tempfile.mkdtemp(dir=dst, prefix=".int4."))
            try:
                proto = q.model.model
                qp = _quantized_params(proto)
                qe = _int4_experts(proto, num_experts, block_size) if experts_int4 and num_experts else 0
                onnx.save_model(
                    proto,
                    str(int4_tmp / "model.onnx"),
                    save_as_external_data=external,
                    location="model.onnx.data",
                )
                _finish(int4_tmp, dst / "int4", src)
            except BaseException:
                shutil.rmtree(int4_tmp, ignore_errors=True)
                raise
            out["int4"] = info | {
                "quantized_params": qp + qe,
                "expert_params_quantized": qe,
                "share": (qp + qe) / n_params,
                "block_size": block_size,
                "quantizer": "onnxruntime MatMulNBitsQuantizer (symmetric) for 2-D MatMuls"
                + (", int4 DequantizeLinear (opset 21, blocked) for the experts" if qe else ""),
            }
        if "fp32" in types:
            _finish(fp32_tmp, dst / "fp32", src)
            out["fp32"] = info | {"share": 0.0}
        else:
            shutil.rmtree(fp32_tmp)
    except BaseException:
        shutil.rmtree(fp32_tmp, ignore_errors=True)
        raise
    return out


class OrtCausalLM(torch.nn.Module):
    """An onnxruntime session (CPU) behind the call the eval code makes on an HF causal LM:
    ``model(input_ids=..., attention_mask=...).logits``. The graph has no mask input: the eval code
    pads on the right and the model is causal, so the scored positions never see the padding."""

    def __init__(self, folder: str | Path, threads: int | None = None) -> None:
        super().__init__()
        import json

        import onnxruntime as ort

        folder = Path(folder)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        self.session = ort.InferenceSession(
            str(folder / "model.onnx"), sess_options=opts, providers=["CPUExecutionProvider"]
        )
        cfg = json.loads((folder / "config.json").read_text(encoding="utf-8"))
        self.config = SimpleNamespace(
            max_position_embeddings=cfg.get("max_position_embeddings"), vocab_size=cfg.get("vocab_size")
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **_: Any) -> Any:
        if attention_mask is not None and bool((attention_mask[:, 1:] > attention_mask[:, :-1]).any()):
            raise MoEAdaptError(
                "OrtCausalLM takes right-padded batches only (the graph has no attention mask)"
            )
        (logits,) = self.session.run(["logits"], {"input_ids": input_ids.cpu().numpy().astype("int64")})
        return SimpleNamespace(logits=torch.from_numpy(logits))
