"""Prove an upcycled checkpoint: compare the MoE with the dense model it came from, in fp32.

Two checks, both with vanilla transformers modules:

* :func:`verify_layerwise` (``upcycle.verify=auto|layers``) streams both checkpoints layer by layer:
  embeddings, then decoder layer ``i`` of the dense and of the MoE model side by side, then the final
  norm and head. Memory holds about one layer of each model plus the embeddings, the head and the
  activations, whatever the depth. Each MoE layer is run on the *dense* layer's input, so its error
  is its own (errors do not compound); the MoE's own hidden states are carried as well, so the final
  logits are exactly those of the whole MoE model.
* :func:`verify_checkpoints` (``upcycle.verify=logits``) loads both whole models with
  ``from_pretrained`` and compares logits: an independent path through transformers' own loader, for
  models that fit twice in memory.

Tolerances are relative to fp32 rounding (:func:`tolerances`). When the MoE's weights are in a
narrower dtype than the dense model's (``upcycle.dtype=bfloat16`` from an fp32 source), the reference
is the dense model rounded to that dtype, since that is what an exact conversion reproduces.

Legend: ``P`` probe sequences, ``T`` tokens per probe, ``H`` hidden size, ``V`` vocabulary.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moe_adapt.checkpoint.hf import TOKENIZER_FILES, HFCheckpoint, load_causal_lm
from moe_adapt.errors import CheckpointError

log = logging.getLogger(__name__)

EPS32 = torch.finfo(torch.float32).eps
"""fp32 rounding unit (2**-23): both models are always compared in fp32."""

PROBE_TEXTS: dict[str, list[str]] = {
    "en": [
        "The river was low that summer, so the children walked across it to the old mill.",
        "Please check the invoice twice before you send it; last month two numbers were swapped.",
        "A small model that has been trained well can often beat a large one trained badly.",
    ],
    "ar": [
        "كانت الشمس تغرب خلف التلال حين عاد المزارع إلى بيته متعبا لكنه سعيد.",
        "تعلمت أختي الصغيرة القراءة في عامها الخامس، وصارت تقرأ لنا القصص كل مساء.",
        "يحتاج البحث العلمي إلى صبر طويل، فالنتائج الجيدة لا تأتي في يوم واحد.",
    ],
}
"""Fixed real-text probes (English and Arabic), used when ``model.dense`` has a tokenizer."""


def load_fp32(path: str | Path, trust_remote_code: bool = False, what: str = "checkpoint") -> Any:
    """Load a checkpoint in fp32 for checking (safetensors only); any missing or unexpected tensor is an
    error."""
    return load_causal_lm(
        path, torch.float32, router_bias=False, trust_remote_code=trust_remote_code, strict=True, what=what
    )


def probe_tokens(vocab_size: int, probes: int, seq_len: int, seed: int) -> torch.Tensor:
    """Random token ids ``[P, T]`` drawn from a seeded generator."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (probes, seq_len), generator=gen)


def text_probes(dense_path: str | Path, seq_len: int, vocab_size: int) -> list[torch.Tensor] | None:
    """The :data:`PROBE_TEXTS` tokenized with ``dense_path``'s tokenizer (one ``[1, T]`` tensor each, cut
    at ``seq_len`` tokens); None when the folder has no tokenizer or it cannot be loaded."""
    folder = Path(dense_path)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError, KeyError, ImportError) as err:
        log.warning("upcycle: verify: cannot load the tokenizer of %s (%s); random probes only", folder, err)
        return None
    out = []
    for texts in PROBE_TEXTS.values():
        for text in texts:
            ids = tok(text, add_special_tokens=False)["input_ids"][:seq_len]
            if ids and max(ids) < vocab_size:
                out.append(torch.tensor([ids]))
    return out or None


def diff_stats(ref: torch.Tensor, got: torch.Tensor) -> tuple[float, float]:
    """Max ``|got - ref|`` and that over max ``|ref|`` (relative to the tensor's scale)."""
    diff = (got.float() - ref.float()).abs().max().item()
    return diff, diff / max(ref.float().abs().max().item(), 1e-30)


def tolerances(multiple: float, layers: int) -> dict[str, float]:
    """Relative error bounds for an exact conversion (``upcycle.verify_tolerance`` = ``multiple``).

    Both models run in fp32 and share every weight but the FFN's; an exact conversion only re-orders the
    FFN's sum (shards, top-k weights that add up to one up to rounding), so a layer's output moves by a
    few fp32 rounding units: <= 5 eps measured for G up to 8, FFN widths 128 to 2048, fp32 and bf16
    weights. A layer may differ by ``multiple * eps``; the final logits, where every layer's rounding has
    propagated, by ``multiple * eps * layers`` (exact conversions of real models reach 1.5-2.2e-5, i.e.
    130-185 eps, on real text over ~30 layers). One weight off by one bf16 ulp measures ~440 eps in its
    layer; the s**(1/3) scaling of megatron-core ~6e4.
    """
    layer = multiple * EPS32
    return {"multiple": multiple, "eps": EPS32, "layer": layer, "logits": layer * max(layers, 1)}


def judge(result: dict[str, Any], tol: dict[str, float]) -> list[str]:
    """What exceeds the bounds of :func:`tolerances` (empty: the MoE reproduces the dense model)."""
    bad = []
    for layer in result.get("layers", []):
        if layer["max_rel_diff"] > tol["layer"]:
            eps = layer["max_rel_diff"] / EPS32
            bad.append(f"layer {layer['layer']}: {layer['max_rel_diff']:.3g} relative ({eps:.0f} eps)")
    if result.get("embedding_max_rel_diff", 0.0) > tol["layer"]:
        bad.append(f"embeddings: {result['embedding_max_rel_diff']:.3g} relative")
    for kind, stats in result["logits"].items():
        if stats["max_rel_diff"] > tol["logits"]:
            bad.append(f"logits ({kind} probes): {stats['max_rel_diff']:.3g} relative")
    return bad


@torch.no_grad()
def compare_logits(dense: torch.nn.Module, moe: torch.nn.Module, tokens_PT: torch.Tensor) -> dict[str, Any]:
    """Max absolute and relative logit difference, and top-1 agreement, on the probe tokens."""
    return logit_stats(dense(input_ids=tokens_PT).logits, moe(input_ids=tokens_PT).logits)


def logit_stats(dense_PTV: torch.Tensor, moe_PTV: torch.Tensor) -> dict[str, Any]:
    dense_PTV, moe_PTV = dense_PTV.float(), moe_PTV.float()
    diff = (moe_PTV - dense_PTV).abs()
    scale = dense_PTV.abs().max().clamp_min(1e-30)
    return {
        "max_abs_diff": diff.max().item(),
        "max_rel_diff": (diff.max() / scale).item(),
        "mean_abs_diff": diff.mean().item(),
        "top1_agreement": (moe_PTV.argmax(-1) == dense_PTV.argmax(-1)).float().mean().item(),
        "probes": list(dense_PTV.shape[:2]),
    }


def weights_dtype(path: str | Path, what: str) -> torch.dtype:
    """The dtype of a checkpoint's floating-point weights (its embedding matrix's)."""
    ckpt = HFCheckpoint(path, what)
    try:
        return ckpt.info("model.embed_tokens.weight").dtype
    finally:
        ckpt.close()


def round_like(dense_dtype: torch.dtype, moe_dtype: torch.dtype) -> torch.dtype | None:
    """The dtype the dense reference must be rounded to (None: none), so that it is what an exact
    conversion into ``moe_dtype`` reproduces."""
    if moe_dtype == dense_dtype or torch.finfo(moe_dtype).eps <= torch.finfo(dense_dtype).eps:
        return None
    return moe_dtype


def verify_checkpoints(
    dense_path: str | Path,
    moe_path: str | Path,
    probes: int,
    seq_len: int,
    seed: int,
    trust_remote_code: bool = False,
) -> dict[str, Any]:
    """Load both whole checkpoints in fp32 (the dense one rounded to the MoE's dtype first when that is
    narrower) and compare their logits on random probes."""
    rounded = round_like(weights_dtype(dense_path, "model.dense"), weights_dtype(moe_path, "upcycle output"))
    dense = load_fp32(dense_path, trust_remote_code, what="model.dense")
    if rounded is not None:
        with torch.no_grad():
            for p in dense.parameters():
                p.copy_(p.to(rounded).float())
    moe = load_fp32(moe_path, what="the upcycled checkpoint")
    tokens_PT = probe_tokens(dense.config.vocab_size, probes, seq_len, seed)
    result = compare_logits(dense, moe, tokens_PT)
    del dense, moe
    return result | {"reference": _reference(rounded)}


def _reference(rounded: torch.dtype | None) -> str:
    if rounded is None:
        return "dense weights as stored"
    return f"dense weights rounded to {str(rounded).removeprefix('torch.')} (the MoE's dtype)"


_EXPERTS = re.compile(r"^(?P<pre>.*\.experts)\.(?P<proj>gate_up_proj|down_proj)$")


class LayerwiseModel:
    """One checkpoint, read a module at a time into a transformers model skeleton on the meta device.

    The skeleton (all layers, no memory) gives the modelling code and each layer's configuration
    (sliding windows, dense layers of Qwen-MoE); :meth:`load` fills one module from the safetensors
    files, in fp32, and :meth:`unload` frees it. Experts are stored per expert
    (``experts.{e}.gate_proj.weight``, Mixtral's ``block_sparse_moe.experts.{e}.w1.weight``) and fused
    here into the 3-D tensors of transformers 5, as its loader does.
    """

    def __init__(
        self,
        path: str | Path,
        what: str,
        trust_remote_code: bool = False,
        round_to: torch.dtype | None = None,
    ):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.ckpt = HFCheckpoint(path, what)
        self.what = what
        self.round_to = round_to
        try:
            self.config = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code)
            with torch.device("meta"), warnings.catch_warnings():
                warnings.filterwarnings("ignore", "Initializing zero-element tensors")  # no shared expert
                self.skeleton: Any = AutoModelForCausalLM.from_config(
                    self.config, trust_remote_code=trust_remote_code, dtype=torch.float32
                )
        except (OSError, ValueError, KeyError) as err:
            self.ckpt.close()
            raise CheckpointError(f"cannot build {what}={path} as a causal LM: {err}") from err
        self.used: set[str] = set()

    @property
    def base(self) -> Any:
        return self.skeleton.model

    def _get(self, name: str) -> torch.Tensor:
        self.used.add(name)
        t = self.ckpt.get(name)
        if self.round_to is not None and t.is_floating_point():
            t = t.to(self.round_to)
        return t.float()

    def _find(self, name: str) -> str | None:
        for cand in (name, name.replace(".mlp.", ".block_sparse_moe.")):
            if cand in self.ckpt:
                return cand
        return None

    def _expert_names(self, pre: str, proj: str) -> list[list[str]]:
        """Checkpoint names of the per-expert tensors fused into ``pre.{gate_up_proj,down_proj}``."""
        n = self.num_experts()
        parts = ("gate", "up") if proj == "gate_up_proj" else ("down",)
        mixtral = {"gate": "w1", "up": "w3", "down": "w2"}
        names = []
        for e in range(n):
            row = []
            for part in parts:
                plain = f"{pre}.{e}.{part}_proj.weight"
                found = self._find(plain) or self._find(f"{pre}.{e}.{mixtral[part]}.weight")
                if found is None:
                    raise CheckpointError(f"{self.what}={self.ckpt.path} has no tensor {plain!r}")
                row.append(found)
            names.append(row)
        return names

    def num_experts(self) -> int:
        experts = getattr(self.config, "num_local_experts", None) or getattr(self.config, "num_experts", 0)
        return int(experts or 0)

    def load(self, module: torch.nn.Module, prefix: str) -> torch.nn.Module:
        """Fill ``module`` (a meta submodule of the skeleton at ``prefix``) from the checkpoint, in fp32."""
        state: dict[str, torch.Tensor] = {}
        for key, t in module.state_dict(keep_vars=True).items():
            name = f"{prefix}{key}"
            found = self._find(name)
            match = _EXPERTS.match(name)
            if found is not None:
                state[key] = self._get(found)
            elif match is not None:
                rows = self._expert_names(match["pre"], match["proj"])
                state[key] = torch.stack([torch.cat([self._get(n) for n in row]) for row in rows])
            elif name == "lm_head.weight" and getattr(self.config, "tie_word_embeddings", False):
                state[key] = self._get("model.embed_tokens.weight")
            else:
                raise CheckpointError(f"{self.what}={self.ckpt.path} has no tensor {name!r}")
            if tuple(state[key].shape) != tuple(t.shape):
                raise CheckpointError(
                    f"{self.what}={self.ckpt.path}: {name} has shape {tuple(state[key].shape)}, the "
                    f"model expects {tuple(t.shape)}"
                )
        module.load_state_dict(state, strict=True, assign=True)
        return module

    def unload(self, module: torch.nn.Module) -> None:
        module.to_empty(device="meta")

    def unused(self) -> list[str]:
        """Checkpoint tensors no module has read (a lost tensor is an error)."""
        return sorted(set(self.ckpt.index) - self.used)

    def rotary(self) -> Any:
        """The rotary embedding module, built for real (its buffers are computed, not stored)."""
        return type(self.base.rotary_emb)(config=self.config)

    def masks(self, embeds: torch.Tensor, position_ids: torch.Tensor) -> list[Any]:
        """Each layer's attention mask, as the model's forward builds it (causal or sliding window)."""
        from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

        from moe_adapt.upcycle.layouts import layer_windows

        kw = dict(config=self.config, inputs_embeds=embeds, attention_mask=None, past_key_values=None)
        kw["position_ids"] = position_ids
        full = create_causal_mask(**kw)  # type: ignore[arg-type]
        windows = layer_windows(self.config)
        sliding = create_sliding_window_causal_mask(**kw) if any(windows) else None  # type: ignore[arg-type]
        return [sliding if w else full for w in windows]

    def close(self) -> None:
        self.ckpt.close()


@dataclass
class _Batch:
    kind: str
    tokens: torch.Tensor
    position_ids: torch.Tensor
    dense_h: torch.Tensor
    moe_h: torch.Tensor
    pe_dense: Any = None
    pe_moe: Any = None
    masks_dense: Any = None
    masks_moe: Any = None


@torch.no_grad()
def verify_layerwise(
    dense_path: str | Path,
    moe_path: str | Path,
    probes: int,
    seq_len: int,
    seed: int,
    trust_remote_code: bool = False,
    texts: bool = True,
) -> dict[str, Any]:
    """Compare the MoE with the dense model layer by layer, streaming both checkpoints (see the module
    docstring). Returns the logit statistics per probe kind (``random``, ``text``), the errors of each
    layer (``layers``: max abs and relative over all probes, MoE layer on the dense layer's input) and
    the reference used."""
    rounded = round_like(weights_dtype(dense_path, "model.dense"), weights_dtype(moe_path, "upcycle output"))
    dense = LayerwiseModel(dense_path, "model.dense", trust_remote_code, round_to=rounded)
    moe = LayerwiseModel(moe_path, "the upcycled checkpoint")
    try:
        return _stream(dense, moe, dense_path, probes, seq_len, seed, texts) | {
            "reference": _reference(rounded)
        }
    finally:
        dense.close()
        moe.close()


def _stream(
    dense: LayerwiseModel,
    moe: LayerwiseModel,
    dense_path: str | Path,
    probes: int,
    seq_len: int,
    seed: int,
    texts: bool,
) -> dict[str, Any]:
    n_layers = dense.config.num_hidden_layers
    if moe.config.num_hidden_layers != n_layers:
        raise CheckpointError(
            f"the upcycled checkpoint has {moe.config.num_hidden_layers} layers, model.dense {n_layers}"
        )
    vocab = dense.config.vocab_size
    token_sets = [("random", probe_tokens(vocab, probes, seq_len, seed))]
    text_sets = text_probes(dense_path, seq_len, vocab) if texts else None
    token_sets += [("text", t) for t in text_sets or []]

    embed_d = dense.load(dense.base.embed_tokens, "model.embed_tokens.")
    embed_m = moe.load(moe.base.embed_tokens, "model.embed_tokens.")
    rot_d, rot_m = dense.rotary(), moe.rotary()
    batches = []
    for kind, tokens in token_sets:
        pos = torch.arange(tokens.shape[1]).unsqueeze(0)
        h_d, h_m = embed_d(tokens), embed_m(tokens)
        b = _Batch(kind, tokens, pos, h_d, h_m)
        b.pe_dense, b.pe_moe = rot_d(h_d, position_ids=pos), rot_m(h_m, position_ids=pos)
        b.masks_dense, b.masks_moe = dense.masks(h_d, pos), moe.masks(h_m, pos)
        batches.append(b)
    embed_err = max(diff_stats(b.dense_h, b.moe_h)[1] for b in batches)
    dense.unload(embed_d)
    moe.unload(embed_m)

    layers = []
    for i in range(n_layers):
        prefix = f"model.layers.{i}."
        layer_d = dense.load(dense.base.layers[i], prefix)
        layer_m = moe.load(moe.base.layers[i], prefix)
        worst_abs = worst_rel = 0.0
        for b in batches:
            kw_d = dict(position_ids=b.position_ids, position_embeddings=b.pe_dense)
            out_d = layer_d(b.dense_h, attention_mask=b.masks_dense[i], **kw_d)
            on_dense = layer_m(b.dense_h, attention_mask=b.masks_moe[i], **kw_d)
            abs_, rel = diff_stats(out_d, on_dense)
            worst_abs, worst_rel = max(worst_abs, abs_), max(worst_rel, rel)
            same = torch.equal(b.moe_h, b.dense_h) and all(
                torch.equal(x, y) for x, y in zip(b.pe_moe, b.pe_dense, strict=True)
            )
            if same:  # the MoE's own stream is the dense one so far: its output is on_dense
                b.moe_h = on_dense
            else:
                kw_m = dict(position_ids=b.position_ids, position_embeddings=b.pe_moe)
                b.moe_h = layer_m(b.moe_h, attention_mask=b.masks_moe[i], **kw_m)
            b.dense_h = out_d
        layers.append({"layer": i, "max_abs_diff": worst_abs, "max_rel_diff": worst_rel})
        dense.unload(layer_d)
        moe.unload(layer_m)

    norm_d = dense.load(dense.base.norm, "model.norm.")
    norm_m = moe.load(moe.base.norm, "model.norm.")
    head_d = dense.load(dense.skeleton.lm_head, "lm_head.")
    head_m = moe.load(moe.skeleton.lm_head, "lm_head.")
    logits: dict[str, Any] = {}
    by_kind: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for b in batches:
        by_kind.setdefault(b.kind, []).append((head_d(norm_d(b.dense_h)), head_m(norm_m(b.moe_h))))
    for kind, pairs in by_kind.items():
        if kind == "random":
            logits[kind] = logit_stats(*pairs[0])
        else:  # sequences of different lengths: concatenate along tokens
            logits[kind] = logit_stats(
                torch.cat([d for d, _ in pairs], dim=1), torch.cat([m for _, m in pairs], dim=1)
            )
            logits[kind]["sequences"] = len(pairs)
    for what, model in (("model.dense", dense), ("the upcycled checkpoint", moe)):
        lost = model.unused()
        if lost:
            raise CheckpointError(
                f"{what}={model.ckpt.path} has tensors the model does not use: {', '.join(lost[:5])}"
            )
    return {"embedding_max_rel_diff": embed_err, "logits": logits, "layers": layers}


def layer_bytes(ckpt: HFCheckpoint, layer: int) -> int:
    """fp32 bytes of one decoder layer of a checkpoint."""
    prefix = f"model.layers.{layer}."
    return 4 * sum(info.numel for name, (_, info) in ckpt.index.items() if name.startswith(prefix))


def streaming_bytes(dense_path: str | Path, moe_path: str | Path) -> int:
    """Memory the layer-wise check holds at most, in fp32, not counting activations: the largest layer
    of each model plus the embeddings and head of both."""
    total = 0
    for path in (dense_path, moe_path):
        ckpt = HFCheckpoint(path)
        try:
            n = sum(1 for name in ckpt.index if name.endswith("input_layernorm.weight"))
            total += max((layer_bytes(ckpt, i) for i in range(n)), default=0)
            total += 4 * sum(
                info.numel for name, (_, info) in ckpt.index.items() if not name.startswith("model.layers.")
            )
        finally:
            ckpt.close()
    return total
