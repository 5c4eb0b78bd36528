"""The stage registry: every stage of the config has one module, in pipeline order."""

from __future__ import annotations

from moe_adapt.config import STAGE_ORDER
from moe_adapt.stages import STAGES


def test_registry_order_is_the_pipeline_order():
    assert tuple(STAGES) == STAGE_ORDER
    assert all(stage.name == name for name, stage in STAGES.items())


def test_only_cpt_runs_on_every_rank():
    assert [name for name, stage in STAGES.items() if stage.distributed] == [
        "cpt",
        "teacher",
        "distill",
        "eval",
    ]
