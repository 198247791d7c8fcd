"""The shared registry and method planning."""

from __future__ import annotations

import pytest

from compressor._registry import Registry
from compressor.errors import InputError, UnknownNameError
from compressor.methods import REGISTRY, build_method, list_methods
from compressor.methods.baselines import L1
from compressor.methods.chain import Chain


def test_registry_rejects_duplicates_and_suggests_close_names() -> None:
    reg: Registry[int] = Registry("colour")
    reg.add("red", 1)
    reg.add("green", 2)
    assert reg.get("red") == 1 and reg.names() == ["green", "red"] and "red" in reg
    with pytest.raises(ValueError, match="already registered"):
        reg.add("red", 3)
    with pytest.raises(UnknownNameError, match="Did you mean 'red'"):
        reg.get("rad")


def test_a_second_method_with_a_taken_name_is_refused() -> None:
    with pytest.raises(ValueError, match="already registered"):
        REGISTRY.add("l1", L1)


def test_build_method_parses_chains() -> None:
    assert {"l1", "random", "cmi", "mipp", "tucker"} <= set(list_methods())
    method = build_method("l1")
    assert isinstance(method, L1)
    chain = build_method("cmi+tucker", {"chain_split": 0.25})
    assert isinstance(chain, Chain) and chain.label == "cmi+tucker" and chain.options.split == 0.25
    assert chain.default_metric == "params" and chain.requires_data
    with pytest.raises(UnknownNameError, match="unknown method 'l3'"):
        build_method("l3")
    with pytest.raises(InputError, match="at most one channel-pruning method"):
        build_method("l1+random")
    with pytest.raises(InputError, match="at most one channel-pruning method, first or after blocks"):
        build_method("tucker+l1")
    assert build_method("blocks+l1").label == "blocks+l1"
    with pytest.raises(InputError, match="--chain-split must be in"):
        build_method("l1+tucker", {"chain_split": 1.0})
