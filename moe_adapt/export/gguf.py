"""``gguf``: an HF checkpoint as llama.cpp files (f32, f16, q8_0, q4_0), tokenizer included.

Written with the ``gguf`` package's :class:`gguf.GGUFWriter` and named with its tensor-name maps
(:func:`gguf.get_tensor_name_map` for the file's ``MODEL_ARCH``), laid out as llama.cpp's own
``convert_hf_to_gguf.py`` lays them out:

=============  ===============  =================================================================
HF model_type  GGUF arch        notes
=============  ===============  =================================================================
mixtral        ``llama``        experts per layer; q/k rows permuted for llama.cpp's rotary layout
qwen3_moe      ``qwen3moe``     llama.cpp always renormalises the top-k weights: needs norm_topk_prob
qwen2_moe      ``qwen2moe``     shared expert + its gate; llama.cpp does not renormalise the top-k
                                weights: refuses norm_topk_prob=true (what our upcycling writes)
llama, qwen2,  same name        dense models (the pipeline's start), for comparison
qwen3
=============  ===============  =================================================================

Routed experts are merged into one 3-D tensor per projection and layer, ``blk.N.ffn_{gate,up,down}_exps``
with numpy shape ``[E, out, in]`` (GGUF's ``ne`` is the reverse: ``{in, out, E}``); the router is
``blk.N.ffn_gate_inp``. Norms, biases and routers stay f32 (llama.cpp's converter keeps them so); in a
q8_0/q4_0 file a matrix whose rows are not a multiple of the 32-wide quant block stays f16.
Quantization is ``gguf.quants.quantize`` (numpy, the reference of llama.cpp's own).

The file is written in two passes, so memory stays bounded by one merged expert tensor: every
tensor's name, shape and type first (header and tensor table), then the data tensor by tensor;
it is written to a temporary name and renamed.

A model the layout cannot express is refused with one line before anything is written: a router
selection bias (``router_bias.json``), sliding-window attention, rope scaling, attention biases the
GGUF arch has no place for, the top-k normalisation llama.cpp does not do.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moe_adapt.checkpoint.hf import HFCheckpoint
from moe_adapt.checkpoint.router_bias import BIAS_FILE
from moe_adapt.errors import MoEAdaptError

log = logging.getLogger(__name__)

__all__ = ["ARCHS", "GGUFTensorPlan", "plan_tensors", "read_gguf_state", "write_gguf"]

ARCHS = {
    "mixtral": "llama",
    "qwen3_moe": "qwen3moe",
    "qwen2_moe": "qwen2moe",
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
}
"""HF model_type -> GGUF ``general.architecture`` written."""

_EXPERT = re.compile(r"^model\.layers\.(\d+)\.(.+?)\.experts\.(\d+)\.(\w+)\.weight$")
_FUSED = re.compile(r"^model\.layers\.(\d+)\.(.+?)\.experts\.(gate_up_proj|down_proj)$")
_F32_NAMES = (".ffn_gate_inp.weight", ".ffn_gate_inp_shexp.weight")
_QUANT_BLOCK = 32


def _gguf() -> Any:
    try:
        import gguf
    except ImportError as err:  # pragma: no cover - gguf is a dependency of the dev and gguf extras
        raise MoEAdaptError(
            "export.methods has gguf: install the gguf package (pip install 'moe-adapt[gguf]')"
        ) from err
    return gguf


@dataclass(frozen=True)
class GGUFTensorPlan:
    """One tensor of the GGUF file: its name, numpy shape, and the HF tensors it is made of."""

    name: str
    """GGUF name (``blk.0.ffn_gate_exps.weight``)."""
    shape: tuple[int, ...]
    """numpy shape of the float tensor (``[E, out, in]`` for merged experts)."""
    sources: tuple[str, ...]
    """HF tensor names, stacked in order along a new first axis when there are several (experts)."""
    transform: str = ""
    """``permute_q``/``permute_k`` (llama's rotary rows), ``squeeze`` (Qwen2-MoE shared gate),
    ``gate``/``up`` (half of a fused ``gate_up_proj``), or empty."""


def _refuse(what: str, why: str) -> MoEAdaptError:
    return MoEAdaptError(
        f"export.methods has gguf but {what}: {why}; drop gguf from export.methods for this model"
    )


def check_expressible(ckpt: HFCheckpoint) -> str:
    """The GGUF arch for ``ckpt``, or a one-line refusal naming what llama.cpp cannot hold."""
    cfg, model_type = ckpt.config, str(ckpt.config.get("model_type"))
    arch = ARCHS.get(model_type)
    if arch is None:
        raise _refuse(f"model_type={model_type!r}", f"the GGUF export knows {', '.join(ARCHS)}")
    if (ckpt.path / BIAS_FILE).is_file():
        raise _refuse(
            f"{ckpt.path} has {BIAS_FILE}",
            "llama.cpp's experts have no selection bias, so the GGUF would route differently",
        )
    rope = cfg.get("rope_scaling") or {}
    rope_params = cfg.get("rope_parameters") or {}
    if (rope and rope.get("rope_type", rope.get("type")) not in (None, "default")) or rope_params.get(
        "rope_type", "default"
    ) != "default":
        raise _refuse(f"{model_type} uses rope scaling {rope or rope_params}", "not written by this exporter")
    if cfg.get("sliding_window") and cfg.get("use_sliding_window", True):
        raise _refuse(
            f"{model_type} uses sliding-window attention", f"llama.cpp's {arch} attends to the full context"
        )
    if model_type == "qwen3_moe" and not cfg.get("norm_topk_prob", False):
        raise _refuse(
            "qwen3_moe has norm_topk_prob=false", "llama.cpp's qwen3moe always renormalises the top-k weights"
        )
    if model_type == "qwen2_moe" and cfg.get("norm_topk_prob", False):
        raise _refuse(
            "qwen2_moe has norm_topk_prob=true", "llama.cpp's qwen2moe does not renormalise the top-k weights"
        )
    if arch in ("llama", "qwen3moe", "qwen3") and any(
        ".self_attn." in n and n.endswith(".bias") for n in ckpt.index
    ):
        raise _refuse(f"{model_type} has attention biases", f"llama.cpp's {arch} has no place for them")
    return arch


def plan_tensors(ckpt: HFCheckpoint, arch_name: str) -> list[GGUFTensorPlan]:
    """Every tensor of the GGUF file for ``ckpt`` in the order written (HF order, experts merged)."""
    gguf = _gguf()
    arch = next(a for a, n in gguf.MODEL_ARCH_NAMES.items() if n == arch_name)
    cfg = ckpt.config
    name_map = gguf.get_tensor_name_map(arch, int(cfg["num_hidden_layers"]))
    experts: dict[tuple[int, str, str], dict[int, str]] = {}
    order: list[tuple[str, Any]] = []
    for name in ckpt.index:
        m = _EXPERT.match(name)
        if m:
            key = (int(m.group(1)), m.group(2), m.group(4))
            if key not in experts:
                experts[key] = {}
                order.append(("experts", key))
            experts[key][int(m.group(3))] = name
        else:
            order.append(("one", name))
    tied = bool(cfg.get("tie_word_embeddings", False))
    plans: list[GGUFTensorPlan] = []

    def gguf_name(hf: str) -> str:
        base, suffix = hf.rsplit(".", 1) if hf.endswith((".weight", ".bias")) else (hf, "")
        mapped = name_map.get_name(base)
        if mapped is None:
            raise MoEAdaptError(
                f"export gguf: {ckpt.path} tensor {hf!r} has no name in gguf's {arch_name} map"
            )
        return f"{mapped}.{suffix}" if suffix else mapped

    for kind, item in order:
        if kind == "experts":
            layer, block, proj = item
            by_index = experts[item]
            if sorted(by_index) != list(range(len(by_index))):
                raise MoEAdaptError(f"export gguf: layer {layer} has experts {sorted(by_index)}: not 0..E-1")
            first = ckpt.info(by_index[0]).shape
            merged = gguf_name(f"model.layers.{layer}.{block}.experts.{proj}.weight")
            plans.append(
                GGUFTensorPlan(merged, (len(by_index), *first), tuple(by_index[i] for i in sorted(by_index)))
            )
            continue
        name = item
        if name == "lm_head.weight" and tied:
            continue  # llama.cpp uses token_embd when there is no output.weight
        f = _FUSED.match(name)
        shape = ckpt.info(name).shape
        if f:
            layer, block, what = int(f.group(1)), f.group(2), f.group(3)
            if what == "down_proj":
                plans.append(
                    GGUFTensorPlan(
                        gguf_name(f"model.layers.{layer}.{block}.experts.down_proj.weight"), shape, (name,)
                    )
                )
            else:
                half = (shape[0], shape[1] // 2, shape[2])
                for part in ("gate", "up"):
                    target = gguf_name(f"model.layers.{layer}.{block}.experts.{part}_proj.weight")
                    plans.append(GGUFTensorPlan(target, half, (name,), part))
            continue
        target = gguf_name(name)
        transform = ""
        if arch_name == "llama" and name.endswith(("self_attn.q_proj.weight", "self_attn.k_proj.weight")):
            transform = "permute_q" if ".q_proj." in name else "permute_k"
        if target.endswith(".ffn_gate_inp_shexp.weight"):
            transform, shape = "squeeze", (shape[-1],)
        plans.append(GGUFTensorPlan(target, tuple(shape), (name,), transform))
    return plans


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's row order for the rotary halves of q/k (what its llama converter does)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _materialise(ckpt: HFCheckpoint, plan: GGUFTensorPlan) -> np.ndarray:
    """The float32 array of one planned tensor."""
    cfg = ckpt.config
    arrays = [ckpt.get(s).to(torch.float32).numpy() for s in plan.sources]
    data = np.stack(arrays) if len(arrays) > 1 else arrays[0]
    if plan.transform == "permute_q":
        data = _permute(data, int(cfg["num_attention_heads"]))
    elif plan.transform == "permute_k":
        data = _permute(data, int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]))
    elif plan.transform == "squeeze":
        data = data.reshape(-1)
    elif plan.transform in ("gate", "up"):
        half = data.shape[1] // 2
        data = data[:, :half] if plan.transform == "gate" else data[:, half:]
    if len(plan.sources) > 1 and data.shape != plan.shape:
        raise MoEAdaptError(f"export gguf: {plan.name} has shape {data.shape}, planned {plan.shape}")
    return np.ascontiguousarray(data, dtype=np.float32)


def tensor_type(plan: GGUFTensorPlan, file_type: str) -> Any:
    """The GGML type a tensor is stored in for ``file_type`` (see the module docstring)."""
    q = _gguf().GGMLQuantizationType
    if len(plan.shape) == 1 or plan.name.endswith(_F32_NAMES) or file_type == "f32":
        return q.F32
    if file_type == "f16" or plan.shape[-1] % _QUANT_BLOCK:
        return q.F16
    return {"q8_0": q.Q8_0, "q4_0": q.Q4_0}[file_type]


def _encode(data: np.ndarray, qtype: Any) -> np.ndarray:
    gguf = _gguf()
    q = gguf.GGMLQuantizationType
    if qtype == q.F32:
        return data
    if qtype == q.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data, qtype)


_FILE_TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0"}


def write_gguf(
    src: str | Path, dest: str | Path, file_type: str, *, pre_tokenizer: str = "auto"
) -> dict[str, Any]:
    """Write ``src`` (an HF checkpoint folder) as the GGUF file ``dest`` of ``file_type``; returns a
    report (arch, tensors per GGML type, bytes).

    Raises:
        MoEAdaptError: the model cannot be expressed (one line, nothing written), its tokenizer cannot.
    """
    gguf = _gguf()
    ckpt = HFCheckpoint(src, "export.model")
    dest = Path(dest)
    tmp = dest.with_name(f".{dest.name}.tmp-{os.getpid()}")
    try:
        arch = check_expressible(ckpt)
        plans = plan_tensors(ckpt, arch)
        vocab = _tokenizer_fields(Path(src), ckpt.config, pre_tokenizer)
        writer = gguf.GGUFWriter(None, arch)
        _write_metadata(writer, ckpt.config, arch, file_type, gguf)
        vocab(writer)
        types: dict[str, int] = {}
        qtypes = []
        for p in plans:
            qtype = tensor_type(p, file_type)
            qtypes.append(qtype)
            types[qtype.name] = types.get(qtype.name, 0) + 1
            if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                dtype = np.float32 if qtype == gguf.GGMLQuantizationType.F32 else np.float16
                nbytes = int(np.prod(p.shape)) * np.dtype(dtype).itemsize
                writer.add_tensor_info(p.name, p.shape, np.dtype(dtype), nbytes)
            else:
                byte_shape = gguf.quants.quant_shape_to_byte_shape(p.shape, qtype)
                writer.add_tensor_info(
                    p.name, byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), qtype
                )
        dest.parent.mkdir(parents=True, exist_ok=True)
        try:
            writer.write_header_to_file(tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for p, qtype in zip(plans, qtypes, strict=True):
                writer.write_tensor_data(_encode(_materialise(ckpt, p), qtype))
            writer.close()
            os.replace(tmp, dest)
        except BaseException:
            writer.close()
            tmp.unlink(missing_ok=True)
            raise
    finally:
        ckpt.close()
    report = {
        "file": dest.name,
        "arch": arch,
        "type": file_type,
        "tensors": types,
        "bytes": dest.stat().st_size,
    }
    log.info(
        "export gguf: %s (%s, %s): %.2f MiB, tensors %s",
        dest.name,
        arch,
        file_type,
        dest.stat().st_size / 2**20,
        types,
    )
    return report


def _write_metadata(writer: Any, cfg: dict[str, Any], arch: str, file_type: str, gguf: Any) -> None:
    heads = int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or int(cfg["hidden_size"]) // heads)
    rope = cfg.get("rope_parameters") or {}
    # a name, not a path; never "mistral" (transformers then reads a llama-arch file as Mistral)
    writer.add_name(f"moe_adapt-{cfg.get('model_type')}")
    writer.add_context_length(int(cfg["max_position_embeddings"]))
    writer.add_embedding_length(int(cfg["hidden_size"]))
    writer.add_block_count(int(cfg["num_hidden_layers"]))
    writer.add_feed_forward_length(int(cfg["intermediate_size"]))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(cfg.get("num_key_value_heads") or heads))
    writer.add_rope_freq_base(float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(cfg["rms_norm_eps"]))
    writer.add_vocab_size(int(cfg["vocab_size"]))
    writer.add_file_type(getattr(gguf.LlamaFileType, _FILE_TYPES[file_type]))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    else:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    experts = cfg.get("num_experts") or cfg.get("num_local_experts")
    if experts:
        writer.add_expert_count(int(experts))
        writer.add_expert_used_count(int(cfg["num_experts_per_tok"]))
    if cfg.get("moe_intermediate_size"):
        writer.add_expert_feed_forward_length(int(cfg["moe_intermediate_size"]))
    if cfg.get("shared_expert_intermediate_size"):
        writer.add_expert_shared_feed_forward_length(int(cfg["shared_expert_intermediate_size"]))


def _tokenizer_fields(folder: Path, cfg: dict[str, Any], pre_tokenizer: str) -> Callable[[Any], None]:
    """The tokenizer as GGUF metadata (``tokenizer.ggml.*``): a byte-level BPE's tokens, types and
    merges, its special ids. Checked before anything is written; returns the function that adds them."""
    gguf = _gguf()
    file = folder / "tokenizer.json"
    if not file.is_file():
        raise MoEAdaptError(
            f"export gguf: {folder} has no tokenizer.json; llama.cpp needs the tokenizer in the file"
        )
    spec = json.loads(file.read_text(encoding="utf-8"))
    model = spec.get("model", {})
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise MoEAdaptError(
            f"export gguf: {file} is a {model.get('type')} tokenizer without a byte-level pre-tokenizer; "
            "the GGUF export writes byte-level BPE (gpt2-style) tokenizers only"
        )
    pre = pre_tokenizer if pre_tokenizer != "auto" else _pre_name(spec, str(cfg.get("model_type")))
    vocab: dict[str, int] = dict(model["vocab"])
    added = {int(t["id"]): t for t in spec.get("added_tokens", [])}
    for i, t in added.items():
        vocab[t["content"]] = i
    size = max(int(cfg["vocab_size"]), max(vocab.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for tok, i in vocab.items():
        tokens[i] = tok
        types[i] = gguf.TokenType.NORMAL
    for i, t in added.items():
        types[i] = gguf.TokenType.CONTROL if t.get("special") else gguf.TokenType.USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    special = _special_ids(folder, cfg, vocab)

    def add(writer: Any) -> None:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges(merges)
        for key, value in special.items():
            getattr(writer, f"add_{key}_token_id")(value)
        writer.add_add_bos_token(False)

    return add


def _pre_name(spec: dict[str, Any], model_type: str) -> str:
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt-2"
    if model_type.startswith("qwen"):
        return "qwen2"
    if model_type in ("llama", "mixtral"):
        return "llama-bpe"
    raise MoEAdaptError(
        "export.gguf.pre_tokenizer=auto cannot tell llama.cpp's pre-tokenizer of this tokenizer; "
        "name it (e.g. export.gguf.pre_tokenizer=gpt-2)"
    )


def _special_ids(folder: Path, cfg: dict[str, Any], vocab: dict[str, int]) -> dict[str, int]:
    out: dict[str, int] = {}
    tok_cfg_file = folder / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_file.read_text(encoding="utf-8")) if tok_cfg_file.is_file() else {}
    for key in ("bos", "eos", "pad", "unk"):
        token = tok_cfg.get(f"{key}_token")
        if isinstance(token, dict):
            token = token.get("content")
        if isinstance(token, str) and token in vocab:
            out[key] = vocab[token]
        elif isinstance(cfg.get(f"{key}_token_id"), int):
            out[key] = int(cfg[f"{key}_token_id"])
    return out


def read_gguf_state(path: str | Path, src: str | Path) -> Iterator[tuple[str, torch.Tensor]]:
    """The HF tensors of ``src``'s checkpoint as the GGUF file ``path`` (written from it) holds them,
    dequantized to float32: what llama.cpp's weights are, in HF names (for measuring and checking)."""
    gguf = _gguf()
    ckpt = HFCheckpoint(src, "export.model")
    try:
        arch = check_expressible(ckpt)
        plans = {p.name: p for p in plan_tensors(ckpt, arch)}
        cfg = ckpt.config
        reader = gguf.GGUFReader(str(path))
        halves: dict[str, dict[str, np.ndarray]] = {}
        for t in reader.tensors:
            p = plans.get(t.name)
            if p is None:
                raise MoEAdaptError(f"{path}: tensor {t.name} was not written from {src}")
            data = np.array(gguf.dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(p.shape)
            if p.transform == "permute_q":
                data = _unpermute(data, int(cfg["num_attention_heads"]))
            elif p.transform == "permute_k":
                data = _unpermute(data, int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]))
            elif p.transform == "squeeze":
                data = data.reshape(ckpt.info(p.sources[0]).shape)
            elif p.transform in ("gate", "up"):
                halves.setdefault(p.sources[0], {})[p.transform] = data
                if len(halves[p.sources[0]]) == 2:
                    h = halves.pop(p.sources[0])
                    yield p.sources[0], torch.from_numpy(np.concatenate([h["gate"], h["up"]], axis=1))
                continue
            if len(p.sources) > 1:
                for i, s in enumerate(p.sources):
                    yield s, torch.from_numpy(np.ascontiguousarray(data[i]))
            else:
                yield p.sources[0], torch.from_numpy(np.ascontiguousarray(data))
    finally:
        ckpt.close()
