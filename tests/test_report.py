"""The report's per-layer table and method section, on real pruned and factorised models."""

from __future__ import annotations

import torch
from torch import nn

from compressor import report
from compressor.factorize import factorize_conv
from compressor.models import create_model


def _factorised_samplenet() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    before = create_model("samplenet").eval()
    after = create_model("samplenet").eval()
    after.res.conv1 = factorize_conv(after.res.conv1, rank_out=5, rank_in=7)
    after.pw[0] = nn.Conv2d(32, 40, 1, bias=False)
    return before, after


def test_layer_table_reports_pruned_channels_and_tucker_ranks() -> None:
    rows = {r["name"]: r for r in report.layer_table(*_factorised_samplenet())}
    assert rows["res.conv1"]["ranks"] == [5, 7]
    assert (rows["res.conv1"]["in_after"], rows["res.conv1"]["out_after"]) == (16, 16)
    assert rows["pw.0"]["out_after"] == 40 and rows["pw.0"]["ranks"] is None
    assert rows["classifier"]["type"] == "Linear" and rows["classifier"]["out_after"] == 10


def test_markdown_shows_the_method_choices() -> None:
    method = {"name": "cmi+tucker", "target": 0.3, "target_metric": "params", "achieved": 0.301, "stages":
              ["prune", "tucker"], "scoring_seconds": 1.5, "cmi": {"formulation": "compact", "cutoff": "scree"},
              "groups": [{"root": "pw.0", "channels": 64, "keep": 40, "layers": ["pw.0", "res2.conv2"]}]}
    section = "\n".join(report._method_section(method))
    assert "prune then tucker" in section and "scoring_seconds 1.5" in section
    assert "formulation compact; cutoff scree" in section
    assert "| pw.0 | 2 | 64 | 40 |" in section


def test_summary_signs_changes_and_says_slower_when_it_is() -> None:
    side = {"params": 100, "macs": 1000, "filters": 10, "onnx_bytes": 400, "accuracy": 0.9}
    rep = {"original": side, "compressed": {**side, "params": 67, "filters": 24, "accuracy": 0.88},
           "latency": {"1": {"original": {"p50_ms": 1.0}, "compressed": {"p50_ms": 1.5}, "speedup": 1 / 1.5},
                       "32": {"original": {"p50_ms": 2.6}, "compressed": {"p50_ms": 2.0}, "speedup": 1.3}}}
    rows = {r[0]: r[3] for r in report.summary_rows(rep)}
    assert rows["params"] == "-33.0%" and rows["filters"] == "+140.0%" and rows["MACs"] == "+0.0%"
    assert rows["ORT p50 ms (batch 1)"] == "1.50x slower" and rows["ORT p50 ms (batch 32)"] == "1.30x faster"
    assert rows["top-1"] == "-2.00 pts"
