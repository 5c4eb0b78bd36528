"""The pipeline's stages, one thin module each, and the ordered registry the runner dispatches on.

Each module declares ``KEYS`` (its fingerprint keys), ``DISTRIBUTED`` and ``run(ctx)`` beside its code
(the contract: :mod:`moe_adapt.stages.base`); the work itself lives in the library packages
(:mod:`moe_adapt.data`, :mod:`moe_adapt.upcycle`, :mod:`moe_adapt.cpt`, ...). To add a stage: write
``stages/<name>.py``, add it to :data:`STAGES` and its name to
:data:`moe_adapt.config.schema.STAGE_ORDER`, at the same place.
"""

from __future__ import annotations

from types import ModuleType

from moe_adapt.stages import cpt, data, distill, eval, export, init_dense, report, teacher, upcycle
from moe_adapt.stages.base import Stage, StageContext

__all__ = ["STAGES", "Stage", "StageContext"]


def _stage(module: ModuleType) -> Stage:
    name = module.__name__.rsplit(".", 1)[1]
    return Stage(
        name, module.run, tuple(module.KEYS), bool(module.DISTRIBUTED), getattr(module, "after", None)
    )


STAGES: dict[str, Stage] = {
    s.name: s for s in map(_stage, (init_dense, data, upcycle, cpt, teacher, distill, eval, export, report))
}
"""Every stage, in pipeline order (the order of :data:`moe_adapt.config.schema.STAGE_ORDER`)."""
