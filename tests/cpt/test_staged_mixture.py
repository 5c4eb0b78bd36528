"""Source-staged curricula (``mixture.phase_weights`` with ``curriculum.buckets=all``): every phase holds
its own source shares within 0.5% over 1,000 sequences, a source without weight in a phase is never
read in it, the stream is deterministic and a resumed sampler continues it exactly."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from moe_adapt.config import compose, to_config
from moe_adapt.cpt import CurriculumConfig, MixtureConfig, MixtureSampler
from moe_adapt.errors import MoEAdaptConfigError

MakeShards = Callable[..., Path]

# acai's broad -> specific order: Arabic, then Gulf, then Bahraini, with English replay throughout
PHASES: list[dict[str, float]] = [
    {"arabic": 0.9, "english": 0.1},
    {"arabic": 0.3, "gulf": 0.6, "english": 0.1},
    {"arabic": 0.1, "gulf": 0.3, "bahraini": 0.5, "english": 0.1},
]
PHASE_SEQUENCES = 1000


def _specs() -> list[dict[str, Any]]:
    return [
        {"source": src, "lang": lang, "bucket": b, "role": role, "docs": 300}
        for src, lang, role in (
            ("arabic", "ar", "target"),
            ("gulf", "ar", "target"),
            ("bahraini", "ar", "target"),
            ("english", "en", "english"),
        )
        for b in range(2)
    ]


def _sampler(shards: Path, seed: int = 0) -> MixtureSampler:
    mixture = MixtureConfig(seq_len=16, target_ratio=None, phase_weights=PHASES, max_epochs=100)
    curriculum = CurriculumConfig(buckets="all", phase_steps=[PHASE_SEQUENCES // 10] * 2)
    return MixtureSampler(shards, mixture, curriculum, seed, global_batch_size=10)


def _labels(sampler: MixtureSampler, batches: int, size: int = 10) -> tuple[np.ndarray, list[str], list[int]]:
    out = [sampler.next_batch(size) for _ in range(batches)]
    return (
        np.concatenate([b.tokens for b in out]),
        [s for b in out for s in b.sources],
        [int(p) for b in out for p in b.phases],
    )


def test_each_phase_holds_its_shares_within_half_a_percent(make_shards: MakeShards) -> None:
    _, labels, phases = _labels(_sampler(make_shards(_specs())), 3 * PHASE_SEQUENCES // 10)
    assert phases == [p for p in range(3) for _ in range(PHASE_SEQUENCES)]
    for p, weights in enumerate(PHASES):
        seen = labels[p * PHASE_SEQUENCES : (p + 1) * PHASE_SEQUENCES]
        for source in ("arabic", "gulf", "bahraini", "english"):
            share = seen.count(source) / PHASE_SEQUENCES
            assert abs(share - weights.get(source, 0.0)) <= 0.005, (p, source, share)


def test_every_phase_reads_every_bucket(make_shards: MakeShards) -> None:
    sampler = _sampler(make_shards(_specs()))
    assert sampler.curriculum.groups == [(0, 1)] * 3
    # the same pool serves a source in every phase it is read in: one epoch position, carried across
    arabic = sampler.sources.index("arabic")
    assert sampler.pools[arabic][0] is sampler.pools[arabic][2]
    assert sampler.pools[sampler.sources.index("bahraini")][:2] == [None, None]


def test_deterministic_and_resumes_exactly(make_shards: MakeShards) -> None:
    shards = make_shards(_specs())
    whole, labels, _ = _labels(_sampler(shards), 300)
    again, labels_again, _ = _labels(_sampler(shards), 300)
    assert np.array_equal(whole, again) and labels == labels_again
    # stop inside phase 1 (a plan is cut there) and on a phase boundary, resume in a new sampler
    for cut in (130, 200):
        first = _sampler(shards)
        head, _, _ = _labels(first, cut)
        state = first.state_dict()
        resumed = _sampler(shards)
        resumed.load_state_dict(state)
        tail, tail_labels, _ = _labels(resumed, 300 - cut)
        assert np.array_equal(np.concatenate([head, tail]), whole)
        assert tail_labels == labels[cut * 10 :]
    assert not np.array_equal(_labels(_sampler(shards, seed=1), 300)[0], whole)


def test_staged_weights_need_one_entry_per_phase(make_shards: MakeShards) -> None:
    mixture = MixtureConfig(seq_len=16, target_ratio=None, phase_weights=PHASES[:2])
    curriculum = CurriculumConfig(buckets="all", phase_steps=[10, 10])
    with pytest.raises(
        MoEAdaptConfigError, match=r"^mixture\.phase_weights=.*one entry per curriculum phase"
    ):
        MixtureSampler(make_shards(_specs()), mixture, curriculum, 0, global_batch_size=10)
    with pytest.raises(MoEAdaptConfigError, match=r"^mixture\.phase_weights\[0\]\.welsh=.*not a source"):
        MixtureSampler(
            make_shards(_specs(), name="b"),
            MixtureConfig(seq_len=16, target_ratio=None, phase_weights=[{"welsh": 1.0}]),
            CurriculumConfig(buckets="all"),
            0,
        )
    with pytest.raises(MoEAdaptConfigError, match=r"^mixture\.phase_weights=.*set target_ratio=null"):
        MixtureConfig(phase_weights=PHASES)
    with pytest.raises(MoEAdaptConfigError, match=r"^curriculum\.buckets='some' is invalid"):
        CurriculumConfig(buckets="some")


def test_the_config_checks_the_phase_count_when_composed(tmp_path: Path) -> None:
    overrides = [
        f"run_dir={tmp_path}",
        "model.dense=/x",
        "mixture.target_ratio=null",
        "mixture.phase_weights=[{a: 1.0},{b: 1.0}]",
        "curriculum.phase_steps=[5,5]",
    ]
    with pytest.raises(MoEAdaptConfigError, match=r"^mixture\.phase_weights=.*the curriculum has 3"):
        to_config(compose(overrides))
    assert to_config(compose([*overrides[:-1], "curriculum.phase_steps=[5]"])).mixture.phase_weights
