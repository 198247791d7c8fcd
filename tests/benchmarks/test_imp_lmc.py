"""``benchmarks/imp_lmc.py``: its section of docs/RESULTS.md replaces only itself, and the mask overlap is a Jaccard
index of the pruned weights."""

from __future__ import annotations

import pytest
import torch

from benchmarks.imp_lmc import END, START, overlap, write_docs


def _payload(top1: float) -> dict:
    rows = [{"source": "dense", "target": 0.0, "sparsity": 0.0, "achieved": 0.0, "mask_images": 0, "top1": top1,
             "instability": 0.01},
            {"source": "distilled", "target": 0.8, "sparsity": 0.8, "achieved": 0.8, "mask_images": 100,
             "top1": 0.8, "instability": 0.02, "top1_after_imp_rounds": 0.7, "overlap_with_real": 0.9},
            {"source": "real", "target": 0.8, "sparsity": 0.8, "achieved": 0.8, "mask_images": 2000, "top1": 0.85,
             "instability": 0.03, "top1_after_imp_rounds": 0.75, "overlap_with_real": 1.0}]
    budget = {"rounds": 3, "steps_per_round": 16, "batch_size": 128, "lr": 0.05, "real_images": 2000,
              "final_steps": 32, "points": 11, "bn_images": 512,
              "distill": {"images_per_class": 10, "iterations": 250, "width": 32}}
    return {"rows": rows, "budget": budget, "command": "python -m benchmarks.imp_lmc", "meta": {"seconds_total": 1.0}}


def test_the_section_is_appended_once_then_replaced_in_place(tmp_path) -> None:
    docs = tmp_path / "RESULTS.md"
    docs.write_text("# Benchmark results\n\nbefore\n")
    write_docs(_payload(0.9), docs)
    docs.write_text(docs.read_text() + "\n## Another helper's section\n")
    write_docs(_payload(0.7), docs)
    text = docs.read_text()
    assert text.count(START) == 1 and text.count(END) == 1
    assert "before" in text and text.endswith("## Another helper's section\n")
    assert "top-1 70.0 %" in text and "top-1 90.0 %" not in text
    table = [line for line in text.splitlines() if line.startswith("| 0.800")]
    assert [line.split(" | ")[1] for line in table] == ["real", "distilled"]  # real first at each sparsity


def test_overlap_is_the_jaccard_index_of_the_pruned_weights() -> None:
    a = {"l": torch.tensor([False, False, True, True])}
    b = {"l": torch.tensor([False, True, False, True])}
    assert overlap(a, a) == 1.0
    assert overlap(a, b) == pytest.approx(1 / 3, abs=1e-4)  # 1 weight pruned by both of 3 pruned by either
