"""The trainer tests train on the cpt sampler's synthetic shards (:mod:`tests.cpt.conftest`)."""

from tests.cpt.conftest import make_shards

__all__ = ["make_shards"]
