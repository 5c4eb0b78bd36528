"""The distill stage under torchrun (2 gloo processes on the CPU) against one process: the hf generate
phase splits the prompt shards (rank r writes shards r, r+2, ...) and its folder holds the same bytes;
the training phases train data-parallel and log the same values within fp32 tolerance. The teacher
stage, data-parallel too, against one process."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

from moe_adapt import distributed
from moe_adapt.distill import generate as gen
from tests.distill.test_generate import GCFG, PROMPTS
from tests.train.test_distributed import WORLD, _free_port, _rank_env, _spawn


def _worker(rank: int, port: int, teacher: str, out: str) -> None:
    _rank_env(rank, port)
    distributed.init(cuda=False)
    wrote: list[int] = []
    real = gen._generate_shard

    def spy(*args: object) -> None:
        wrote.append(int(args[3]))  # type: ignore[call-overload]
        real(*args)  # type: ignore[arg-type]

    gen._generate_shard = spy  # type: ignore[assignment]
    try:
        summary = gen.run_generate(PROMPTS, teacher, GCFG, Path(out, "gen"), seed=0, chat_template=None)
        Path(out, f"rank{rank}.json").write_text(json.dumps({"wrote": wrote, "summary": summary}))
    finally:
        distributed.shutdown()


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_two_ranks_split_shards_and_write_what_one_process_writes(
    lm_factory: Callable[..., Path], tmp_path: Path
) -> None:
    teacher = lm_factory("llama")
    one = gen.run_generate(PROMPTS, str(teacher), GCFG, tmp_path / "one", seed=0, chat_template=None)
    _spawn(_worker, (_free_port(), str(teacher), str(tmp_path)))
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(WORLD)]
    assert [r["wrote"] for r in ranks] == [[0, 2], [1]]  # 3 shards of 3, 3 and 1 prompts
    assert ranks[0]["summary"] == ranks[1]["summary"] == one  # rank 0's summary on every rank
    two = _files(tmp_path / "gen")
    assert sorted(two) == sorted(_files(tmp_path / "one"))
    assert two == _files(tmp_path / "one")  # byte for byte: traces and top-k tensors
    # a re-run finds every shard finished: no rank writes one
    _spawn(_worker, (_free_port(), str(teacher), str(tmp_path)))
    assert [json.loads((tmp_path / f"rank{r}.json").read_text())["wrote"] for r in range(WORLD)] == [[], []]
    assert _files(tmp_path / "gen") == two


def _stage_worker(rank: int, port: int, args: list[str], out: str, stage: str = "distill") -> None:
    from tests.distill.test_pipeline import run

    _rank_env(rank, port)
    summary = run(args)[stage]  # the runner starts and ends the process group
    Path(out, f"stage{rank}.json").write_text(json.dumps(summary))


def _metrics(path: Path) -> list[dict[str, float]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_distill_stage_on_two_ranks_equals_one_process(
    lm_factory: Callable[..., Path], prompt_files: tuple[Path, Path], tmp_path: Path
) -> None:
    from tests.distill.test_pipeline import overrides, run

    extra = ("distill.phases=[generate,verify,sft,token_kd]", "distill.token_kd.teacher=topk")
    one = run(overrides(lm_factory, prompt_files, tmp_path / "one", *extra))["distill"]
    args = overrides(lm_factory, prompt_files, tmp_path / "two", *extra)
    _spawn(_stage_worker, (_free_port(), args, str(tmp_path)), timeout_s=400)
    ranks = [json.loads((tmp_path / f"stage{r}.json").read_text()) for r in range(WORLD)]
    assert ranks[0] == ranks[1]  # every rank leaves with rank 0's summary
    two = ranks[0]
    assert two["generate"] == one["generate"] and two["verify"] == one["verify"]
    gen_one, gen_two = (tmp_path / d / "distill" / "generate" for d in ("one", "two"))
    assert _files(gen_two) == _files(
        gen_one
    )  # 12 prompts in shards of 5: rank 0 wrote 0 and 2, rank 1 wrote 1
    verified = (tmp_path / "two" / "distill" / "verify" / "verified.jsonl").read_bytes()
    assert verified == (tmp_path / "one" / "distill" / "verify" / "verified.jsonl").read_bytes()
    assert (
        two["sft"]["plan"]["layout"]["world_size"] == 2 and two["sft"]["plan"]["layout"]["parallel"] == "ddp"
    )
    # the training phases, data-parallel (1 row of each batch of 2 per rank): every logged value of every
    # step within fp32 tolerance of one process's, as cpt's test checks
    for phase in ("sft", "token_kd"):
        ref = _metrics(tmp_path / "one" / "distill" / phase / "metrics.jsonl")
        got = _metrics(tmp_path / "two" / "distill" / phase / "metrics.jsonl")
        assert len(got) == len(ref) == 3
        for r, g in zip(ref, got, strict=True):
            assert set(r) == set(g)
            bad = {
                k: (r[k], g[k])
                for k in r
                if isinstance(r[k], float) and "time" not in k and "per_s" not in k
                and not math.isclose(r[k], g[k], rel_tol=1e-5, abs_tol=1e-6)
            }  # fmt: skip
            assert not bad, (phase, bad)
    ref_w = load_file(str(tmp_path / "one" / "distill" / "model" / "model.safetensors"))
    got_w = load_file(str(tmp_path / "two" / "distill" / "model" / "model.safetensors"))
    assert ref_w.keys() == got_w.keys()
    for key, w in ref_w.items():
        assert torch.allclose(got_w[key], w, rtol=1e-4, atol=1e-5), key
    assert not (tmp_path / "two" / ".work").exists()


TEACHER = (
    "teacher.train_per_lang=6",
    "teacher.test_per_lang=2",
    "teacher.hidden_size=32",
    "teacher.intermediate_size=64",
    "teacher.num_layers=2",
    "teacher.num_heads=2",
    "teacher.train.steps=3",
    "teacher.train.batch_size=4",
    "teacher.train.seq_len=128",
    "teacher.train.warmup_steps=1",
    "teacher.train.checkpoint_every=2",
    "distill.eval.max_new_tokens=8",
    "logger=none",
    "stages=[teacher]",
)


def test_teacher_stage_on_two_ranks_equals_one_process(
    lm_factory: Callable[..., Path], tmp_path: Path
) -> None:
    from tests.distill.test_pipeline import run

    def args(run_dir: Path) -> list[str]:
        return [*TEACHER, f"run_dir={run_dir}", f"teacher.tokenizer={lm_factory('llama')}"]

    one = run(args(tmp_path / "one"))
    _spawn(_stage_worker, (_free_port(), args(tmp_path / "two"), str(tmp_path), "teacher"), timeout_s=300)
    ranks = [json.loads((tmp_path / f"stage{r}.json").read_text()) for r in range(WORLD)]
    assert ranks[0] == ranks[1]
    two, one = ranks[0], one["teacher"]
    assert two["train"]["plan"]["layout"]["world_size"] == 2
    assert two["accuracy"] == one["accuracy"]  # greedy on (nearly) the same weights
    ref = _metrics(tmp_path / "one" / "teacher" / "metrics.jsonl")
    got = _metrics(tmp_path / "two" / "teacher" / "metrics.jsonl")
    assert [r["step"] for r in got] == [r["step"] for r in ref] == [1, 2, 3]
    for r, g in zip(ref, got, strict=True):
        assert math.isclose(r["loss"], g["loss"], rel_tol=1e-5), (r["loss"], g["loss"])
    ref_w = load_file(str(tmp_path / "one" / "teacher" / "model" / "model.safetensors"))
    got_w = load_file(str(tmp_path / "two" / "teacher" / "model" / "model.safetensors"))
    for key, w in ref_w.items():
        assert torch.allclose(got_w[key], w, rtol=1e-4, atol=1e-5), key
    assert (tmp_path / "two" / "teacher" / "prompts" / "train.jsonl").read_bytes() == (
        tmp_path / "one" / "teacher" / "prompts" / "train.jsonl"
    ).read_bytes()
