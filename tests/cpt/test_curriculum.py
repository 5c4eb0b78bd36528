"""Curriculum phases, bucket order, linear blending and LR re-warming (pure functions, no data)."""

from __future__ import annotations

import pytest

from moe_adapt.cpt.config import CurriculumConfig
from moe_adapt.cpt.curriculum import Curriculum, phase_at, unreached_phases
from moe_adapt.errors import MoEAdaptConfigError


def test_easy_to_hard_step_pacing() -> None:
    cfg = CurriculumConfig(phase_tokens=[100, 100])  # two lengths: three phases, the last to the end
    c = Curriculum(cfg, 3)
    assert [c.phase_at_tokens(t).phase for t in (0, 99, 100, 199, 200, 10_000)] == [0, 0, 1, 1, 2, 2]
    assert c.phase_at_tokens(150).bucket_weights == (0.0, 1.0, 0.0)
    assert c.groups == [(0,), (1,), (2,)]


def test_hard_to_easy_reverses_and_random_is_seeded_permutation() -> None:
    rev = Curriculum(CurriculumConfig(order="hard_to_easy", phase_tokens=[1, 1]), 3)
    assert rev.groups == [(2,), (1,), (0,)]
    cfg = CurriculumConfig(order="random", phase_tokens=[1] * 5)
    a, b = Curriculum(cfg, 6, seed=3), Curriculum(cfg, 6, seed=3)
    assert a.groups == b.groups and sorted(g[0] for g in a.groups) == list(range(6))
    assert any(Curriculum(cfg, 6, seed=s).groups != a.groups for s in range(4, 8))


def test_fewer_phases_than_buckets_groups_contiguously() -> None:
    c = Curriculum(CurriculumConfig(phase_tokens=[10]), 5)
    assert c.groups == [(0, 1, 2), (3, 4)]
    assert c.phase_at_tokens(0).bucket_weights == pytest.approx((1 / 3, 1 / 3, 1 / 3, 0, 0))
    assert Curriculum(CurriculumConfig(), 4).groups == [(0, 1, 2, 3)]  # no phases: no curriculum


def test_linear_pacing_blends_next_phase_in() -> None:
    cfg = CurriculumConfig(phase_tokens=[1000], pacing="linear", blend_fraction=0.2)
    c = Curriculum(cfg, 2)
    assert c.phase_at_tokens(700).blend == 0.0
    assert c.phase_at_tokens(800).blend == 0.0
    assert c.phase_at_tokens(900).bucket_weights == pytest.approx((0.5, 0.5))
    assert c.phase_at_tokens(950).blend == pytest.approx(0.75)
    assert c.phase_at_tokens(1000).bucket_weights == (0.0, 1.0)  # the last phase never blends
    assert c.phase_at_tokens(1999).blend == 0.0


def test_phase_at_in_steps_and_tokens() -> None:
    cfg = CurriculumConfig(phase_steps=[5])
    assert phase_at(cfg, 4, num_buckets=2).phase == 0
    assert phase_at(cfg, 5, num_buckets=2).phase == 1
    tok = CurriculumConfig(phase_tokens=[1000])
    assert phase_at(tok, 9, num_buckets=2, tokens_per_step=100).phase == 0
    assert phase_at(tok, 10, num_buckets=2, tokens_per_step=100).phase == 1
    with pytest.raises(MoEAdaptConfigError, match="tokens_per_step"):
        phase_at(tok, 10, num_buckets=2)


def test_rewarm_lr_factor() -> None:
    c = Curriculum(CurriculumConfig(phase_steps=[10], rewarm_steps=4, rewarm_start=0.2), 2)
    assert [c.lr_factor(s) for s in (0, 3, 9)] == [1.0, 1.0, 1.0]  # no re-warm in the first phase
    assert [c.lr_factor(s) for s in (10, 11, 13, 14)] == pytest.approx([0.2, 0.4, 0.8, 1.0])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"order": "hardest_first"}, r"curriculum.order='hardest_first' is invalid: choose one of"),
        ({"pacing": "cosine"}, r"curriculum.pacing='cosine' is invalid"),
        ({"phase_tokens": [1], "phase_steps": [1]}, r"curriculum.phase_steps=\[1\] is invalid: set"),
        ({"phase_tokens": []}, r"curriculum.phase_tokens=\[\] is invalid"),
        ({"phase_tokens": [10, 0]}, r"every phase length must be >= 1"),
        ({"blend_fraction": 0.0}, r"curriculum.blend_fraction=0.0 is invalid"),
        ({"rewarm_steps": -1}, r"curriculum.rewarm_steps=-1 is invalid"),
        ({"rewarm_start": 1.5}, r"curriculum.rewarm_start=1.5 is invalid"),
    ],
)
def test_bad_config_names_key_and_value(kwargs: dict, match: str) -> None:
    with pytest.raises(MoEAdaptConfigError, match=match):
        CurriculumConfig(**kwargs)


def test_more_phases_than_buckets_fails() -> None:
    with pytest.raises(MoEAdaptConfigError, match=r"4 phases \(one per length, and the last, which runs to"):
        Curriculum(CurriculumConfig(phase_tokens=[1, 1, 1]), 3)


def test_config_is_omegaconf_structured() -> None:
    from omegaconf import OmegaConf

    cfg = OmegaConf.structured(CurriculumConfig)
    merged = OmegaConf.merge(cfg, {"phase_tokens": [5, 5], "pacing": "linear"})
    obj = OmegaConf.to_object(merged)
    assert isinstance(obj, CurriculumConfig) and obj.phase_tokens == [5, 5]


def test_describe_names_every_phase() -> None:
    c = Curriculum(CurriculumConfig(phase_steps=[40, 30]), 3)
    want = "3 phases (easy_to_hard): buckets [0] for 40 steps, [1] for 30 steps, [2] to the end"
    assert c.describe() == want
    assert Curriculum(CurriculumConfig(), 3).describe() == "1 phase: buckets [0, 1, 2]"


def test_a_curriculum_longer_than_max_steps_is_named() -> None:
    steps = CurriculumConfig(phase_steps=[40, 30])  # three phases; the last starts at step 70
    assert unreached_phases(steps, 71, tokens_per_step=8) is None
    msg = unreached_phases(steps, 70, tokens_per_step=8)
    assert msg is not None and "curriculum.phase_steps [40, 30] sum to 70 steps but cpt.max_steps=70" in msg
    assert "only 2 of the curriculum's 3 phases train" in msg
    assert "only 1 of" in (unreached_phases(steps, 30, tokens_per_step=8) or "")
    tokens = CurriculumConfig(phase_tokens=[100, 100])  # 8 tokens a step: phase 2 starts at step 25
    assert unreached_phases(tokens, 26, tokens_per_step=8) is None
    msg = unreached_phases(tokens, 25, tokens_per_step=8)
    assert msg is not None and "sum to 200 tokens (25 steps of 8 tokens) but cpt.max_steps=25" in msg
    assert unreached_phases(CurriculumConfig(), 1, tokens_per_step=8) is None  # one phase: always reached
