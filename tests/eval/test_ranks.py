"""The eval stage's work under torchrun (2 gloo processes on the CPU): rank r evaluates models r, r+2,
...; rank 0 gathers the results and files and writes what one process writes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moe_adapt import distributed
from moe_adapt.eval.evaluate import evaluate
from tests.train.test_distributed import _free_port, _rank_env, _spawn


def _worker(rank: int, port: int, cfg: Any, root: str) -> None:
    _rank_env(rank, port)
    distributed.init(cuda=False)
    try:
        out = Path(root, "two" if rank == 0 else f"scratch{rank}")  # as the runner: a scratch folder
        out.mkdir()
        summary = evaluate(cfg.eval, out, seed=cfg.seed, work=Path(root, "work"))
        assert (summary != {}) == (rank == 0)
    finally:
        distributed.shutdown()


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_two_ranks_share_the_models_and_write_what_one_process_writes(
    run_dir: Path, checkpoints: dict[str, Path], make_cfg: Any, tmp_path: Path
) -> None:
    cfg = make_cfg(run_dir, checkpoints)
    (tmp_path / "one").mkdir()
    evaluate(cfg.eval, tmp_path / "one", seed=cfg.seed)
    _spawn(_worker, (_free_port(), cfg, str(tmp_path)), timeout_s=300)
    one, two = _files(tmp_path / "one"), _files(tmp_path / "two")
    assert sorted(two) == sorted(one)  # the moe model's routing files, made by rank 1, moved into place
    assert any(name.startswith("routing/moe/") for name in two)
    for name in ("eval.json", "metrics.json", "report.md", "routing/moe/routing.json"):
        assert two[name] == one[name], name
    assert not any((tmp_path / "scratch1").iterdir())  # rank 1 wrote nothing into its own folder
    assert not any((tmp_path / "work").iterdir())  # rank 0 took rank 1's files
