"""The generated CLI: every method and option visible in --help, flags checked against the config, subcommands."""

from __future__ import annotations

import dataclasses
import json

import pytest
from typer.testing import CliRunner

from compressor import cli
from compressor.config import CompressConfig
from compressor.methods import REGISTRY, build_method
from compressor.methods.chain import Chain

RUNNER = CliRunner()
EVERY_CLASS = [REGISTRY.get(n) for n in REGISTRY.names()] + [Chain]


def _help() -> str:
    result = RUNNER.invoke(cli.app, ["--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    return " ".join(result.output.replace("│", " ").split())  # help panels wrap lines inside box borders


def test_help_lists_every_registered_method() -> None:
    text = _help()
    assert set(REGISTRY.names()) >= {"l1", "random", "cmi", "mipp", "tucker"}
    for name in REGISTRY.names():
        assert f"{name} ({REGISTRY.get(name).summary}" in text


def test_every_method_option_has_a_prefixed_flag_in_help() -> None:
    text = _help()
    for cls in EVERY_CLASS:
        for spec in cls.option_specs():
            assert spec.flag.startswith(f"--{cls.name}-") and spec.flag in text, spec.flag
            assert spec.help and spec.example is not None, f"{spec.flag} needs help text and an example"
            default = "unset" if spec.default is None else spec.default
            assert f"{spec.flag} " in text and f"[default: {default}]" in text


def test_run_flags_match_the_config_fields() -> None:
    """One place per option: every CompressConfig field has exactly one run flag (or a documented mapping)."""
    mapped = {"bench_batches": "bench_batch", "ignore_layers": "ignore_layer", "method_options": None}
    flags = {f.name for f in cli.RUN_FLAGS}
    for field in dataclasses.fields(CompressConfig):
        name = mapped.get(field.name, field.name)
        assert name is None or name in flags, f"CompressConfig.{field.name} has no flag"


def test_generated_flags_reach_the_method_options() -> None:
    given = {"cmi_alpha": 1.01, "cmi_kernel_width": "2.5", "mipp_block": 4, "tucker_tau": None, "tau": 0.2,
             "rank_rule": "evbmf", "chain_split": 0.7}
    values = cli.method_options(given)
    assert values == {"cmi_alpha": 1.01, "cmi_kernel_width": 2.5, "mipp_block": 4, "tucker_tau": 0.2,
                      "tucker_rank_rule": "evbmf", "chain_split": 0.7}
    method = build_method("cmi+tucker", values | {"mipp_block": None})
    assert method.steps[0].options.alpha == 1.01 and method.steps[1].options.tau == 0.2
    assert method.options.split == 0.7


def test_an_option_of_another_method_is_refused_in_one_line(tmp_path) -> None:
    result = RUNNER.invoke(cli.app, [str(tmp_path / "m.pt"), "--method", "l1", "--cmi-alpha", "2"])
    assert result.exit_code == 2
    assert "--cmi-alpha applies to --method cmi, not to --method l1" in result.output
    assert "Traceback" not in result.output


def test_a_bad_option_value_names_its_flag(tmp_path) -> None:
    result = RUNNER.invoke(cli.app, [str(tmp_path / "m.pt"), "--method", "tucker", "--tucker-tau", "1.5"])
    assert result.exit_code == 2 and "--tucker-tau must be in (0, 1); got 1.5" in result.output


def test_methods_subcommand_lists_every_method_with_its_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["methods", "--json"])
    assert exit_info.value.code == 0
    described = {m["name"]: m for m in json.loads(capsys.readouterr().out)}
    assert set(REGISTRY.names()) <= set(described)
    tucker = {o["flag"]: o for o in described["tucker"]["options"]}
    assert tucker["--tucker-tau"]["default"] == 0.1 and described["cmi"]["requires_data"] is True
    assert "--mipp-positions" in {o["flag"] for o in described["mipp"]["options"]}


def test_methods_subcommand_renders_tables() -> None:
    result = RUNNER.invoke(cli.tools, ["methods"], terminal_width=200)
    assert result.exit_code == 0
    for name in REGISTRY.names():
        assert name in result.output


def test_subcommands_dispatch_from_the_console_entry_point(capsys: pytest.CaptureFixture[str]) -> None:
    """``compress inspect ...`` and ``compress bench ...`` reach their commands; anything else compresses."""
    from .conftest import SAMPLES

    with pytest.raises(SystemExit) as exit_info:
        cli.main(["inspect", str(SAMPLES / "samplenet.pt"), "--arch", "samplenet", "--json"])
    assert exit_info.value.code == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["totals"]["params"] > 0 and summary["groups"]
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["bench", str(SAMPLES / "absent.onnx")])
    assert exit_info.value.code == 2 and "absent.onnx" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        cli.main([str(SAMPLES / "absent.pt")])
    assert exit_info.value.code == 2 and "not found" in capsys.readouterr().err
