"""Continued pretraining's data stream: the ``cpt``/``mixture``/``curriculum`` schemas (:mod:`.config`),
the mixture sampler (:mod:`.sampler`) over the data stage's shards (:mod:`.streams`), the difficulty
curriculum (:mod:`.curriculum`) and the held-out loss and forgetting report (:mod:`.heldout`); the
stage itself is :mod:`moe_adapt.stages.cpt`. Engine-agnostic.
"""

from moe_adapt.cpt.config import CptConfig, CurriculumConfig, MixtureConfig
from moe_adapt.cpt.curriculum import Curriculum, PhasePoint, phase_at
from moe_adapt.cpt.sampler import DataExhaustedError, MixtureBatch, MixtureSampler

__all__ = [
    "CptConfig",
    "Curriculum",
    "CurriculumConfig",
    "DataExhaustedError",
    "MixtureBatch",
    "MixtureConfig",
    "MixtureSampler",
    "PhasePoint",
    "phase_at",
]
