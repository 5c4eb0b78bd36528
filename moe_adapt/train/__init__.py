"""Continued pretraining: the data mixture sampler and the difficulty curriculum (engine-agnostic)."""

from moe_adapt.train.curriculum import Curriculum, CurriculumConfig, PhasePoint, phase_at
from moe_adapt.train.sampler import Batch, DataExhaustedError, MixtureConfig, MixtureSampler

__all__ = [
    "Batch",
    "Curriculum",
    "CurriculumConfig",
    "DataExhaustedError",
    "MixtureConfig",
    "MixtureSampler",
    "PhasePoint",
    "phase_at",
]
