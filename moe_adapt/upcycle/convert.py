"""Stream a dense checkpoint into an MoE checkpoint, one tensor at a time.

The plan (every output tensor's name, dtype and shape) is fixed before any weight is read, so
each safetensors shard can be written header first and then filled in order. Per layer only the
dense FFN (three matrices, fp32) and the expert being written are in memory: peak memory does not
grow with the number of layers or experts.

Legend: ``E`` routed experts, ``H`` hidden size, ``Ie`` expert width.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from moe_adapt.checkpoint.hf import DTYPES, HFCheckpoint
from moe_adapt.checkpoint.safetensors_io import FileBytes, PlannedTensor, ShardedWriter
from moe_adapt.errors import CheckpointError, MoEAdaptConfigError
from moe_adapt.upcycle import copy, drop, fine_grained
from moe_adapt.upcycle.config import UpcycleConfig, UpcycleMethod, down_scale_error, down_scale_rounds
from moe_adapt.upcycle.experts import FFN, LayerExperts, Method, derive_seed, generator
from moe_adapt.upcycle.layouts import (
    DENSE_FFN,
    TargetLayout,
    attention_mismatch,
    build_target_config,
    dense_tensors,
    inexact_reasons,
    load_source_config,
    resolve_target,
    source_features,
)
from moe_adapt.upcycle.router import init_router
from moe_adapt.upcycle.sizing import Sizing, solve

if TYPE_CHECKING:
    from transformers import PretrainedConfig

METHODS: dict[UpcycleMethod, Method] = {
    UpcycleMethod.copy: copy.upcycle,
    UpcycleMethod.fine_grained: fine_grained.upcycle,
    UpcycleMethod.drop: drop.upcycle,
}

SHARED_GATE_SCALE = 2.0
"""Qwen2-MoE multiplies its shared expert by sigmoid(gate . x). The gate starts at zero weights, so
sigmoid gives 0.5 for every token and doubling the shared down projection keeps the sum exact,
while the gate still receives gradients and can learn to open or close."""


WRITE_THREADS = 4
"""Most threads that make and write tensors at once (fewer on a machine with fewer cores). Copying
bytes through the page cache is bound by one core per thread: on 2 cores, 2 threads write the
0.87B → 1.41B benchmark (tests/benchmarks/bench_upcycle.py) in about half the time of one."""


@dataclass
class Planned:
    tensor: PlannedTensor
    produce: Callable[[], torch.Tensor | FileBytes]
    expert: tuple[int, int | None] | None = None
    """(layer, expert; None for the shared one) for an expert's projections: they are made and written
    together, by one thread, so that an expert computed for its gate is reused for its down."""


class Upcycler:
    """Plans and writes the MoE checkpoint for one dense checkpoint and one ``UpcycleConfig``."""

    def __init__(self, dense_path: str, cfg: UpcycleConfig, seed: int, trust_remote_code: bool = False):
        self.cfg = cfg
        self.seed = seed
        self.src = HFCheckpoint(dense_path, what="model.dense")
        self.source_config = load_source_config(dense_path, trust_remote_code)
        model_type = self.source_config.model_type
        self.layout: TargetLayout = resolve_target(model_type, cfg.target)
        self.layers = self.source_config.num_hidden_layers
        self.hidden = self.source_config.hidden_size
        self._check_dense_ffn()
        ffn_width = self.src.info(DENSE_FFN["gate"].format(layer=0)).shape[0]
        self.features = source_features(lambda name: name in self.src)
        dense_params = sum(info.numel for _, info in self.src.index.values())
        embedding = sum(
            self.src.info(n).numel for n in ("model.embed_tokens.weight", "lm_head.weight") if n in self.src
        )
        self.sizing: Sizing = solve(
            cfg,
            ffn_width,
            base=dense_params - self.layers * 3 * self.hidden * ffn_width,
            embedding=embedding,
            hidden=self.hidden,
            layers=self.layers,
        )
        if self.sizing.top_k > self.sizing.num_experts:
            raise MoEAdaptConfigError(
                f"upcycle.top_k={self.sizing.top_k} must be <= upcycle.num_experts={self.sizing.num_experts}"
            )
        dtype = cfg.dtype if cfg.dtype != "auto" else str(self.src.info("model.embed_tokens.weight").dtype)
        self.dtype_name = dtype.removeprefix("torch.")
        self.target_config: PretrainedConfig = build_target_config(
            self.source_config, self.features, self.layout, self.sizing, self.dtype_name
        )
        self.dense_part = self._dense_part()
        self.inexact = self._inexact_reasons()
        if self.inexact and not cfg.allow_inexact:
            raise MoEAdaptConfigError(
                f"upcycle.target={self.layout.model_type} cannot reproduce the dense {model_type} model "
                f"exactly: "
                f"{'; '.join(self.inexact)}. Choose another upcycle.target or set upcycle.allow_inexact=true"
            )
        expert_dtype = str(self._out_dtype(self.src.info(DENSE_FFN["gate"].format(layer=0)).dtype))
        self.scale_rounding = self._scale_rounding(expert_dtype.removeprefix("torch."), ffn_width)
        if self.scale_rounding is not None and not cfg.allow_inexact and cfg.drop_ratio == 0:
            raise self.scale_rounding
        self.rounded_to = self._rounded_to()
        self._local = threading.local()  # each writing thread's current layer and expert

    # ----------------------------------------------------------------------------------- checks
    def _check_dense_ffn(self) -> None:
        for layer in range(self.layers):
            for proj, pattern in DENSE_FFN.items():
                if pattern.format(layer=layer) not in self.src:
                    raise CheckpointError(
                        f"model.dense={self.src.path} has no {pattern.format(layer=layer)}: "
                        "moe_adapt upcycles "
                        f"SwiGLU FFNs named like Llama/Qwen ({proj}_proj); model_type="
                        f"{self.source_config.model_type!r} does not follow that naming"
                    )

    def _dense_part(self) -> dict[str, tuple[int, ...]]:
        """Every non-FFN tensor the target model expects, with its shape."""
        expected = dense_tensors(self.target_config, self.layout)
        if getattr(self.target_config, "tie_word_embeddings", False) and "lm_head.weight" not in self.src:
            expected.pop("lm_head.weight", None)
        return expected

    def _inexact_reasons(self) -> list[str]:
        reasons = inexact_reasons(self.features, self.layout, self.sizing)
        reasons += attention_mismatch(self.source_config, self.target_config)
        ffn_names = {p.format(layer=i) for i in range(self.layers) for p in DENSE_FFN.values()}
        dropped = sorted(
            n for n in self.src.index if n not in self.dense_part and n not in ffn_names and ".mlp." not in n
        )
        if dropped:
            reasons.append(f"the target has no place for {len(dropped)} source tensors, e.g. {dropped[0]}")
        for name, shape in self.dense_part.items():
            if name in self.src and tuple(self.src.info(name).shape) != shape:
                reasons.append(
                    f"{name} has shape {tuple(self.src.info(name).shape)}, the target expects {shape}"
                )
        s = self.sizing.routed_per_copy
        if self.sizing.top_k % s or self.sizing.num_experts % s:
            reasons.append(
                f"top_k={self.sizing.top_k} and num_experts={self.sizing.num_experts} must be "
                f"multiples of the {s} routed shards per copy"
            )
        return reasons

    def _scale_rounding(self, dtype: str, ffn_width: int) -> MoEAdaptConfigError | None:
        """The refusal when the routed down projections' factor ``S`` rounds ``dtype`` weights, else None.

        Each of a copy's ``S`` routed shards gets router weight ``1/S`` (renormalised top-k over equal
        logits, in every target), and no target can move that factor elsewhere: routers have no bias,
        a constant logit offset cancels in the renormalisation, and Qwen2-MoE's shared-expert gate
        only gates the shared expert. So the factor ``S`` sits in the weights, where bfloat16/float16
        hold it exactly only for a power of two (docs/upcycle.md, "Exactness in bfloat16 and float16").
        """
        sz = self.sizing
        if not down_scale_rounds(sz.granularity, sz.shared, dtype):
            return None
        source = f"upcycle.dtype={self.cfg.dtype}" if self.cfg.dtype != "auto" else f"model.dense is {dtype}"
        return down_scale_error(
            sz.granularity,
            sz.shared,
            dtype,
            source,
            fits=lambda g: g >= 1 and ffn_width % g == 0,
            shared_ok=self.layout.has_shared_expert,
        )

    def _rounded_to(self) -> str | None:
        """The output dtype when writing in it rounds some dense weight (``upcycle.dtype`` narrower than
        the checkpoint's); then the MoE equals the dense model with its weights rounded to that dtype."""
        if self.cfg.dtype == "auto":
            return None
        out = DTYPES[self.cfg.dtype]
        for _, info in self.src.index.values():
            if info.dtype != out and not (out.is_floating_point and out.itemsize > info.dtype.itemsize):
                return self.cfg.dtype
        return None

    @property
    def exact(self) -> bool:
        """Whether the written model should equal the dense one (exact method, expressible target, a
        down-projection factor the output dtype holds exactly); when ``rounded_to`` is set, the dense one
        with its weights rounded to that dtype."""
        return (
            not self.inexact
            and self.scale_rounding is None
            and (self.cfg.method != UpcycleMethod.drop or self.cfg.drop_ratio == 0)
        )

    # ------------------------------------------------------------------------------------ plan
    def _out_dtype(self, source_dtype: torch.dtype) -> torch.dtype:
        return source_dtype if self.cfg.dtype == "auto" else DTYPES[self.cfg.dtype]

    def _dense_ffn(self, layer: int) -> FFN:
        get = lambda proj: self.src.view(DENSE_FFN[proj].format(layer=layer))  # noqa: E731
        return FFN(get("gate"), get("up"), get("down"))

    def _layer(self, layer: int) -> LayerExperts:
        """This thread's experts of ``layer`` (each writing thread keeps the layer it is in)."""
        cached: tuple[int, LayerExperts] | None = getattr(self._local, "layer", None)
        if cached is None or cached[0] != layer:
            self._local.layer = self._local.expert = None  # free the previous layer's dense FFN first
            experts = METHODS[self.cfg.method](
                self._dense_ffn(layer), self.sizing, self.cfg, derive_seed(self.seed, layer)
            )
            cached = self._local.layer = (layer, experts)
        return cached[1]

    def _routed(self, layer: int, expert: int) -> FFN:
        cached: tuple[int, int, FFN] | None = getattr(self._local, "expert", None)
        if cached is None or cached[:2] != (layer, expert):
            cached = self._local.expert = (layer, expert, self._layer(layer).routed(expert))
        return cached[2]

    def _shared(self, layer: int) -> FFN:
        shared = self._layer(layer).shared()
        if shared is None:  # Qwen2-MoE always has a shared expert: give it zero width
            empty = torch.zeros(0, self.hidden)
            return FFN(empty, empty, empty.T)
        return shared

    def _copy(self, name: str) -> Planned:
        if name in self.src:
            info = self.src.info(name)
            dtype = self._out_dtype(info.dtype)
            if dtype == info.dtype:  # unchanged bytes: the writer copies them file to file
                return Planned(PlannedTensor(name, dtype, info.shape), partial(self.src.file_bytes, name))
            return Planned(PlannedTensor(name, dtype, info.shape), lambda: self.src.view(name).to(dtype))
        shape = self.dense_part[name]
        fill = 0.0 if name.endswith(".bias") else 1.0  # a missing bias is zero (exact); a norm starts at one
        dtype = self._out_dtype(self.src.info("model.embed_tokens.weight").dtype)
        return Planned(PlannedTensor(name, dtype, shape), lambda: torch.full(shape, fill, dtype=dtype))

    def _router_tensor(self, layer: int, dtype: torch.dtype) -> torch.Tensor:
        gen = generator(self.seed, layer, -1)
        return init_router(self.sizing, self.hidden, self.cfg.router_init, self.cfg.router_init_std, gen).to(
            dtype
        )

    def _expert_tensor(
        self, layer: int, expert: int | None, proj: str, dtype: torch.dtype
    ) -> torch.Tensor | FileBytes:
        """One projection of routed expert ``expert``, or of the shared expert when ``expert`` is None.
        A gate or up projection that is unchanged rows of the dense one (in its dtype) is returned as
        where those bytes are, for the writer to copy file to file."""
        if proj != "down":
            name = DENSE_FFN[proj].format(layer=layer)
            source_rows = getattr(self._layer(layer), "source_rows", None)
            rows = source_rows(expert) if source_rows is not None else None
            if rows is not None and self.src.info(name).dtype == dtype:
                return self.src.file_bytes(name, rows)
        ffn = self._routed(layer, expert) if expert is not None else self._shared(layer)
        t = {"gate": ffn.gate_IH, "up": ffn.up_IH, "down": ffn.down_HI}[proj]
        if expert is None and proj == "down":
            t = t * SHARED_GATE_SCALE
        return t.to(dtype)

    def plan(self) -> list[Planned]:
        """Every output tensor in write order: globals, then per layer attention/norms, router, experts."""
        dtype = self._out_dtype(self.src.info(DENSE_FFN["gate"].format(layer=0)).dtype)
        sz, h = self.sizing, self.hidden
        per_layer: dict[int, list[str]] = {}
        out: list[Planned] = []
        for name in self.dense_part:
            if name.startswith("model.layers."):
                per_layer.setdefault(int(name.split(".")[2]), []).append(name)
            else:
                out.append(self._copy(name))

        def shapes(width: int) -> dict[str, tuple[int, int]]:
            return {"gate": (width, h), "up": (width, h), "down": (h, width)}

        for layer in range(self.layers):
            out += [self._copy(n) for n in per_layer.get(layer, [])]
            router = PlannedTensor(self.layout.router.format(layer=layer), dtype, (sz.num_experts, h))
            out.append(Planned(router, partial(self._router_tensor, layer, dtype)))
            for e in range(sz.num_experts):
                for proj, pattern in self.layout.expert.items():
                    t = PlannedTensor(
                        pattern.format(layer=layer, expert=e), dtype, shapes(sz.expert_width)[proj]
                    )
                    out.append(Planned(t, partial(self._expert_tensor, layer, e, proj, dtype), (layer, e)))
            if self.layout.shared is not None and self.layout.shared_gate is not None:
                for proj, pattern in self.layout.shared.items():
                    t = PlannedTensor(pattern.format(layer=layer), dtype, shapes(sz.shared_width)[proj])
                    out.append(
                        Planned(t, partial(self._expert_tensor, layer, None, proj, dtype), (layer, None))
                    )
                gate = PlannedTensor(self.layout.shared_gate.format(layer=layer), dtype, (1, h))
                out.append(Planned(gate, partial(torch.zeros, 1, h, dtype=dtype)))
        return out

    # ----------------------------------------------------------------------------------- write
    def write(self, out_dir: Path, progress: bool = True, threads: int | None = None) -> dict[str, Any]:
        """Write weights, config, tokenizer and generation config into ``out_dir`` (an empty folder).

        Tensors are made and written by ``threads`` threads (default: :data:`WRITE_THREADS`, at most
        one per core), each tensor at its planned place in its shard, so the files do not depend on
        the number of threads. Work is handed out in plan order with at most two tasks per thread in
        flight: memory holds a few output tensors, not a layer.
        """
        plan = self.plan()
        writer = ShardedWriter(out_dir, [p.tensor for p in plan], self.cfg.max_shard_mb * 2**20)
        bar = tqdm(total=writer.total_bytes, unit="B", unit_scale=True, desc="upcycle", disable=not progress)
        if threads is None:
            threads = min(
                WRITE_THREADS, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
            )

        def run(task: list[Planned]) -> int:
            for p in task:
                writer.write(p.tensor.name, p.produce())
            return sum(p.tensor.nbytes for p in task)

        # Slicing and scaling are memory-bound: one torch thread each; more only spin (OpenMP) on the
        # cores the writers need.
        torch_threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with bar, ThreadPoolExecutor(max(threads, 1), thread_name_prefix="upcycle") as pool:
                pending: deque[Future[int]] = deque()
                for task in _tasks(plan):
                    if len(pending) >= 2 * threads:
                        bar.update(pending.popleft().result())
                    pending.append(pool.submit(run, task))
                while pending:
                    bar.update(pending.popleft().result())
            writer.close()
        except BaseException:
            writer.abort()
            raise
        finally:
            torch.set_num_threads(torch_threads)
            self._local = threading.local()
        self.target_config.save_pretrained(out_dir)
        copied = self.src.copy_side_files(out_dir)
        return {
            "files": writer.names,
            "copied": copied,
            "bytes": writer.total_bytes,
            **self.param_report(plan),
        }

    def param_report(self, plan: list[Planned] | None = None) -> dict[str, Any]:
        """Total and active parameters (embeddings included) and the shapes of one layer's experts."""
        plan = plan if plan is not None else self.plan()
        sz, h = self.sizing, self.hidden
        total = sum(p.tensor.nbytes // p.tensor.dtype.itemsize for p in plan)
        expert = 3 * h * sz.expert_width
        active = total - self.layers * (sz.num_experts - sz.top_k) * expert
        embedding = sum(
            torch.Size(self.dense_part[n]).numel()
            for n in ("model.embed_tokens.weight", "lm_head.weight")
            if n in self.dense_part
        )
        return {
            "source": {"model_type": self.source_config.model_type, "path": str(self.src.path)},
            "target": self.layout.model_type,
            "method": self.cfg.method.value,
            "exact": self.exact,
            "inexact_reasons": self.inexact
            + ([self.scale_rounding.allowed.split(";")[0]] if self.scale_rounding is not None else []),
            "rounded_to": self.rounded_to,
            "reference": "model.dense"
            + (f" with its weights rounded to {self.rounded_to}" if self.rounded_to else ""),
            "sizing": {
                "num_experts": sz.num_experts,
                "top_k": sz.top_k,
                "granularity": sz.granularity,
                "shared_experts": sz.shared,
                "routed_per_copy": sz.routed_per_copy,
                "copies": sz.num_experts / sz.routed_per_copy,
                "ffn_width": sz.ffn_width,
                "expert_width": sz.expert_width,
                "shared_width": sz.shared_width,
            },
            "params": {
                "total_dense": sum(info.numel for _, info in self.src.index.values()),
                "total": total,
                "active": active,
                "active_fraction": active / total,
                "embedding": embedding,
                "active_fraction_excl_embedding": (active - embedding) / (total - embedding),
            },
            "layer_shapes": {
                "router": [sz.num_experts, h],
                "expert_gate_up": [sz.expert_width, h],
                "expert_down": [h, sz.expert_width],
                **(
                    {"shared_gate_up": [sz.shared_width, h], "shared_down": [h, sz.shared_width]}
                    if self.layout.shared is not None
                    else {}
                ),
            },
            "dtype": self.dtype_name,
        }

    def close(self) -> None:
        self.src.close()


def _tasks(plan: list[Planned]) -> list[list[Planned]]:
    """The plan cut into units of work: each expert's projections together, every other tensor alone."""
    tasks: list[list[Planned]] = []
    for p in plan:
        if p.expert is not None and tasks and tasks[-1][-1].expert == p.expert:
            tasks[-1].append(p)
        else:
            tasks.append([p])
    return tasks
