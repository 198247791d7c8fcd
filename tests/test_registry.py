"""The shared registry and method planning."""

from __future__ import annotations

import pytest

from compressor._registry import Registry
from compressor.errors import InputError, UnknownNameError
from compressor.pruning.scorers import Scorer, register_scorer
from compressor.transforms import PruneTransform, list_methods, plan


def test_registry_rejects_duplicates_and_suggests_close_names() -> None:
    reg: Registry[int] = Registry("colour")
    reg.add("red", 1)
    reg.add("green", 2)
    assert reg.get("red") == 1 and reg.names() == ["green", "red"] and "red" in reg
    with pytest.raises(ValueError, match="already registered"):
        reg.add("red", 3)
    with pytest.raises(UnknownNameError, match="Did you mean 'red'"):
        reg.get("rad")


def test_a_second_scorer_with_a_taken_name_is_refused() -> None:
    with pytest.raises(ValueError, match="already registered"):
        @register_scorer
        class Clash(Scorer):  # noqa: F841 - registration is the side effect under test
            name = "l1"

            def score(self, ctx):
                raise NotImplementedError


def test_plan_parses_chains() -> None:
    assert {"l1", "random"} <= set(list_methods())
    steps = plan("l1")
    assert len(steps) == 1 and isinstance(steps[0], PruneTransform) and steps[0].scorer == "l1"
    with pytest.raises(UnknownNameError, match="unknown method 'l3'"):
        plan("l3")
    with pytest.raises(InputError, match="at most one pruning method"):
        plan("l1+random")
