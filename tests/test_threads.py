"""``compressor.threads``: the per-stage thread rule, and the pure helpers of ``benchmarks/contention.py``.

No timing here: the numbers behind the rule are measured by ``python -m benchmarks.contention``.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.contention import ROW_KEYS, check_payload, pre_seconds, settings_for, slowdown, summarise
from compressor.threads import (
    PROBED,
    STAGES,
    ThreadPolicy,
    available_cpus,
    busy_cores,
    free_threads,
    others_busy_cores,
    torch_default_threads,
)


def never_probed() -> float:
    raise AssertionError("the machine must not be probed here")


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("stage", STAGES)
def test_a_user_given_count_wins_for_every_stage_without_probing(stage: str, threads: int) -> None:
    policy = ThreadPolicy(threads, cores=2, probe=never_probed)
    assert policy.for_stage(stage) == threads
    assert policy.onnxruntime() == threads
    assert policy.chosen[stage] == threads


def test_defaults_score_on_one_thread_and_leave_onnxruntime_its_own() -> None:
    policy = ThreadPolicy(cores=8, probe=never_probed)
    assert policy.for_stage("score") == 1
    assert policy.for_stage("benchmark") is None
    assert policy.onnxruntime() is None


@pytest.mark.parametrize("stage", PROBED)
@pytest.mark.parametrize(("others", "expected"), [(0.0, 2), (0.1, 2), (0.8, 1), (2.0, 1), (5.0, 1), (None, 2)])
def test_probed_stages_use_the_cpus_others_leave_free(stage: str, others: float | None, expected: int) -> None:
    assert ThreadPolicy(cores=2, probe=lambda: others).for_stage(stage) == expected


def test_free_threads_never_exceeds_the_cores_nor_drops_below_one() -> None:
    assert free_threads(16, 32, 4.0) == 16  # SMT: 28 logical CPUs free, still one thread per physical core
    assert free_threads(16, 16, 4.0) == 12
    assert free_threads(16, 16, 3.8) == 12  # floor(16 - 3.8 + 0.25) = floor(12.45)
    assert free_threads(4, 4, 0.24) == 4  # a CPU at most 1/4 busy counts as free...
    assert free_threads(4, 4, 0.26) == 3  # ...one busier does not
    assert free_threads(1, 1, 0.9) == 1


@pytest.mark.parametrize("bad", ["score ", "scoring", "Score", "onnx", ""])
def test_unknown_stage_names_are_refused(bad: str) -> None:
    policy = ThreadPolicy(2, probe=never_probed)
    with pytest.raises(ValueError, match="unknown stage"):
        policy.for_stage(bad)
    with pytest.raises(ValueError, match="unknown stage"):
        with policy.apply(bad):
            pass


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_invalid_thread_counts_are_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="positive int"):
        ThreadPolicy(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive int"):
        ThreadPolicy(cores=bad)  # type: ignore[arg-type]


def test_apply_sets_torch_threads_and_restores_them() -> None:
    before = torch.get_num_threads()
    with ThreadPolicy(2, probe=never_probed).apply("train") as count:
        assert count == 2
        assert torch.get_num_threads() == 2
        with ThreadPolicy(cores=2, probe=never_probed).apply("score") as inner:  # nested stages restore in order
            assert inner == 1
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == before


def test_apply_restores_torch_threads_after_an_exception() -> None:
    before = torch.get_num_threads()
    with pytest.raises(RuntimeError, match="boom"):
        with ThreadPolicy(2, probe=never_probed).apply("evaluate"):
            assert torch.get_num_threads() == 2
            raise RuntimeError("boom")
    assert torch.get_num_threads() == before


def test_benchmark_stage_leaves_torch_threads_alone_and_yields_the_onnxruntime_count() -> None:
    before = torch.get_num_threads()
    with ThreadPolicy(cores=4, probe=never_probed).apply("benchmark") as count:
        assert count is None
        assert torch.get_num_threads() == before
    with ThreadPolicy(3, probe=never_probed).apply("benchmark") as count:
        assert count == 3
        assert torch.get_num_threads() == before


def test_default_cores_and_cpus_are_positive() -> None:
    assert torch_default_threads() >= 1
    assert ThreadPolicy().cores == torch_default_threads()
    assert available_cpus() >= 1


def test_busy_cores_from_cpu_time_samples() -> None:
    # fields: user nice system idle iowait irq softirq steal
    before = [1000, 0, 100, 5000, 50, 0, 0, 0]
    assert busy_cores(before, before, cpus=2) == 0.0  # no time passed
    assert busy_cores(before, [1100, 0, 100, 5100, 50, 0, 0, 0], cpus=2) == 1.0  # half the ticks busy
    assert busy_cores(before, [1000, 0, 100, 5150, 100, 0, 0, 0], cpus=4) == 0.0  # idle and iowait only
    assert busy_cores(before, [1100, 0, 100, 5000, 50, 0, 0, 100], cpus=2) == 2.0  # steal counts as busy


def test_others_busy_cores_is_a_plausible_number() -> None:
    others = others_busy_cores(0.05)
    assert others is None or 0.0 <= others <= (torch_default_threads() + available_cpus()) * 2


# ------------------------------------------------------------------------------------ benchmarks/contention.py


def _row(task: str, setting: str, condition: str, seconds: float | None, *, roles: list[str] | None = None,
         at_least: float | None = None, threads: int = 1) -> dict:
    row = dict.fromkeys(ROW_KEYS)
    row.update(model="resnet20", task=task, stage="score", setting=setting, roles=roles or [], condition=condition,
               threads=threads, seconds=seconds, seconds_at_least=at_least, timed_out=seconds is None)
    return row


def test_slowdown_is_contended_over_quiet() -> None:
    assert slowdown({"seconds": 10.0}, {"seconds": 15.0}) == {"slowdown": 1.5, "bound": "exact", "meets_goal": True}
    assert slowdown({"seconds": 4.0}, {"seconds": 8.0})["meets_goal"] is False  # the goal is strictly under 2x
    assert slowdown({"seconds": 3.0}, {"seconds": 1.0})["slowdown"] == 0.33


def test_a_capped_contended_run_gives_a_lower_bound() -> None:
    assert slowdown({"seconds": 10.0}, {"seconds": None, "seconds_at_least": 150.0}) == {
        "slowdown": 15.0, "bound": "at_least", "meets_goal": False}
    # a lower bound under the goal decides nothing
    assert slowdown({"seconds": 100.0}, {"seconds": None, "seconds_at_least": 150.0})["meets_goal"] is None
    assert slowdown({"seconds": None}, {"seconds": 5.0}) == {"slowdown": None, "bound": None, "meets_goal": None}


def test_settings_always_include_one_thread_and_torchs_default() -> None:
    assert settings_for(1, 2) == {"threads_1": {"threads": 1, "roles": ["policy"]},
                                  "threads_2": {"threads": 2, "roles": ["torch_default"]}}
    assert settings_for(1, 1) == {"threads_1": {"threads": 1, "roles": ["policy", "torch_default"]}}
    probed = settings_for(None, 4)
    assert probed["policy"] == {"threads": None, "roles": ["policy"]}
    assert [s["threads"] for s in probed.values()] == [1, 4, None]


def test_summary_pairs_quiet_with_contended_and_names_old_and_policy() -> None:
    rows = [_row("mipp", "threads_1", "quiet", 10.0, roles=["policy"]),
            _row("mipp", "threads_1", "contended", 14.0, roles=["policy"]),
            _row("mipp", "threads_2", "quiet", 8.0, roles=["torch_default"], threads=2),
            _row("mipp", "threads_2", "contended", None, roles=["torch_default"], at_least=150.0, threads=2)]
    cell = summarise(rows)["resnet20"]["mipp"]
    assert cell["policy"] == "threads_1" and cell["old"] == "threads_2"
    assert cell["threads_1"]["slowdown"] == 1.4 and cell["threads_1"]["meets_goal"] is True
    assert cell["threads_2"]["contended_s"] == 150.0
    assert cell["threads_2"]["bound"] == "at_least" and cell["threads_2"]["slowdown"] == 18.75
    assert cell["threads_2"]["threads"] == {"quiet": 2, "contended": 2}


def test_results_schema_is_checked() -> None:
    rows = [_row("cmi", "threads_1", "quiet", 1.0)]
    payload = {"benchmark": "contention", "goal": "", "settings": {}, "machine": {}, "rows": rows,
               "summary": summarise(rows)}
    check_payload(payload)
    with pytest.raises(ValueError, match="lack"):
        check_payload({k: v for k, v in payload.items() if k != "machine"})
    broken = dict(rows[0])
    del broken["others_during"]
    with pytest.raises(ValueError, match="others_during"):
        check_payload({**payload, "rows": [broken]})


def test_pre_seconds_sums_the_stages_before_compress() -> None:
    assert pre_seconds({"timings": {"load": 1.25, "evaluate_original": 0.5, "compress": 30.0}}) == 1.75
    assert pre_seconds(None) == 0.0
    assert pre_seconds({"timings": None}) == 0.0
