"""``compressor.threads``: the per-stage thread rule, and the pure helpers of ``benchmarks/contention.py``.

No timing here: the numbers behind the rule are measured by ``python -m benchmarks.contention``.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.contention import (ROW_KEYS, check_payload, contended_cap, default_name, settings_for, slowdown,
                                   summarise)
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


def test_refresh_redecides_inside_a_stage_and_apply_still_restores() -> None:
    before = torch.get_num_threads()
    busy = [0.0]
    policy = ThreadPolicy(cores=2, probe=lambda: busy[0])
    with policy.apply("train") as count:
        assert count == 2 and torch.get_num_threads() == 2
        busy[0] = 1.5  # a neighbour started mid-stage
        assert policy.refresh("train") == 1
        assert torch.get_num_threads() == 1
        assert policy.chosen["train"] == 1
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
    # a scoring run is capped over the whole compress() call: its bound divides by the quiet call's time
    assert slowdown({"seconds": 10.0, "wall_seconds_call": 20.0}, {"seconds": None, "seconds_at_least": 60.0})[
        "slowdown"] == 3.0
    # a failed contended run gives no ratio
    assert slowdown({"seconds": 10.0}, {"seconds": None, "seconds_at_least": None, "error": "boom"})[
        "slowdown"] is None


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
    assert cell["after"] == "threads_1" and cell["before"] == "threads_2"
    one, two = cell["settings"]["threads_1"], cell["settings"]["threads_2"]
    assert one["slowdown"] == 1.4 and one["meets_goal"] is True
    assert two["contended_s"] == 150.0
    assert two["bound"] == "at_least" and two["slowdown"] == 18.75
    assert two["threads"] == {"quiet": 2, "contended": 2}


def test_summary_keeps_a_setting_named_policy_apart_from_the_pointers() -> None:
    rows = [_row("train", "threads_2", "quiet", 2.0, roles=["torch_default"], threads=2),
            _row("train", "threads_2", "contended", 9.0, roles=["torch_default"], threads=2),
            _row("train", "policy", "quiet", 2.1, roles=["policy"], threads=2),
            _row("train", "policy", "contended", 6.3, roles=["policy"], threads=1)]
    cell = summarise(rows)["resnet20"]["train"]
    assert cell["before"] == "threads_2" and cell["after"] == "policy"
    assert cell["settings"]["policy"]["threads"] == {"quiet": 2, "contended": 1}
    assert cell["settings"]["policy"]["slowdown"] == 3.0


def test_results_schema_is_checked() -> None:
    rows = [_row("cmi", "threads_1", "quiet", 1.0)]
    payload = {"benchmark": "contention", "goal": "", "command": "", "settings": {}, "machine": {}, "rows": rows,
               "summary": summarise(rows)}
    check_payload(payload)
    with pytest.raises(ValueError, match="lack"):
        check_payload({k: v for k, v in payload.items() if k != "machine"})
    broken = dict(rows[0])
    del broken["others_during"]
    with pytest.raises(ValueError, match="others_during"):
        check_payload({**payload, "rows": [broken]})


def test_the_contended_cap_follows_the_quiet_time_within_bounds() -> None:
    assert contended_cap({"seconds": 2.0}, 120.0) == 30.0  # never under 30 s
    assert contended_cap({"seconds": 20.0}, 120.0) == 60.0  # 3x the quiet time...
    assert contended_cap({"seconds": 20.0, "wall_seconds_call": 30.0}, 120.0) == 90.0  # ...of the capped span
    assert contended_cap({"seconds": 50.0}, 120.0) == 120.0  # never over --cap
    assert contended_cap({"seconds": None, "seconds_at_least": 120.0}, 120.0) == 120.0


def test_results_file_names_say_what_was_run() -> None:
    assert default_name(["resnet20", "resnet56"], ["cmi", "mipp"]) == "contention.json"
    assert default_name(["resnet20"], ["cmi", "mipp"]) == "contention-resnet20.json"
    assert default_name(["resnet20", "resnet56"], ["train", "evaluate"]) == "contention-train-evaluate.json"


def test_training_re_decides_its_threads_after_every_epoch() -> None:
    from compressor.pipeline import RefreshThreads
    from compressor.training import TrainConfig, Trainer

    busy, seen = [0.0], []
    policy = ThreadPolicy(cores=2, probe=lambda: busy[0])

    class Neighbour(RefreshThreads):
        def on_epoch_end(self, state) -> None:
            busy[0] = 1.5  # a neighbour starts during the first epoch
            super().on_epoch_end(state)
            seen.append(torch.get_num_threads())

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    data = [(torch.randn(8, 1, 2, 2), torch.randint(0, 2, (8,)))]
    before = torch.get_num_threads()
    with policy.apply("train"):
        Trainer(TrainConfig(epochs=2, lr=0.1), device=torch.device("cpu"), callbacks=[Neighbour(policy)]).fit(
            model, data)
    assert seen == [1, 1] and policy.chosen["train"] == 1
    assert torch.get_num_threads() == before
    with ThreadPolicy(threads=2, probe=never_probed).apply("train"):
        RefreshThreads(ThreadPolicy(threads=2, probe=never_probed)).on_epoch_end(None)  # type: ignore[arg-type]
        assert torch.get_num_threads() == 2
