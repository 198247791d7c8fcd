"""``--method cmi`` (issue 3): greedy CMI selection, cutoffs, conditioning, capture and the scorer end to end."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from compressor import compress
from compressor.errors import InputError
from compressor.methods import cmi
from compressor.metrics import count_params
from compressor.models import create_model
from compressor.methods.base import Budget, MethodContext
from compressor.methods.prune import ScoringContext
from compressor.pruning import budget, engine
from compressor.scoring import selection as sel
from compressor.scoring.mutual_info import (
    SaturationWarning,
    gram_matrix,
    joint_gram,
    kernel_width,
    label_gram,
    pairwise_sq_dists,
    score_candidates,
)


def planted(*, seed: int = 1, n: int = 256, noise: float = 0.3) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """12 channels of ``(n, 4)`` maps: 4 carry one bit each of the label (together all of it), 6 are noise,
    2 are exact copies of informative ones; the kinds are interleaved so that index order gives nothing away."""
    g = torch.Generator().manual_seed(seed)
    y = (torch.arange(n) % 10)[torch.randperm(n, generator=g)]
    bits = torch.stack([(y >> b) & 1 for b in range(4)]).double()
    inf = 2 * bits[:, :, None] + noise * torch.randn(4, n, 4, generator=g, dtype=torch.float64)
    rnd = torch.randn(6, n, 4, generator=g, dtype=torch.float64)
    x = torch.cat([rnd[:3], inf[:2], inf[:1], rnd[3:], inf[2:], inf[2:3]])
    kinds = ["noise"] * 3 + ["inf"] * 2 + ["dup"] + ["noise"] * 3 + ["inf"] * 2 + ["dup"]
    return x, y, kinds


def _grams(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return gram_matrix(x), label_gram(y, 10, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------- selection level


@pytest.mark.parametrize("alpha", [2.0, 1.01])
def test_planted_informative_first_duplicates_last(alpha: float) -> None:
    x, y, kinds = planted()
    grams, a_y = _grams(x, y)
    chosen = sel.greedy_select(grams, a_y, alpha=alpha)
    ranked = [kinds[i] for i in chosen.order.tolist()]
    assert ranked[:4] == ["inf"] * 4, ranked
    assert ranked[-2:] == ["dup", "dup"], ranked
    assert sorted(chosen.order.tolist()) == list(range(12))
    r = chosen.remaining
    assert r.numel() == 13 and float(r[-1]) == 0.0
    assert float(r[0]) > 3.0  # the four bits hold (almost) all of S(Y) = log2 10 bits
    assert bool((r[1:] <= r[:-1] + 2e-3).all()), r  # decreasing up to finite-sample noise


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_planted_cutoffs_keep_the_informative_and_drop_duplicates(seed: int) -> None:
    x, y, kinds = planted(seed=seed)
    grams, a_y = _grams(x, y)
    chosen = sel.greedy_select(grams, a_y)
    assert sel.scree_cutoff(chosen.remaining) == 4
    keep, pvalues = sel.permutation_cutoff(grams, a_y, chosen.order, generator=torch.Generator().manual_seed(0))
    kept = [kinds[i] for i in chosen.order[:keep].tolist()]
    assert kept[:4] == ["inf"] * 4 and "dup" not in kept, (kept, pvalues)
    assert all(p < 0.05 for p in pvalues[:4]) and pvalues[-1] >= 0.05


def test_duplicates_are_detected_from_gram_matrices() -> None:
    x, y, kinds = planted()
    grams, a_y = _grams(x, y)
    near = x[3] + 0.02 * torch.randn(x[3].shape, generator=torch.Generator().manual_seed(5), dtype=x.dtype)
    grams = torch.cat([grams, gram_matrix(near[None])])
    assert (kinds[3], kinds[5], kinds[9], kinds[11]) == ("inf", "dup", "inf", "dup")  # 5 copies 3, 11 copies 9
    rep = sel.representatives(grams, torch.arange(13.0))  # relevance: the highest index of a cluster stands for it
    assert {c: int(rep[c]) for c in range(13) if int(rep[c]) != c} == {3: 12, 5: 12, 9: 11}


def test_ranking_is_invariant_to_sample_order() -> None:
    x, y, _ = planted(seed=2)
    perm = torch.randperm(y.numel(), generator=torch.Generator().manual_seed(7))
    a = sel.greedy_select(*_grams(x, y))
    b = sel.greedy_select(*_grams(x[:, perm], y[perm]))
    assert a.order.tolist() == b.order.tolist()
    torch.testing.assert_close(a.remaining, b.remaining, atol=1e-9, rtol=0)


def test_conditioning_moves_known_information_down_the_ranking() -> None:
    """Given two informative channels as Z, the two others (new information) are selected first."""
    x, y, kinds = planted()
    grams, a_y = _grams(x, y)
    inf = [i for i, k in enumerate(kinds) if k == "inf"]
    base = sel.geometric_joint(sel.log_kernels(grams[inf[:2]]).sum(0), 2)
    chosen = sel.greedy_select(grams, a_y, base=base)
    assert set(chosen.order[:2].tolist()) == set(inf[2:])
    assert float(chosen.remaining[0]) < float(sel.greedy_select(grams, a_y).remaining[0])


def _reference_greedy_prefix(grams: torch.Tensor, a_y: torch.Tensor, channels: list[int], steps: int, *,
                             base: torch.Tensor | None, alpha: float) -> tuple[list[int], list[torch.Tensor]]:
    """The greedy steps as first written: every step copies the candidates left (``grams[left]``) and, at α = 2,
    squares them again inside score_candidates."""
    left, order, all_scores, run = list(channels), [], [], base
    for _ in range(steps):
        scores = score_candidates(run, grams[left], a_y, alpha=alpha)
        all_scores.append(scores)
        best = int(torch.argmax(scores))
        order.append(left.pop(best))
        run = joint_gram(run, grams[order[-1]])
    return order, all_scores


@pytest.mark.parametrize("alpha", [2.0, 1.01])
@pytest.mark.parametrize("conditioned", [False, True])
def test_greedy_steps_by_index_and_squares_score_as_the_copying_steps(
    alpha: float, conditioned: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    x, y, _ = planted(seed=3)
    grams, a_y = _grams(x, y)
    base = sel.geometric_joint(sel.log_kernels(grams[[3]]).sum(0), 1) if conditioned else None
    seen: list[torch.Tensor] = []
    real = sel.score_candidates

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append(out)
        if alpha == 2.0:  # the squared stack is computed once and passed to every step
            assert kwargs["squares"] is not None and kwargs["squares"].shape == grams.shape
        return out

    monkeypatch.setattr(sel, "score_candidates", spy)
    chosen = sel.greedy_select(grams, a_y, base=base, alpha=alpha)
    reps = [c for c in range(12) if c not in (5, 11)]  # 5 and 11 copy 3 and 9 (see planted)
    order, scores = _reference_greedy_prefix(grams, a_y, reps, chosen.sufficient, base=base, alpha=alpha)
    assert chosen.order[: chosen.sufficient].tolist() == order
    assert len(seen) == 1 + chosen.sufficient  # relevance, then one call per greedy step
    for got, expected in zip(seen[1:], scores):
        torch.testing.assert_close(got, expected, rtol=0.0, atol=1e-12)


@pytest.mark.parametrize("width", ["median", "silverman", 0.8])
def test_gram_build_equals_widths_then_batched_grams(width: str | float) -> None:
    """``_Grams`` builds each layer's Grams a chunk of channels at a time, with the widths kernel_width gives."""
    x, _, _ = planted()
    grams = cmi._Grams({"g": x}, cmi.CMI.from_values({"kernel_width": width}).options, torch.device("cpu"))
    g = grams("g")
    sigma = (kernel_width(x, rule=width) if isinstance(width, str)
             else torch.full((12,), float(width), dtype=torch.float64))
    torch.testing.assert_close(grams.sigmas["g"], sigma, rtol=0.0, atol=0.0)
    d2 = pairwise_sq_dists(x)
    torch.testing.assert_close(g, torch.exp(-d2 / (2.0 * sigma * sigma)[:, None, None]) / x.shape[1],
                               rtol=0.0, atol=1e-15)


def test_keep_at_is_monotone_floored_and_rounded() -> None:
    x, y, _ = planted()
    chosen = sel.greedy_select(*_grams(x, y))
    counts = [sel.keep_at(t, chosen.remaining, chosen.sufficient, floor=2) for t in np.linspace(0, 2, 41)]
    assert counts == sorted(counts) and counts[0] == 2 and counts[-1] == 12
    assert sel.keep_at(1.0, chosen.remaining, chosen.sufficient, floor=1) == chosen.sufficient
    assert all(sel.keep_at(t, chosen.remaining, chosen.sufficient, floor=1, round_to=4) % 4 == 0 for t in (0.3, 1.5))


def test_scree_of_an_uninformative_layer_is_zero() -> None:
    assert sel.scree_cutoff(torch.zeros(9, dtype=torch.float64)) == 0


# ------------------------------------------------------------------------------------------------ scorer level


def _context(arch: str = "samplenet", *, n: int = 64, seed: int = 0, target: float = 0.4, metric: str = "params",
             round_to: int = 1, min_keep: float = 0.1) -> ScoringContext:
    torch.manual_seed(0)
    model = create_model(arch).eval()
    example = torch.zeros(1, 3, 32, 32)
    graph = engine.build_graph(model, example)
    gen = torch.Generator().manual_seed(1)
    calib = [(torch.randn(32, 3, 32, 32, generator=gen), torch.arange(32) % 10) for _ in range(n // 32)]
    return ScoringContext(model=model, graph=graph, groups=engine.discover_groups(model, graph), example_input=example,
                          target=target, metric=metric, device=torch.device("cpu"), seed=seed, calib=calib,
                          num_classes=10, round_to=round_to, min_keep=min_keep)


def _cmi(**options: object) -> cmi.CMI:
    """The method with ``options`` (names without the ``cmi_`` prefix), validated as the CLI does."""
    return cmi.CMI.from_values(options)


def test_method_declares_its_protocol() -> None:
    assert cmi.CMI.name == "cmi" and cmi.CMI.requires_data and cmi.CMI.Options is cmi.CMIOptions
    flags = {spec.flag: spec for spec in cmi.CMI.option_specs()}
    assert set(flags) == {"--cmi-alpha", "--cmi-condition", "--cmi-cutoff", "--cmi-direction",
                          "--cmi-kernel-width", "--cmi-pool"}
    assert all(spec.help and spec.example for spec in flags.values())
    assert not hasattr(cmi.CMIOptions(), "min_keep") and not hasattr(cmi.CMIOptions(), "round_to")


@pytest.mark.parametrize(("arch", "streams"), [("samplenet", {"res.conv2": "down.0", "res2.conv2": "classifier"}),
                                               ("resnet20", {"conv1": "layer2.0.conv1", "layer3.0.conv2": "linear"})])
def test_coupled_channels_are_one_variable_read_after_the_add(arch: str, streams: dict) -> None:
    ctx = _context(arch)
    result = _cmi(cutoff="scree").score(ctx)
    layers = {row["root"]: row for row in result.report["layers"]}
    assert set(layers) == {g.root for g in ctx.groups} and len(result.scores) == len(ctx.groups)
    for root, consumer in streams.items():
        assert layers[root]["tap"] == f"{consumer} (input)"
    for g in ctx.groups:
        assert sorted(result.scores[g.root].tolist()) == list(range(1, g.channels + 1))
        assert budget.floor_keep(g.channels, min_keep=0.1, round_to=1) <= result.keep[g.root] <= g.channels
    order = result.report["order"]
    assert order.index("res.conv1" if arch == "samplenet" else "layer1.0.conv1") < order.index(
        "res.conv2" if arch == "samplenet" else "conv1")  # network order, by where each map is read


def test_scoring_leaves_the_model_untouched() -> None:
    ctx = _context()
    before = {k: v.clone() for k, v in ctx.model.state_dict().items()}
    ctx.model.train()
    cmi.CMI().score(ctx)
    assert ctx.model.training
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in ctx.model.modules())
    assert all(torch.equal(before[k], v) for k, v in ctx.model.state_dict().items())


def test_same_seed_same_selection() -> None:
    a = _cmi(cutoff="permutation", condition="compact").score(_context(seed=3))
    b = _cmi(cutoff="permutation", condition="compact").score(_context(seed=3))
    assert a.keep == b.keep
    assert all(torch.equal(a.scores[k], b.scores[k]) for k in a.scores)


def test_saturation_warning_fires_on_a_too_narrow_kernel() -> None:
    with pytest.warns(SaturationWarning, match="nearly the identity"):
        _cmi(kernel_width=1e-4, pool=0, cutoff="scree").score(_context())


@pytest.mark.parametrize("options", [
    {"alpha": 0}, {"alpha": "two"}, {"alpha": float("nan")}, {"condition": "global"},
    {"cutoff": "elbow"}, {"direction": "backward"}, {"kernel_width": -1.0},
    {"kernel_width": "mean"}, {"pool": -1}, {"pool": 1.5}, {"alpah": 2.0},
])
def test_bad_options_raise_input_error(options: dict) -> None:
    with pytest.raises(InputError, match="--cmi-") as info:
        _cmi(**options)
    assert "\n" not in str(info.value)


def test_unknown_option_suggests_the_close_match() -> None:
    with pytest.raises(InputError, match="did you mean --cmi-alpha"):
        _cmi(alpah=2)


def test_options_defaults_and_coercion() -> None:
    opts = _cmi(alpha="1.01", pool="4", kernel_width="0.5").options
    assert (opts.alpha, opts.pool, opts.kernel_width) == (1.01, 4, 0.5)
    assert _cmi().options == _cmi(**dict.fromkeys(("alpha", "condition", "pool"))).options == cmi.CMIOptions()


def test_outward_visits_every_group_once() -> None:
    assert sel.outward(2, 5) == [2, 1, 3, 0, 4]
    assert sorted(sel.outward(0, 4)) == [0, 1, 2, 3]


@pytest.mark.parametrize(("arch", "round_to"), [("samplenet", 8), ("resnet20", 8)])
def test_alignment_is_best_effort_and_the_target_holds(arch: str, round_to: int) -> None:
    ctx = _context(arch, target=0.4, metric="filters", round_to=round_to)
    result = cmi.CMI().score(ctx)
    allocation = result.report["allocation"]
    assert abs(allocation["achieved"] - 0.4) <= budget.TARGET_TOLERANCE
    unaligned = [g.root for g in ctx.groups if result.keep[g.root] % round_to and result.keep[g.root] < g.channels]
    assert allocation["aligned"] == (not unaligned)
    for g in ctx.groups:  # halved alignment (8, 4, 2, 1), never anything else
        assert allocation["aligned_to"][g.root] == budget.aligned_to(result.keep[g.root], g.channels, round_to)


def test_apply_prunes_a_copy_to_the_target() -> None:
    """The protocol end to end: ``apply`` returns a pruned copy meeting the target, the record and the report."""
    torch.manual_seed(0)
    model = create_model("samplenet").eval()
    gen = torch.Generator().manual_seed(1)
    calib = [(torch.randn(32, 3, 32, 32, generator=gen), torch.arange(32) % 10) for _ in range(2)]
    ctx = MethodContext(example=torch.zeros(1, 3, 32, 32), num_classes=10, device=torch.device("cpu"), seed=0,
                        budget=Budget(0.3, "filters", 8, 0.1), original=model, calib=calib)
    before = count_params(model)
    result = cmi.CMI().apply(model, ctx)
    assert count_params(model) == before and count_params(result.model) < before
    report = result.report["cmi"]
    assert abs(report["allocation"]["achieved"] - 0.3) <= budget.TARGET_TOLERANCE
    assert result.records[0]["kind"] == "prune"
    assert {row["root"]: row["keep"] for row in result.report["groups"]} == report["keep"]


# ------------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def random_npz(tmp_path_factory: pytest.TempPathFactory) -> str:
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("cmi") / "rand.npz"
    np.savez(path, x=rng.integers(0, 256, size=(160, 32, 32, 3), dtype=np.uint8), y=np.arange(160) % 10)
    return str(path)


@pytest.mark.parametrize("options", [
    {},
    {"cmi_condition": "full", "cmi_cutoff": "scree"},
    {"cmi_condition": "compact", "cmi_cutoff": "permutation", "cmi_direction": "bidirectional"},
    {"cmi_condition": "full", "cmi_direction": "bidirectional", "cmi_alpha": 1.01, "cmi_pool": 1},
    {"cmi_condition": "compact", "cmi_kernel_width": 2.0},
], ids=["layer-target", "full-scree", "compact-permutation-bidir", "full-target-bidir-a1.01", "compact-target"])
def test_compress_runs_every_formulation_cutoff_and_direction(random_npz: str, options: dict) -> None:
    torch.manual_seed(0)
    model = create_model("samplenet").eval()
    result = compress(model, data=random_npz, method="cmi", target=0.4, target_metric="params", bench_batches=(),
                      calib_samples=96, method_options=options)
    assert count_params(result.model) < count_params(model)
    assert result.model(torch.zeros(2, 3, 32, 32)).shape == (2, 10)
    info = result.report["method"]["cmi"]
    assert (info["formulation"], info["cutoff"], info["direction"]) == (
        options.get("cmi_condition", "layer"), options.get("cmi_cutoff", "target"),
        options.get("cmi_direction", "forward"))
    assert info["seconds"]["total"] > 0 and info["samples"] == 96
    assert len(info["layers"]) == len(info["keep"]) == 5
    if info["cutoff"] == "target":
        assert abs(result.report["method"]["achieved"] - 0.4) <= engine.TARGET_TOLERANCE


def test_target_cutoff_meets_a_filters_target(random_npz: str) -> None:
    model = create_model("samplenet").eval()
    result = compress(model, data=random_npz, method="cmi", target=0.3, target_metric="filters", bench_batches=(),
                      calib_samples=64)
    assert abs(result.report["method"]["achieved"] - 0.3) <= engine.TARGET_TOLERANCE


def test_hooks_are_removed_when_the_forward_pass_fails() -> None:
    ctx = _context()
    ctx.calib = [(torch.randn(4, 5, 32, 32), torch.zeros(4, dtype=torch.long))]  # wrong channel count
    with pytest.raises(RuntimeError), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cmi.CMI().score(ctx)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in ctx.model.modules())
    assert isinstance(ctx.model, nn.Module)


def test_uniform_cutoff_keeps_cmis_ranking_with_l1s_widths(random_npz: str) -> None:
    model = create_model("samplenet").eval()
    common = dict(data=random_npz, target=0.4, target_metric="filters", bench_batches=(), calib_samples=64,
                  quantize="none", round_to=1)
    uniform = compress(model, method="cmi", method_options={"cmi_cutoff": "uniform"}, **common).report["method"]
    l1 = compress(model, method="l1", **common).report["method"]
    assert [g["keep"] for g in uniform["groups"]] == [g["keep"] for g in l1["groups"]]  # same widths as l1
    assert uniform["cmi"]["cutoff"] == "uniform" and uniform["cmi"]["keep"] == {}
    assert abs(uniform["achieved"] - 0.4) <= engine.TARGET_TOLERANCE and "allocation" in uniform
