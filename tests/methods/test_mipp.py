"""``--method mipp`` (issue 4): the estimator maths, the planted case, the order, the target, determinism, floors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from compressor import compress
from compressor.errors import InputError
from compressor.methods import mipp, mipp_capture, mipp_search
from compressor.methods.cmi import find_taps
from compressor.metrics import count_filters
from compressor.models import create_model
from compressor.pruning import engine
from compressor.methods.mipp_search import LayerTest
from compressor.methods.prune import ScoringContext
from compressor.scoring import predictor as pr


# ------------------------------------------------------------------------------------------------- the maths


@pytest.mark.parametrize(("t", "dof", "expected"), [
    (1.0, 1, 0.75), (-1.0, 1, 0.25), (0.0, 4, 0.5), (2.131847, 4, 0.95), (4.604095, 4, 0.995),
    (2.570582, 5, 0.975), (1.943180, 6, 0.95), (math.inf, 3, 1.0),
])
def test_student_t_cdf_matches_tables(t: float, dof: int, expected: float) -> None:
    assert pr.student_t_cdf(t, dof) == pytest.approx(expected, abs=1e-6)


def test_confidence_threshold_inverts_the_cdf() -> None:
    for x in (0.5, 0.9, 0.999, 0.9999999):
        assert pr.student_t_cdf(pr.confidence_threshold(x, 4), 4) == pytest.approx(x, abs=1e-12)


def _regression(seed: int = 0, k: int = 5, n: int = 300) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows ``[1, x (10), y (3)]`` in ``k`` folds; ``x[5]`` copies ``x[2]``, ``y`` depends on ``x[:4]`` only."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(k * n, 10, generator=g, dtype=torch.float64)
    x[:, 5] = x[:, 2]
    y = torch.relu(x[:, :4] @ torch.randn(4, 3, generator=g, dtype=torch.float64))
    y = y + 0.1 * torch.randn(y.shape, generator=g, dtype=torch.float64)
    rows = torch.cat((torch.ones(k * n, 1, dtype=torch.float64), x, y), dim=1)
    fold = torch.arange(k * n) % k
    return torch.stack([rows[fold == f].T @ rows[fold == f] for f in range(k)]), rows, fold


def _direct_loss(rows: torch.Tensor, fold: torch.Tensor, design: list[int], target: list[int],
                 full: list[int] | None = None) -> torch.Tensor:
    """Held-out loss of a ridge fit solved from scratch; the penalty is set on the ``full`` design (the downdate
    keeps the penalty of the fit it starts from)."""
    out = []
    for f in range(int(fold.max()) + 1):
        a, b = rows[fold != f][:, design], rows[fold != f][:, target]
        gram = a.T @ a
        scale = (rows[fold != f][:, full or design] ** 2).sum(0)[1:].mean()
        ridge = torch.eye(len(design), dtype=gram.dtype) * mipp.RIDGE * scale
        ridge[0, 0] = 0
        beta = torch.linalg.solve(gram + ridge, a.T @ b)
        ah, bh = rows[fold == f][:, design], rows[fold == f][:, target]
        out.append(((ah @ beta - bh) ** 2).sum() / ((bh - bh.mean(0)) ** 2).sum())
    return torch.stack(out)


def test_downdated_refits_equal_direct_refits() -> None:
    folds, rows, fold = _regression()
    design, target = list(range(11)), [11, 12, 13]
    fit = pr.fit_ridge(folds, torch.tensor(design), torch.tensor(target), ridge=mipp.RIDGE)
    torch.testing.assert_close(fit.loss, _direct_loss(rows, fold, design, target))
    after = pr.remove(fit, torch.tensor([7, 9]))
    kept = [c for c in design if c not in (7, 9)]
    torch.testing.assert_close(after.loss, _direct_loss(rows, fold, kept, target, design))
    losses = pr.removal_loss(after, torch.tensor([[1], [4]]))  # original column ids, after compaction
    for row, gone in zip(losses, (1, 4)):
        kept = [c for c in design if c not in (7, 9, gone)]
        torch.testing.assert_close(row, _direct_loss(rows, fold, kept, target, design))


def test_solo_losses_fit_each_column_alone() -> None:
    folds, rows, fold = _regression(seed=1)
    base, solo = pr.solo_losses(folds, torch.tensor([0]), torch.arange(1, 11)[:, None], torch.tensor([11, 12, 13]),
                                ridge=mipp.RIDGE)
    torch.testing.assert_close(base, _direct_loss(rows, fold, [0], [11, 12, 13]))
    torch.testing.assert_close(solo[3], _direct_loss(rows, fold, [0, 4], [11, 12, 13]))
    assert float(solo[[4, 6, 7, 8, 9]].mean(1).min()) > float(solo[:4].mean(1).max())  # y reads x0..x3 only
    torch.testing.assert_close(solo[2], solo[5])  # a copy informs exactly as much as its original


def test_t_statistics() -> None:
    same = torch.zeros(2, 5, dtype=torch.float64)
    assert pr.corrected_t(same).tolist() == [0.0, 0.0] and pr.jackknife_t(same).tolist() == [0.0, 0.0]
    sure = torch.full((5,), 0.3, dtype=torch.float64)
    assert pr.corrected_t(sure) == math.inf
    deltas = torch.tensor([0.1, 0.3, 0.2, 0.4, 0.0], dtype=torch.float64)
    s2 = float(deltas.var())
    assert float(pr.corrected_t(deltas)) == pytest.approx(0.2 / math.sqrt((1 / 5 + 1 / 4) * s2))
    assert float(pr.jackknife_t(deltas)) == pytest.approx(0.2 / math.sqrt(0.8 * float(((deltas - 0.2) ** 2).sum())))


# ------------------------------------------------------------------------------------------------- planted


class Planted(nn.Module):
    """conv1 (8) -> conv2 (8) -> conv3 (8) -> pool -> fc. conv1's channels 4 and 5 copy 1 and 2 (duplicates), conv2
    reads nothing from conv1's channels 6 and 7 (never used downstream); 0 and 3 are needed and have no copy."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        self.conv2, self.bn2, self.relu2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        self.conv3, self.bn3, self.relu3 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.relu2(self.bn2(self.conv2(x)))
        x = self.relu3(self.bn3(self.conv3(x)))
        return self.fc(x.mean((2, 3)))


def planted_model(seed: int = 0) -> Planted:
    torch.manual_seed(seed)
    model = Planted().eval()
    with torch.no_grad():
        model.conv1.weight[4] = model.conv1.weight[1]
        model.conv1.weight[5] = model.conv1.weight[2]
        model.conv2.weight[:, 6:] = 0
    return model


def _context(model: nn.Module, *, shape: tuple[int, int, int] = (3, 16, 16), n: int = 128, seed: int = 0,
             target: float = 0.3, metric: str = "filters", round_to: int = 1, min_keep: float = 0.1
             ) -> ScoringContext:
    example = torch.zeros(1, *shape)
    graph = engine.build_graph(model, example)
    gen = torch.Generator().manual_seed(1)
    calib = [(torch.randn(64, *shape, generator=gen), torch.arange(64) % 10) for _ in range(n // 64)]
    return ScoringContext(model=model, graph=graph, groups=engine.discover_groups(model, graph),
                          example_input=example, target=target, metric=metric, device=torch.device("cpu"), seed=seed,
                          calib=calib, num_classes=10, round_to=round_to, min_keep=min_keep)


def _mipp(**options: object) -> mipp.MIPP:
    """The method with ``options`` (names without the ``mipp_`` prefix), validated as the CLI does."""
    return mipp.MIPP.from_values(options)


def _kept(result, root: str) -> set[int]:
    order = torch.argsort(result.scores[root], descending=True, stable=True)
    return set(order[: result.keep[root]].tolist())


@pytest.mark.parametrize("confidence", [0.6, 0.95, 0.999])
def test_planted_duplicates_and_unused_channels_go_needed_ones_stay(confidence: float) -> None:
    result = _mipp(confidence=confidence).score(_context(planted_model()))
    kept = _kept(result, "conv1")
    assert {0, 3} <= kept, kept  # needed by conv2, no copy
    assert not kept & {6, 7}, kept  # never read downstream
    assert len(kept & {1, 4}) == 1 and len(kept & {2, 5}) == 1, kept  # one of each duplicated pair
    info = result.report
    assert info["search"] == "confidence" and info["confidence"] == pytest.approx(confidence, abs=1e-3)


def test_planted_layer_statistics() -> None:
    """The predictor's t statistic of masking one conv1 channel: ~0 for copies and unused channels, large for 0 and
    3. The Rényi measure is monotone and symmetric in copies, but blind to unused channels."""
    ctx = _context(planted_model())
    problems = mipp_capture.find_problems(ctx.model, ctx.graph, ctx.groups)
    taps = find_taps(ctx.model, ctx.graph, ctx.groups)
    moments, _ = mipp_capture.capture(ctx.model, problems, taps, ctx.graph, ctx.calib,
                                      mipp.MIPPOptions(), seed=0)
    layer = mipp._PredictorLayer(problems["conv1"], [moments.grams[("conv1", 0)]], {}, 8, torch.device("cpu"))
    t = layer.t(layer.delta(torch.arange(8)[:, None]))
    assert bool((t[[0, 3]] > 20).all()), t
    assert bool((t[[1, 2, 4, 5, 6, 7]] < 3).all()), t
    moments, _ = mipp_capture.capture(ctx.model, problems, taps, ctx.graph, ctx.calib,
                                      mipp.MIPPOptions(estimator="renyi"), seed=0)
    renyi = mipp._RenyiLayer(problems["conv1"], [moments.pooled[("conv1", 0)]], moments.folds, {}, 8, {},
                             torch.device("cpu"))
    d = renyi.delta(torch.arange(8)[:, None])
    assert bool((d > 0).all())  # masking a channel drops a kernel factor: never more information
    torch.testing.assert_close(d[1], d[4])  # a copy is worth what its original is
    # ... but the kernel measure cannot see that 6 and 7 are unused: they correlate with X_{l+1} through the input
    assert bool((renyi.t(d)[[6, 7]] > 2).all())


def test_renyi_information_matches_the_matrix_estimator() -> None:
    """``log2(a2/a1)`` + constants is ``I_2(X; Y | Z)`` of :mod:`compressor.scoring.mutual_info` on every subsample."""
    from compressor.scoring.mutual_info import (
        conditional_mutual_information,
        joint_gram,
        mutual_information,
        renyi_entropy,
    )

    g = torch.Generator().manual_seed(0)

    def log_kernel(dim: int) -> torch.Tensor:
        x = torch.randn(40, dim, generator=g, dtype=torch.float64)
        d2 = torch.cdist(x, x) ** 2
        return -d2 / (2 * d2.median())

    lx, ly, lz = log_kernel(3), log_kernel(2), log_kernel(4)
    folds = torch.arange(40) % 4
    inside = torch.stack([folds != f for f in range(4)]).double()
    for z in (None, lz):
        got = pr.renyi_information(2 * lx[None], pr.renyi_weights(ly, z, inside))[0]
        for f in range(4):
            sub = torch.nonzero(folds != f).flatten()

            def gram(log: torch.Tensor, sub: torch.Tensor = sub) -> torch.Tensor:
                return torch.exp(log[sub][:, sub]) / len(sub)

            if z is None:
                want = mutual_information(gram(lx), gram(ly), alpha=2.0) - renyi_entropy(gram(ly), alpha=2.0)
            else:
                want = (conditional_mutual_information(gram(lx), gram(ly), gram(z), alpha=2.0)
                        - renyi_entropy(joint_gram(gram(ly), gram(z)), alpha=2.0) + renyi_entropy(gram(z), alpha=2.0))
            assert float(got[f]) == pytest.approx(float(want), abs=1e-10)


# --------------------------------------------------------------------------------------------- order, targets


def test_scorer_is_registered_and_needs_data() -> None:
    assert mipp.MIPP.name == "mipp" and mipp.MIPP.requires_data and mipp.MIPP.Options is mipp.MIPPOptions
    flags = {spec.flag: spec for spec in mipp.MIPP.option_specs()}
    assert set(flags) == {"--mipp-estimator", "--mipp-confidence", "--mipp-repeats", "--mipp-positions",
                          "--mipp-block", "--mipp-pool"}  # every option has a flag, with help and an example
    assert all(spec.help and spec.example for spec in flags.values())
    assert flags["--mipp-confidence"].optional and flags["--mipp-confidence"].default is None


def test_groups_are_processed_from_the_outputs_back(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    ctx = _context(create_model("resnet20").eval(), shape=(3, 32, 32), n=64)
    seen: list[tuple[str, set[str]]] = []
    layer = mipp._Plan.layer

    def spy(self: mipp._Plan, root: str, kept: dict) -> LayerTest:
        seen.append((root, set(kept)))
        return layer(self, root, kept)

    monkeypatch.setattr(mipp._Plan, "layer", spy)
    info = _mipp(confidence=0.99).score(ctx).report
    order = info["order"]
    assert order[0] == "layer3.0.conv2"  # the stream the classifier reads is the last prunable layer
    assert [r for r, _ in seen] == order and all(kept == set(order[:i]) for i, (_, kept) in enumerate(seen))
    for stage, stream in ((1, "conv1"), (2, "layer2.0.conv2"), (3, "layer3.0.conv2")):
        blocks = [f"layer{stage}.{b}.conv1" for b in range(3)]
        assert all(order.index(stream) < order.index(b) for b in blocks)  # a stream before its blocks
        assert [order.index(b) for b in blocks] == sorted((order.index(b) for b in blocks), reverse=True)
    rows = {row["root"]: row for row in info["layers"]}
    assert rows["layer3.0.conv2"]["consumers"] == ["layer3.1.conv1", "layer3.2.conv1", "linear"]
    assert rows["layer3.0.conv2"]["targets"][-1] == "linear (output)"  # softmax of the logits
    assert rows["layer2.1.conv1"]["targets"] == ["layer2.2.conv1 (input)"]  # the stream after the block ...
    assert rows["layer2.1.conv1"]["conditioned"] == [True]  # ... given the stream entering it
    assert rows["layer3.2.conv1"]["targets"] == ["pool (input)"]  # the last block: the map before global pooling


def test_scoring_leaves_the_model_untouched() -> None:
    ctx = _context(planted_model())
    before = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    ctx.model.train()
    mipp.MIPP().score(ctx)
    assert ctx.model.training
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in ctx.model.modules())
    assert all(torch.equal(before[k], v) for k, v in ctx.model.state_dict().items())


# ------------------------------------------------------------------------------------------- target and floors


@pytest.mark.parametrize(("estimator", "metric", "target", "round_to"), [
    ("predictor", "filters", 0.4, 1), ("predictor", "params", 0.5, 4), ("renyi", "filters", 0.3, 1),
])
def test_target_is_met_within_tolerance(estimator: str, metric: str, target: float, round_to: int) -> None:
    torch.manual_seed(0)
    ctx = _context(create_model("samplenet").eval(), shape=(3, 32, 32), target=target, metric=metric,
                   round_to=round_to)
    result = _mipp(estimator=estimator).score(ctx)
    achieved = engine.removed_fraction(ctx.model, ctx.example_input, ctx.groups, result.scores, result.keep,
                                       metric=metric)
    assert abs(achieved - target) <= engine.TARGET_TOLERANCE
    info = result.report
    assert info["achieved"] == pytest.approx(achieved, abs=1e-4)
    assert 0.5 <= info["confidence"] <= 1.0 and info["passes"] >= 1
    assert info["seconds"]["total"] > 0 and info["samples"] == 128
    for g in ctx.groups:
        assert sorted(result.scores[g.root].tolist()) == list(range(1, g.channels + 1))
        assert engine.floor_keep(g.channels, min_keep=0.1, round_to=1) <= result.keep[g.root] <= g.channels
        row = next(r for r in info["layers"] if r["root"] == g.root)
        assert row["keep"] == result.keep[g.root] == g.channels - row["removed_by_test"] - row["removed_by_cap"]


def test_same_seed_same_selection() -> None:
    runs = [mipp.MIPP().score(_context(planted_model(), seed=3, target=0.4)) for _ in range(2)]
    assert runs[0].keep == runs[1].keep
    assert all(torch.equal(runs[0].scores[k], runs[1].scores[k]) for k in runs[0].scores)
    assert runs[0].report["t_threshold"] == runs[1].report["t_threshold"]


def test_a_layer_never_drops_to_zero_channels() -> None:
    """At the most aggressive confidence every group stops at its floor (at least one channel)."""
    torch.manual_seed(0)
    ctx = _context(create_model("samplenet").eval(), shape=(3, 32, 32),
                   min_keep=1e-6)
    result = _mipp(confidence=1 - 1e-15).score(ctx)
    assert all(k >= 1 for k in result.keep.values()) and min(result.keep.values()) == 1


def test_a_cap_meets_a_target_the_confidence_cannot(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the confidence held near 0.5 only planted conv1's four redundant channels go; a per-group cap takes the
    rest of the target, by greedy elimination on top of the test, so conv1 still keeps 0, 3 and one of each pair."""
    monkeypatch.setattr(mipp_search, "T_START", 0.05)
    monkeypatch.setattr(mipp_search, "T_MAX", 0.05)
    result = mipp.MIPP().score(_context(planted_model(), target=0.5))
    info = result.report
    assert info["search"] == "cap" and info["cap"] < 1.0 and info["confidence"] == pytest.approx(0.52, abs=0.01)
    assert abs(info["achieved"] - 0.5) <= engine.TARGET_TOLERANCE
    assert sum(row["removed_by_cap"] for row in info["layers"]) > 0
    kept = _kept(result, "conv1")
    assert {0, 3} <= kept and not kept & {6, 7} and len(kept & {1, 4}) == len(kept & {2, 5}) == 1, kept


# ------------------------------------------------------------------------------------------------- options


@pytest.mark.parametrize("options", [
    {"estimator": "knn"}, {"confidence": 0.4}, {"confidence": 1.0}, {"confidence": "high"}, {"repeats": 2},
    {"repeats": 4.5}, {"positions": 0}, {"block": True}, {"block": 0}, {"pool": -1}, {"pool": 0}, {"confidance": 0.9},
])
def test_bad_options_raise_input_error(options: dict) -> None:
    with pytest.raises(InputError, match="--mipp-") as info:
        _mipp(**options)
    assert "\n" not in str(info.value)


def test_unknown_option_suggests_the_close_match() -> None:
    with pytest.raises(InputError, match="did you mean --mipp-confidence"):
        _mipp(confidance=0.9)


def test_options_defaults_and_coercion() -> None:
    opts = _mipp(confidence="0.99", repeats="7", positions="32").options
    assert (opts.confidence, opts.repeats, opts.positions) == (0.99, 7, 32)
    assert _mipp().options == _mipp(**dict.fromkeys(("estimator", "confidence", "block"))).options == mipp.MIPPOptions()
    assert not hasattr(opts, "min_keep") and not hasattr(opts, "round_to")  # the run's, from the ScoringContext


def test_needs_calibration_data() -> None:
    ctx = _context(planted_model())
    ctx.calib = None
    with pytest.raises(InputError, match="--data"):
        mipp.MIPP().score(ctx)
    ctx.calib = [(torch.randn(6, 3, 16, 16), torch.zeros(6, dtype=torch.long))]
    with pytest.raises(InputError, match="at least 10 calibration images"):
        mipp.MIPP().score(ctx)


# ------------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def random_npz(tmp_path_factory: pytest.TempPathFactory) -> str:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("mipp") / "rand.npz"
    np.savez(path, x=rng.integers(0, 256, size=(128, 32, 32, 3), dtype=np.uint8), y=np.arange(128) % 10)
    return str(path)


def test_compress_with_mipp_on_random_weights(random_npz: str) -> None:
    """A randomly initialised model (what ``--at-init`` scores) prunes to the target and still runs."""
    torch.manual_seed(0)
    model = create_model("samplenet").eval()
    result = compress(model, data=random_npz, method="mipp", target=0.4, bench_batches=(), calib_samples=96,
                      method_options={"mipp_repeats": 4})
    assert abs(result.report["method"]["achieved"] - 0.4) <= engine.TARGET_TOLERANCE
    assert count_filters(result.model) < count_filters(model)
    assert result.model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    info = result.report["method"]["mipp"]
    assert info["repeats"] == 4 and info["samples"] == 96 and set(info["keep"]) == {g["root"] for g in
                                                                                  result.report["method"]["groups"]}
