"""``benchmarks/cmi_scoring.py``: the naive reference agrees with the library, so its speedups compare like with
like."""

from __future__ import annotations

import pytest
import torch

from benchmarks.cmi_scoring import (
    capped_channels,
    evaluations,
    library_greedy,
    measure_cpu,
    naive_entropy,
    naive_gram,
    naive_greedy,
    summarise_cell,
    synthetic_layer,
)
from compressor.scoring.kernels import gram_matrix, label_gram
from compressor.scoring.mutual_info import joint_gram, renyi_entropy
from compressor.scoring.selection import greedy_select

ALPHAS = (2.0, 1.01)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_naive_and_library_give_the_same_greedy_ordering(alpha: float) -> None:
    x, y, informative = synthetic_layer(96, 10, dim=4, seed=3)
    naive = naive_greedy(x, y, alpha=alpha, steps=10)
    library = library_greedy(x, y, alpha=alpha, steps=10)
    assert naive.order == library.order
    assert sorted(naive.order[: len(informative)]) == informative  # the planted channels come first
    torch.testing.assert_close(torch.tensor(naive.information), torch.tensor(library.information),
                               rtol=0.0, atol=1e-9)


@pytest.mark.parametrize("alpha", ALPHAS)
def test_the_scorers_greedy_prefix_is_the_reference_ordering(alpha: float) -> None:
    x, y, _ = synthetic_layer(96, 10, dim=4, seed=4)
    chosen = greedy_select(gram_matrix(x), label_gram(y, 10, dtype=x.dtype), alpha=alpha)
    naive = naive_greedy(x, y, alpha=alpha, steps=chosen.sufficient)
    assert chosen.sufficient >= 4
    assert chosen.order[: chosen.sufficient].tolist() == naive.order


@pytest.mark.parametrize("alpha", ALPHAS)
def test_naive_grams_and_entropies_match_the_library(alpha: float) -> None:
    x, _, _ = synthetic_layer(80, 5, dim=4, seed=5)
    grams = gram_matrix(x)
    rebuilt = torch.stack([naive_gram(x[c]) for c in range(5)])
    torch.testing.assert_close(rebuilt, grams, rtol=0.0, atol=1e-12)
    for k in range(1, 6):
        joint = rebuilt[0]
        for g in rebuilt[1:k]:
            joint = joint * g
        joint = joint / joint.trace()
        expected = float(renyi_entropy(joint_gram(*grams[:k]), alpha=alpha))
        assert naive_entropy(joint, alpha) == pytest.approx(expected, abs=1e-9)


def test_capping_keeps_the_predicted_cost_under_the_cap() -> None:
    assert evaluations(64, 4) == 64 + 63 + 62 + 61 and evaluations(3, 4) == 6
    m = capped_channels(64, 4, 0.01, 1.0)
    assert 6 < m < 64 and evaluations(m, 4) * 0.01 <= 1.0 < evaluations(m + 1, 4) * 0.01
    assert capped_channels(64, 4, 1e-6, 5.0) == 64
    assert capped_channels(64, 4, 10.0, 5.0) == 6  # never fewer than 6 channels
    assert capped_channels(5, 4, 10.0, 5.0) == 5


def test_capped_times_are_scaled_and_labelled() -> None:
    def runs(seconds: float) -> list[dict]:
        return [{"seconds": seconds, "peak_mb": 1.0, "rss_floor_mb": 0.0, "order": [0, 1], "extra": [5.0]}]

    channels = {"library_gram": 64, "library_a2": 64, "library_a1.01": 8, "naive": 8, "library_full_a2": 64}
    samples = {"library_gram": runs(0.1), "library_a2": runs(0.5), "library_a1.01": runs(1.0), "naive": runs(2.0),
               "library_full_a2": runs(0.7)}
    row = summarise_cell("N", 256, 64, 4, channels, samples)
    scale = evaluations(64, 4) / evaluations(8, 4)
    v = row["variants"]
    assert v["naive"]["extrapolated"] and v["library_a1.01"]["extrapolated"] and not v["library_a2"]["extrapolated"]
    assert v["naive"]["seconds"] == pytest.approx(2.0 * scale, rel=1e-3)
    assert row["speedup_vs_naive"]["alpha_2"] == pytest.approx(2.0 * scale / 0.5, rel=1e-2)
    assert row["extrapolated"] and row["naive_and_library_agree_at_alpha_1.01"]
    per_eval = 2.0 / evaluations(8, 4)
    assert row["whole_layer"]["naive_full_greedy_seconds_extrapolated"] == pytest.approx(per_eval * 64 * 65 / 2,
                                                                                         abs=0.01)


def test_measure_cpu_reports_time_memory_and_the_order() -> None:
    out = measure_cpu({"variant": "naive", "n": 64, "c": 8, "channels": 8, "steps": 2, "threads": 1})
    assert out["seconds"] > 0 and out["peak_mb"] >= 0 and len(out["order"]) == 2
