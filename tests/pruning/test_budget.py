"""The one budget search (issue 11, item 4): floors, alignment halving, the tolerance, one error wording, and the same
behaviour for the three callers (uniform allocation, cmi's shared ``t``, mipp's confidence and cap)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch

from compressor.errors import PruningError
from compressor.methods.baselines import L1
from compressor.methods.cmi import CMI
from compressor.methods.mipp import MIPP
from compressor.methods.prune import ScoringContext
from compressor.models import create_model
from compressor.pruning import budget, engine


@dataclass(frozen=True)
class G:
    root: str
    channels: int


def _filters_meter(groups: list[G]) -> budget.Meter:
    """Removed fraction of the channels themselves (what ``filters`` is for a chain of plain convs)."""
    total = sum(g.channels for g in groups)
    return budget.Meter([g.root for g in groups],
                        lambda keep, _: 1 - sum(keep[g.root] for g in groups) / total)


# --------------------------------------------------------------------------------------------- the pieces


def test_alignments_halve_down_to_one() -> None:
    assert budget.alignments(8) == [8, 4, 2, 1]
    assert budget.alignments(16) == [16, 8, 4, 2, 1]
    assert budget.alignments(6) == [6, 3, 1]
    assert budget.alignments(1) == budget.alignments(0) == [1]


def test_floors_keep_at_least_one_channel_and_the_alignment() -> None:
    assert budget.floor_keep(64, min_keep=0.1, round_to=1) == 7
    assert budget.floor_keep(64, min_keep=0.1, round_to=8) == 8
    assert budget.floor_keep(3, min_keep=1e-6, round_to=1) == 1  # never zero channels
    assert budget.floor_keep(6, min_keep=0.1, round_to=8) == 6  # capped at the width


def test_aligned_to_is_one_of_the_halved_alignments() -> None:
    assert [budget.aligned_to(k, 64, 8) for k in (48, 60, 62, 63, 64)] == [8, 4, 2, 1, None]
    assert budget.aligned_to(32, 64, 4) == 4  # never more than asked


def test_meter_caches_allocations_and_counts_evaluations() -> None:
    groups = [G("a", 8), G("b", 8)]
    meter = _filters_meter(groups)
    assert meter({"a": 4, "b": 8}) == meter({"a": 4, "b": 8}) == 0.25
    assert meter.evaluations == 1
    meter({"a": 4, "b": 8}, scores="given")  # explicit scores (mipp's passes) are always measured
    assert meter.evaluations == 2


def test_bisect_records_every_trial_and_stops_near_the_target() -> None:
    trials = budget.bisect(lambda p: budget.Trial({}, 1 - p, {"p": p}), 0.3, 0.0, 1.0, iterations=40, stop=1e-3)
    assert [t.params["p"] for t in trials[:3]] == [0.5, 0.75, 0.625]
    assert abs(trials[-1].achieved - 0.3) < 1e-3 and len(trials) < 40


# ----------------------------------------------------------------------------------------------- the policy


def test_too_coarse_alignment_halves_and_keeps_coarser_groups() -> None:
    """192 channels in three groups: blocks of 8 are 4.2 points, so 0.0625 (12 channels) is missed by more than 2 at
    alignment 8; at 4 it lands, with one group still at 8 (the ceiling from the coarser search) and one at 4."""
    groups = [G("a", 64), G("b", 64), G("c", 64)]
    meter = _filters_meter(groups)
    alloc = budget.allocate_uniform(groups, meter, target=0.0625, metric="filters", min_keep=0.1, round_to=8)
    assert alloc.achieved == pytest.approx(0.0625)
    assert sorted(alloc.keep.values()) == [56, 60, 64]
    assert sorted(alloc.aligned_to.values(), key=str) == [4, 8, None]
    assert not alloc.aligned and alloc.round_to == 8 and alloc.evaluations == meter.evaluations
    summary = alloc.summary()
    assert summary["aligned"] is False and summary["achieved"] == 0.0625 and "blocks" in summary


def test_meet_target_caps_finer_searches_by_the_coarser_allocation_under_the_target() -> None:
    groups = [G("a", 32), G("b", 32)]
    meter = _filters_meter(groups)
    seen: list[tuple[int, dict | None]] = []

    def search_at(align: int, cap: dict | None) -> list[budget.Trial]:
        seen.append((align, None if cap is None else dict(cap)))
        if align == 8:  # 0.25 and 0.5 bracket 0.4
            return [meter.trial({"a": 24, "b": 24}), meter.trial({"a": 16, "b": 16})]
        if align in (4, 2):  # still too coarse
            return [meter.trial({"a": 20, "b": 24}), meter.trial({"a": 20, "b": 16})]
        return [meter.trial({"a": 19, "b": 20})]  # 0.390625

    alloc = budget.meet_target(groups, search_at, meter, target=0.4, metric="filters", round_to=8, min_keep=0.1)
    assert seen == [(8, None), (4, {"a": 24, "b": 24}), (2, {"a": 20, "b": 24}), (1, {"a": 20, "b": 24})]
    assert alloc.keep == {"a": 19, "b": 20} and alloc.aligned_to == {"a": 1, "b": 4}


def test_unreachable_target_is_refused_before_any_search() -> None:
    groups = [G("a", 10), G("b", 10)]
    meter = _filters_meter(groups)

    def search_at(align: int, cap: dict | None) -> list[budget.Trial]:
        raise AssertionError("no search when the floors cannot reach the target")

    with pytest.raises(PruningError) as info:
        budget.meet_target(groups, search_at, meter, target=0.9, metric="filters", round_to=8, min_keep=0.5)
    assert str(info.value) == ("target 0.90 of filters is not reachable within ±0.02: the closest is 0.500 and at "
                               "most 0.500 can be removed with min_keep=0.5 (2 prunable groups); lower --target or "
                               "--min-keep")


def test_a_step_over_the_target_says_what_is_closest() -> None:
    """One 4-channel group removes 0, 25, 50 or 75%: 0.62 is within reach but between two steps."""
    groups = [G("a", 4)]
    with pytest.raises(PruningError, match=r"the closest is 0\.500 .* try another --target \(e\.g\. 0\.50\)$"):
        budget.allocate_uniform(groups, _filters_meter(groups), target=0.62, metric="filters", min_keep=0.1,
                                round_to=8)


# ------------------------------------------------------------------------------------------ three callers


def _context(target: float, *, min_keep: float = 0.1) -> ScoringContext:
    torch.manual_seed(0)
    model = create_model("samplenet").eval()
    example = torch.zeros(1, 3, 32, 32)
    graph = engine.build_graph(model, example)
    gen = torch.Generator().manual_seed(1)
    calib = [(torch.randn(64, 3, 32, 32, generator=gen), torch.arange(64) % 10) for _ in range(2)]
    return ScoringContext(model=model, graph=graph, groups=engine.discover_groups(model, graph), example_input=example,
                          target=target, metric="filters", device=torch.device("cpu"), seed=0, calib=calib,
                          num_classes=10, round_to=8, min_keep=min_keep)


def _allocations(ctx: ScoringContext) -> dict[str, dict]:
    """What each caller chose: the uniform allocation of l1's scores, cmi's and mipp's own allocations."""
    scores = L1().score(ctx).scores
    uniform = engine.allocate_uniform(ctx.model, ctx.example_input, ctx.groups, scores, target=ctx.target,
                                      metric=ctx.metric, min_keep=ctx.min_keep, round_to=ctx.round_to)
    out = {"uniform": {**uniform.summary(), "keep": uniform.keep}}
    for method in (CMI(), MIPP()):
        scored = method.score(ctx)
        out[method.name] = {**scored.report["allocation"], "keep": scored.keep}
    return out


def test_the_three_callers_halve_the_alignment_alike() -> None:
    """samplenet at 0.33 of its filters: blocks of 8 step over ±2 points for every caller; each lands at 4, with
    the groups that need not shrink further still at 8, and no count at 2 or 1 (cmi and mipp used to drop to 1)."""
    ctx = _context(0.33)
    floors = {g.root: budget.floor_keep(g.channels, min_keep=0.1, round_to=4) for g in ctx.groups}
    for name, alloc in _allocations(ctx).items():
        assert abs(alloc["achieved"] - 0.33) <= budget.TARGET_TOLERANCE, name
        assert alloc["round_to"] == 8 and not alloc["aligned"], name
        assert set(alloc["aligned_to"].values()) <= {8, 4, None} and 4 in alloc["aligned_to"].values(), name
        assert all(floors[r] <= k for r, k in alloc["keep"].items()), name
        pruned = engine.removed_fraction(ctx.model, ctx.example_input, ctx.groups, L1().score(ctx).scores,
                                         alloc["keep"], metric="filters")
        assert pruned == pytest.approx(alloc["achieved"], abs=1e-4), name


def test_the_three_callers_refuse_an_unreachable_target_in_the_same_words() -> None:
    ctx = _context(0.95, min_keep=0.5)
    messages = set()
    scores = L1().score(ctx).scores
    with pytest.raises(PruningError) as info:
        engine.allocate_uniform(ctx.model, ctx.example_input, ctx.groups, scores, target=0.95, metric="filters",
                                min_keep=0.5, round_to=8)
    messages.add(str(info.value))
    for method in (CMI(), MIPP()):
        with pytest.raises(PruningError) as info:
            method.score(ctx)
        messages.add(str(info.value))
    assert len(messages) == 1, messages
    (message,) = messages
    assert message.startswith("target 0.95 of filters is not reachable within ±0.02") and "\n" not in message
    assert "can be removed with min_keep=0.5" in message and message.endswith("lower --target or --min-keep")
