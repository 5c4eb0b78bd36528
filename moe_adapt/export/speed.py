"""CPU tokens/s of each export artefact, in the runtime that serves it here.

One number per artefact and language: greedy decoding of ``export.speed.new_tokens`` tokens after a
fixed prompt (``export.speed.prompts``, tokenized once by the source's tokenizer, so every runtime gets
the same prompt ids), on ``export.speed.threads`` CPU threads. A run's rate is new tokens / wall-clock
seconds of the whole call (the prompt's prefill included, as a user waits for it); one warm-up run,
then the median of ``export.speed.repeats`` runs. The runtimes:

- **transformers** ``generate`` (KV cache on, ``torch.set_num_threads``) for HF checkpoints: the
  source, expert_prune, int8/nf4, and the compressed-tensors checkpoints transformers loads;
- **llama.cpp** for GGUF files, in process: llama-cpp-python's ``llama_cpp.Llama`` when importable,
  else the prebuilt ``xllamacpp`` wheel's ``Server.handle_completions`` (it also listens on a free
  127.0.0.1 port while measuring); EOS ignored so every run is exactly *n* tokens;
- **onnxruntime** for ONNX graphs (CPU provider): the exported graph has no KV cache, so every new
  token reruns the whole sequence; measured that way, and said in the report.

A runtime that is missing, or an artefact no runtime here loads as written, gives no number and the
reason (:func:`absent`); a runtime that fails gives its exact error. Nothing is estimated.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from moe_adapt.errors import MoEAdaptError
from moe_adapt.export.config import SpeedConfig

log = logging.getLogger(__name__)

__all__ = ["absent", "gguf_speed", "guarded", "hf_speed", "onnx_speed", "prompt_ids"]

ONNX_NOTE = "no KV cache in the graph: every new token reruns the whole sequence"
"""What the ONNX rows' number is (said beside it in the report)."""


def prompt_ids(tokenizer_dir: str | Path, prompts: dict[str, str]) -> dict[str, list[int]]:
    """``{lang: ids}``: each prompt tokenized by the tokenizer in ``tokenizer_dir`` (special tokens
    added as the tokenizer does by default)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    out = {lang: list(tok(text)["input_ids"]) for lang, text in prompts.items()}
    empty = [lang for lang, ids in out.items() if not ids]
    if empty:
        raise MoEAdaptError(f"export.speed.prompts: the prompt of {empty} tokenizes to nothing")
    return out


def absent(reason: str) -> dict[str, Any]:
    """The row of an artefact with no number: ``runtime`` None and why."""
    return {"runtime": None, "tokens_per_s": {}, "reason": reason}


def _rates(step: Callable[[list[int]], int], ids: dict[str, list[int]], scfg: SpeedConfig) -> dict[str, Any]:
    """``step(prompt_ids) -> new tokens made`` timed per language: one warm-up, then ``repeats`` runs."""
    runs: dict[str, list[float]] = {}
    for lang, prompt in ids.items():
        step(prompt)  # warm-up: first-call allocations, graph building, caches
        runs[lang] = []
        for _ in range(scfg.repeats):
            t0 = time.perf_counter()
            n = step(prompt)
            dt = time.perf_counter() - t0
            if n != scfg.new_tokens:
                raise MoEAdaptError(f"made {n} tokens where export.speed.new_tokens={scfg.new_tokens}")
            runs[lang].append(n / dt)
    return {
        "tokens_per_s": {lang: statistics.median(r) for lang, r in runs.items()},
        "runs": runs,
        "new_tokens": scfg.new_tokens,
        "threads": scfg.threads,
        "prompt_tokens": {lang: len(p) for lang, p in ids.items()},
    }


def hf_speed(folder: str | Path, ids: dict[str, list[int]], scfg: SpeedConfig) -> dict[str, Any]:
    """Tokens/s of the HF checkpoint ``folder`` with transformers ``generate`` on the CPU (float32
    where the checkpoint does not set its own quantized types; KV cache on)."""
    import transformers

    from moe_adapt.checkpoint.hf import load_causal_lm

    before = torch.get_num_threads()
    torch.set_num_threads(scfg.threads)
    held: dict[str, Any] = {
        "model": load_causal_lm(folder, torch.float32, device="cpu")
    }  # dropped in `finally`
    pad = getattr(held["model"].config, "pad_token_id", None)
    eos = getattr(held["model"].config, "eos_token_id", None)
    pad = pad if pad is not None else (eos if isinstance(eos, int) else 0)

    def step(prompt: list[int]) -> int:
        x = torch.tensor([prompt], dtype=torch.long)
        with torch.inference_mode():
            out = held["model"].generate(
                input_ids=x,
                attention_mask=torch.ones_like(x),
                max_new_tokens=scfg.new_tokens,
                min_new_tokens=scfg.new_tokens,
                do_sample=False,
                use_cache=True,
                pad_token_id=pad,
            )
        return int(out.shape[1] - x.shape[1])

    try:
        return {"runtime": f"transformers {transformers.__version__}"} | _rates(step, ids, scfg)
    finally:
        held.clear()
        gc.collect()
        torch.set_num_threads(before)


def gguf_runtime() -> str | None:
    """The llama.cpp binding used for GGUF files: ``llama_cpp`` (llama-cpp-python), else
    ``xllamacpp``, else None."""
    for name in ("llama_cpp", "xllamacpp"):
        if importlib.util.find_spec(name) is not None:
            return name
    return None


def gguf_speed(
    file: str | Path, ids: dict[str, list[int]], scfg: SpeedConfig, runtime: str | None = None
) -> dict[str, Any]:
    """Tokens/s of the GGUF ``file`` in llama.cpp (``runtime``: ``llama_cpp`` or ``xllamacpp``;
    None = :func:`gguf_runtime`); absent with the reason when neither is installed."""
    runtime = runtime or gguf_runtime()
    if runtime is None:
        return absent(
            "no llama.cpp binding installed (pip install xllamacpp, a prebuilt wheel; or llama-cpp-python)"
        )
    n_ctx = max(len(p) for p in ids.values()) + scfg.new_tokens + 8
    if runtime == "llama_cpp":
        return _llama_cpp_speed(Path(file), ids, scfg, n_ctx)
    if runtime == "xllamacpp":
        return _xllamacpp_speed(Path(file), ids, scfg, n_ctx)
    raise MoEAdaptError(f"gguf runtime {runtime!r} is unknown: llama_cpp or xllamacpp")


def _llama_cpp_speed(file: Path, ids: dict[str, list[int]], scfg: SpeedConfig, n_ctx: int) -> dict[str, Any]:
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=str(file),
        n_ctx=n_ctx,
        n_threads=scfg.threads,
        n_threads_batch=scfg.threads,
        verbose=False,
    )

    def step(prompt: list[int]) -> int:
        n = 0
        for _tok in llm.generate(prompt, top_k=1, temp=0.0, reset=True):  # never stops at EOS itself
            n += 1
            if n == scfg.new_tokens:
                break
        return n

    try:
        return {"runtime": f"llama.cpp (llama-cpp-python {llama_cpp.__version__})"} | _rates(step, ids, scfg)
    finally:
        llm.close()


def _xllamacpp_speed(file: Path, ids: dict[str, list[int]], scfg: SpeedConfig, n_ctx: int) -> dict[str, Any]:
    from importlib.metadata import version

    import xllamacpp as xlc

    p = xlc.CommonParams()
    p.model.path = str(file)
    p.n_ctx = n_ctx
    p.n_parallel = 1
    p.hostnames = ["127.0.0.1"]
    p.cpuparams.n_threads = scfg.threads
    p.cpuparams_batch.n_threads = scfg.threads
    p.verbosity = 0  # its per-request timing lines on stderr (default 3) would flood the stage log
    held: dict[str, Any] = {"server": xlc.Server(p)}  # stopped when dropped in `finally`
    request = dict(n_predict=scfg.new_tokens, ignore_eos=True, temperature=0.0, top_k=1, cache_prompt=False)

    def step(prompt: list[int]) -> int:
        r = held["server"].handle_completions({"prompt": prompt, **request})
        if not isinstance(r, dict) or "timings" not in r:
            raise MoEAdaptError(f"xllamacpp answered {str(r)[:300]}")
        return int(r["timings"]["predicted_n"])

    try:
        return {"runtime": f"llama.cpp (xllamacpp {version('xllamacpp')}, in process)"} | _rates(
            step, ids, scfg
        )
    finally:
        held.clear()
        gc.collect()


def onnx_speed(folder: str | Path, ids: dict[str, list[int]], scfg: SpeedConfig) -> dict[str, Any]:
    """Tokens/s of the ONNX graph in ``folder`` with onnxruntime on the CPU: greedy, each step one
    full forward of the sequence so far (the graph has no KV cache); absent without onnxruntime."""
    if importlib.util.find_spec("onnxruntime") is None:
        return absent("onnxruntime is not installed (pip install 'moe-adapt[onnx]')")
    import onnxruntime

    from moe_adapt.export.onnx import OrtCausalLM

    held: dict[str, Any] = {"model": OrtCausalLM(folder, threads=scfg.threads)}  # dropped in `finally`

    def step(prompt: list[int]) -> int:
        x = torch.tensor([prompt], dtype=torch.long)
        for _ in range(scfg.new_tokens):
            nxt = held["model"](input_ids=x).logits[:, -1].argmax(-1, keepdim=True)
            x = torch.cat([x, nxt], dim=1)
        return int(x.shape[1] - len(prompt))

    try:
        return {"runtime": f"onnxruntime {onnxruntime.__version__} (CPU)", "note": ONNX_NOTE} | _rates(
            step, ids, scfg
        )
    finally:
        held.clear()
        gc.collect()


def guarded(name: str, measure: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """``measure()``, or the exact error as the reason when the runtime fails on this artefact (the
    export's other results stay); logged either way."""
    try:
        row = measure()
    except Exception as err:  # a runtime's failure is a result of the row, reported verbatim
        msg = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        log.warning("export: tokens/s of %s failed: %s", name, msg)
        return absent(f"failed: {msg}")
    if row.get("runtime"):
        log.info(
            "export: %s %s tokens/s (%s)",
            name,
            {k: round(v, 1) for k, v in row["tokens_per_s"].items()},
            row["runtime"],
        )
    return row
