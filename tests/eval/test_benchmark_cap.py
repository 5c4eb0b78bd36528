"""eval.benchmark_max_items caps the benchmark items scored, keeping the languages parallel (issue 13)."""

from __future__ import annotations

import pytest

from moe_adapt.errors import MoEAdaptConfigError
from moe_adapt.eval.config import EvalConfig
from moe_adapt.eval.evaluate import cap_items
from moe_adapt.eval.mc import MCItem, MCSet


def _set(keys: list[str | None]) -> MCSet:
    return MCSet([MCItem(f"i{n}", "q", ("a", "b"), 0, k) for n, k in enumerate(keys)], malformed=1)


def test_cap_keeps_the_items_parallel_to_the_source_languages_first() -> None:
    sets = {"ar": _set(["c", "b", "a", "d"]), "en": _set(["a", "b", "c", "d"])}
    capped = cap_items(sets, 2, "en")
    assert [it.pair_key for it in capped["en"].items] == ["a", "b"]
    assert [it.pair_key for it in capped["ar"].items] == ["b", "a"]  # the same pairs, in file order
    assert capped["ar"].malformed == 1
    assert cap_items(sets, None, "en") is sets
    assert [it.pair_key for it in cap_items(sets, 9, "en")["ar"].items] == ["c", "b", "a", "d"]


def test_cap_without_parallel_keys_takes_the_first_items() -> None:
    capped = cap_items({"ar": _set([None, None, None]), "en": _set(["x", "y", "z"])}, 2, "en")
    assert [it.id for it in capped["ar"].items] == ["i0", "i1"]


def test_cap_must_be_positive() -> None:
    with pytest.raises(MoEAdaptConfigError, match=r"^eval.benchmark_max_items=0 is invalid"):
        EvalConfig(benchmark_max_items=0)
