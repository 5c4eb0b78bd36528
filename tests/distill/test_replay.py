"""Replay of general text and anchors in the distill training phases; held-out loss per phase and the
forgetting bound (distill.replay, distill.<phase>.*_anchor_coef, distill.heldout, .forgetting_bound)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest

from moe_adapt.cpt.config import MixtureConfig
from moe_adapt.distill.replay import (
    MixedBatch,
    ReplayBatch,
    ReplayMixer,
    ReplaySource,
    steps_with_replay,
)
from moe_adapt.distill.sft_data import Example, PackedSampler, pack_examples
from moe_adapt.errors import MoEAdaptConfigError
from tests.distill.test_pipeline import overrides, run

LANGS = (("ar", "target"), ("en", "english"))


def write_shards(out: Path, docs: int, seed: int) -> Path:
    """One shard per language (source news_<lang>, bucket 0) of random ids below the tiny vocabulary."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    out.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    entries = []
    for k, (lang, role) in enumerate(LANGS):
        prefix = f"news_{lang}__{lang}__b0"
        builder = IndexedDatasetBuilder(str(out / f"{prefix}.bin"), dtype=np.uint16)
        tokens = 0
        for _ in range(docs):
            n = int(rng.integers(20, 60))
            # each language its own range of ids, so a batch says where it came from
            builder.add_document(rng.integers(10 + 150 * k, 150 + 150 * k, size=n), [n])
            tokens += n
        builder.finalize(str(out / f"{prefix}.idx"))
        entries.append(
            {"prefix": prefix, "source": f"news_{lang}", "lang": lang, "bucket": "0", "role": role,
             "documents": docs, "tokens": tokens}
        )  # fmt: skip
    manifest = {"version": 1, "dtype": "uint16", "vocab_size": 384, "eod_id": 0, "shards": entries}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.fixture(scope="module")
def shard_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("replay_shards")
    return write_shards(root / "shards", 200, 0), write_shards(root / "heldout", 6, 1)


def _rows(seq_len: int = 64) -> PackedSampler:
    examples = [Example([5, 6, 7], [8 + i % 5] * 10, "ar" if i % 2 else "en") for i in range(12)]
    return PackedSampler(pack_examples(examples, seq_len, 1, ("ar", "en")), 0)


def test_replay_mixer_share_sources_and_exact_resume(shard_dirs) -> None:
    source = ReplaySource(shard_dirs[0], MixtureConfig(target_ratio=0.8), 0.25)
    mixer = ReplayMixer.build(_rows(), source, 64, seed=0)
    batches = [mixer.next_batch(4) for _ in range(40)]
    replayed = [b for b in batches if isinstance(b, ReplayBatch)]
    assert len(replayed) == 10  # exactly a quarter
    assert all(len(replayed[: i // 4]) <= i * 0.25 + 1 for i in range(40))  # spread out, not bunched
    assert all(b.tokens.shape == (4, 65) and not b.kd for b in replayed)
    ar = np.mean([s == "news_ar" for b in replayed for s in b.mixture.sources])
    assert ar == pytest.approx(0.8, abs=0.05)  # the mixture's 80/20
    assert replayed[0].relabel({"loss": 1.0, "lm_loss": 1.0, "lr": 0.1}) == {
        "replay/loss": 1.0,
        "replay/lm_loss": 1.0,
        "lr": 0.1,
    }
    # resume: a mixer restored from the state after 17 batches serves what the original served next
    again = ReplayMixer.build(_rows(), source, 64, seed=0)
    for _ in range(17):
        again.next_batch(4)
    state = json.loads(json.dumps(again.state_dict()))
    resumed = ReplayMixer.build(_rows(), source, 64, seed=0)
    resumed.load_state_dict(state)
    for want in batches[17:]:
        got = resumed.next_batch(4)
        assert type(got) is type(want) and np.array_equal(got.tokens, want.tokens)
    other = ReplayMixer.build(_rows(), ReplaySource(shard_dirs[0], MixtureConfig(), 0.5), 64, seed=0)
    with pytest.raises(MoEAdaptConfigError, match="distill.replay=0.25"):
        other.load_state_dict(state)


@pytest.mark.parametrize(
    ("task", "share"), [(300, 0.25), (60, 0.25), (8, 0.25), (7, 0.5), (300, 0.1), (1, 0.25)]
)
def test_steps_with_replay_keep_the_task_batches(shard_dirs, task: int, share: float) -> None:
    steps = steps_with_replay(task, share)
    mixer = ReplayMixer.build(_rows(), ReplaySource(shard_dirs[0], MixtureConfig(), share), 64, seed=0)
    kinds = [isinstance(mixer.next_batch(2), ReplayBatch) for _ in range(steps)]
    assert kinds.count(False) == task and not kinds[-1]  # the last step is the task's last batch
    assert steps == pytest.approx(task / (1 - share), abs=1.5)
    assert steps_with_replay(task, 0.0) == task


def test_replay_adds_steps_keeps_the_phase_task_batches(
    lm_factory, prompt_files, shard_dirs, tmp_path
) -> None:
    args = overrides(
        lm_factory,
        prompt_files,
        tmp_path,
        "distill.phases=[generate,verify,seq_kd]",
        "distill.seq_kd={steps: 6, batch_size: 2, seq_len: 128, lr: 1.0e-3, warmup_steps: 1}",
        "distill.eval_prompts=null",
        "distill.replay=0.25",
        "distill.replay_adds_steps=true",
        f"distill.shards={shard_dirs[0]}",
        "mixture.seq_len=64",
    )
    summary = run(args)["distill"]
    rows = [json.loads(line) for line in (tmp_path / "distill/seq_kd/metrics.jsonl").read_text().splitlines()]
    assert [r["replay"] for r in rows].count(0.0) == 6 and len(rows) == summary["seq_kd"]["steps"] == 8
    assert summary["seq_kd"]["replay"]["adds_steps"] is True
    assert summary["seq_kd"]["plan"]["steps"] == 8
    rows_args = [a for a in args if "adds_steps" not in a] + [
        "distill.replay_rows=true",
        f"run_dir={tmp_path}/rows",
    ]
    summary = run(rows_args)["distill"]
    flags = [
        json.loads(x)["replay"]
        for x in (tmp_path / "rows/distill/seq_kd/metrics.jsonl").read_text().splitlines()
    ]
    assert (
        len(flags) == 6 and sum(flags) == pytest.approx(0.25 * 6) and 0.0 < max(flags) < 1.0
    )  # rows, not batches
    assert summary["seq_kd"]["replay"]["rows"] is True and summary["seq_kd"]["replay"][
        "realised"
    ] == pytest.approx(0.25)


def test_replay_rows_put_general_text_inside_every_batch(shard_dirs) -> None:
    source = ReplaySource(shard_dirs[0], MixtureConfig(target_ratio=0.8), 0.25, rows=True)
    mixer = ReplayMixer.build(_rows(), source, 64, seed=0)
    batches = [mixer.next_batch(8) for _ in range(10)]
    assert all(isinstance(b, MixedBatch) and b.replay_rows == 2 for b in batches)  # 2 of 8 rows each
    b = batches[0]
    assert b.tokens.shape == (8, 65) and b.loss_mask is not None and b.position_ids is not None
    assert b.loss_mask[6:].all() and not b.loss_mask[:6].all()  # general text: every label counts
    assert (
        (b.position_ids[6:] == np.arange(64)).all()
        and b.lang_ids is not None
        and (b.lang_ids[6:] == -1).all()
    )
    assert (b.tokens[6:] >= 10).all() and b.metrics() == {"replay": 0.25}
    odd = ReplayMixer.build(_rows(), source, 64, seed=0)
    shares = [odd.next_batch(3).metrics()["replay"] for _ in range(40)]
    assert sum(shares) * 3 == 30  # a quarter of 120 rows, spread over batches of 3
    kd = ReplayMixer.build(_rows(), source, 64, seed=0, kd=True)  # token KD: whole batches still
    assert sum(isinstance(kd.next_batch(4), ReplayBatch) for _ in range(8)) == 2
    with pytest.raises(MoEAdaptConfigError, match="replay_rows"):
        ReplayMixer.build(
            _rows(), ReplaySource(shard_dirs[0], MixtureConfig(), 0.75, rows=True), 64, 0
        ).next_batch(1)


def _check_terms(row: dict, prefix: str, coefs: dict[str, float]) -> None:
    """``loss`` is the objective plus the router terms plus the anchors with their coefficients."""
    base = row[f"{prefix}lm_loss"] if prefix else row.get("kd_loss", row["lm_loss"])
    want = base + 0.01 * row[f"{prefix}aux_loss"] + 0.001 * row[f"{prefix}z_loss"]
    want += coefs["l2"] * row[f"{prefix}l2_anchor"] + coefs["kl"] * row[f"{prefix}kl_anchor"]
    assert row[f"{prefix}loss"] == pytest.approx(want, rel=1e-5, abs=1e-6)


def test_every_phase_replays_anchors_and_reports_heldout(
    lm_factory, prompt_files, shard_dirs, tmp_path
) -> None:
    shards, heldout = shard_dirs
    phase = "{steps: 8, batch_size: 2, seq_len: 128, lr: 1.0e-3, warmup_steps: 1, checkpoint_every: 4}"
    args = overrides(
        lm_factory,
        prompt_files,
        tmp_path,
        "distill.phases=[generate,verify,sft,seq_kd,token_kd,select_kd]",
        *[f"distill.{p}={phase}" for p in ("sft", "seq_kd", "token_kd", "select_kd")],
        *[f"distill.{p}.l2_anchor_coef=0.5" for p in ("seq_kd", "token_kd")],
        *[f"distill.{p}.kl_anchor_coef=2.0" for p in ("seq_kd", "token_kd")],
        "distill.eval_prompts=null",
        "distill.replay=0.25",
        f"distill.shards={shards}",
        f"distill.heldout={heldout}",
        "+distill.forgetting_bound.ar=1000.0",
        "+distill.forgetting_bound.en=0.0",
        "mixture.target_ratio=0.8",
        "mixture.seq_len=64",
        "engine.aux_loss_coef=0.01",
        "engine.z_loss_coef=0.001",
    )
    summary = run([a for a in args if a != "distill.heldout=null"])["distill"]
    out = tmp_path / "distill"
    before = summary["heldout"]["student_before"]
    assert {"loss_ar", "loss_en"} <= set(before)
    for name in ("sft", "seq_kd", "token_kd", "select_kd"):
        rows = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
        flags = [r["replay"] for r in rows]
        assert len(rows) == 8 and abs(sum(flags) / len(flags) - 0.25) <= 0.01  # realised within 1%
        assert summary[name]["replay"]["realised"] == pytest.approx(0.25, abs=0.01)
        for r in rows:  # a replay step logs its terms apart and is never distilled
            if r["replay"]:
                assert "replay/lm_loss" in r and "loss" not in r and "kd_loss" not in r
            else:
                assert "loss" in r and "replay/lm_loss" not in r
                assert ("kd_loss" in r) == (name in ("token_kd", "select_kd"))
        after = summary["heldout"][f"after_{name}"]
        assert {"loss_ar", "loss_en"} <= set(after) and after != before
        coefs = {"l2": 0.5, "kl": 2.0} if name in ("seq_kd", "token_kd") else None
        if coefs is None:
            assert not any("anchor" in k for r in rows for k in r)
            continue
        first_task = next(r for r in rows if not r["replay"])
        assert first_task["l2_anchor"] == 0.0 and first_task["kl_anchor"] == pytest.approx(0.0, abs=1e-6)
        assert rows[-1].get("l2_anchor", rows[-1].get("replay/l2_anchor")) > 0  # moved away from the start
        for r in rows:
            _check_terms(r, "replay/" if r["replay"] else "", coefs)
    last = summary["heldout"]["after_select_kd"]
    forgetting = summary["forgetting"]
    assert forgetting["ar"]["held"] is True
    assert forgetting["en"]["rise"] == pytest.approx(last["loss_en"] - before["loss_en"], abs=1e-5)
    assert forgetting["en"]["held"] is (last["loss_en"] - before["loss_en"] <= 0.0)
    report = (out / "report.md").read_text()
    assert "held-out loss ar" in report and "Forgetting bound" in report
    assert ("EXCEEDED" in report) is (not forgetting["en"]["held"])


def test_replay_needs_shards_and_bound_needs_heldout(lm_factory, prompt_files, tmp_path) -> None:
    with pytest.raises(MoEAdaptConfigError, match=r"distill.shards=.*distill.replay=0.3"):
        run(overrides(lm_factory, prompt_files, tmp_path, "distill.replay=0.3", f"distill.shards={tmp_path}"))
    with pytest.raises(MoEAdaptConfigError, match="distill.replay"):
        run(overrides(lm_factory, prompt_files, tmp_path, "distill.replay=1.0"))
    with pytest.raises(MoEAdaptConfigError, match="distill.forgetting_bound"):
        run(overrides(lm_factory, prompt_files, tmp_path, "+distill.forgetting_bound.en=0.1"))
    with pytest.raises(MoEAdaptConfigError, match="distill.seq_kd.kl_anchor_coef"):
        run(overrides(lm_factory, prompt_files, tmp_path, "distill.seq_kd.kl_anchor_coef=-1"))
