"""The CLI: help, flag forwarding, and every bad input ending in one line, exit 2, no partial file."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from compressor import cli
from compressor.models import create_model

runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(cli.app, [str(a) for a in args])


@pytest.fixture()
def model_file(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    path = tmp_path / "net.pt"
    torch.save({"state_dict": create_model("samplenet").state_dict(), "arch": "samplenet"}, path)
    return path


def _npz(path: Path, *, n: int = 24, shape=(32, 32, 3), classes: int = 10) -> Path:
    rng = np.random.default_rng(0)
    np.savez(path, x=rng.integers(0, 255, (n, *shape), dtype=np.uint8), y=np.arange(n) % classes)
    return path


@pytest.fixture()
def data_file(tmp_path: Path) -> Path:
    return _npz(tmp_path / "data.npz")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_help_documents_every_option_with_an_example() -> None:
    result = invoke("--help")
    assert result.exit_code == 0, result.output
    command = cli.typer.main.get_command(cli.app)
    # Options by attribute, not isinstance(click.Option): typer>=0.29 vendors click and no longer installs it.
    options = [p for p in command.params if getattr(p, "param_type_name", None) == "option" and p.name != "help"
               and not p.hidden]  # hidden: old spellings of generated flags (--rank-rule), still accepted
    assert len(options) > 10, f"expected the CLI's options, found {[p.name for p in options]}"
    for param in options:
        assert param.opts[0] in result.output, f"{param.opts[0]} missing from --help"
        if not param.is_flag and param.help:
            assert "E.g." in param.help, f"{param.opts[0]} has no example in its help"
    assert "Example: compress" in result.output


def test_flags_are_forwarded_to_the_api(monkeypatch: pytest.MonkeyPatch, model_file: Path, tmp_path: Path) -> None:
    seen = {}

    class _Result:
        report: dict = {}
        files: dict = {}
        out_dir = tmp_path

    def fake_compress(model, **kwargs):
        seen.update(kwargs, model=model)
        return _Result()

    monkeypatch.setattr("compressor.api.compress", fake_compress)
    monkeypatch.setattr("compressor.report.print_table", lambda report: None)
    result = invoke(model_file, "--method", "random", "--target", "0.5", "--target-metric", "macs",
                    "--round-to", "4", "--ignore-layer", "stem.0", "--ignore-layer", "dw.0", "--epochs", "3",
                    "--bench-batch", "1,8", "--threads", "2", "--distill", "--no-augment", "--out", tmp_path / "o",
                    "--cmi-alpha", "1.01", "--cmi-kernel-width", "2.5", "--cmi-cutoff", "scree", "--at-init",
                    "--bn-recalib", "0")
    assert result.exit_code == 0, result.output
    assert seen["method"] == "random" and seen["target"] == 0.5 and seen["target_metric"] == "macs"
    assert seen["round_to"] == 4 and seen["ignore_layers"] == ("stem.0", "dw.0") and seen["epochs"] == 3
    assert seen["bench_batches"] == (1, 8) and seen["threads"] == 2 and seen["distill"] is True
    assert seen["augment"] is False and seen["out"] == tmp_path / "o" and seen["model"] == model_file
    assert seen["at_init"] is True and seen["bn_recalib"] == 0
    assert seen["method_options"] == {"cmi_alpha": 1.01, "cmi_kernel_width": 2.5, "cmi_cutoff": "scree"}


def test_mipp_flags_are_forwarded_as_method_options(monkeypatch: pytest.MonkeyPatch, model_file: Path,
                                                     tmp_path: Path) -> None:
    seen = {}

    class _Result:
        report: dict = {}
        files: dict = {}
        out_dir = tmp_path

    monkeypatch.setattr("compressor.api.compress", lambda model, **kwargs: seen.update(kwargs) or _Result())
    monkeypatch.setattr("compressor.report.print_table", lambda report: None)
    result = invoke(model_file, "--method", "mipp", "--mipp-estimator", "renyi", "--mipp-confidence", "0.9",
                    "--mipp-repeats", "4", "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    assert seen["method"] == "mipp"
    assert seen["method_options"] == {"mipp_estimator": "renyi", "mipp_confidence": 0.9, "mipp_repeats": 4}


def _assert_clean_failure(result, out: Path, inputs: list[Path], digests: list[str], match: str) -> None:
    assert result.exit_code == 2, (result.exit_code, result.output)
    message = result.stderr.strip()
    assert "Traceback" not in result.output and len(message.splitlines()) == 1, message
    assert match.lower() in message.lower(), message
    assert not out.exists(), "a failed run left output behind"
    assert not list(out.parent.glob(".compressor-stage-*")), "staging folder left behind"
    assert [_digest(p) for p in inputs] == digests, "an input was modified"


def _bad_cases(tmp_path: Path, model_file: Path, data_file: Path) -> dict:
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a checkpoint")
    whole = tmp_path / "whole.pt"
    torch.save(create_model("samplenet"), whole)
    gray = _npz(tmp_path / "gray.npz", shape=(32, 32, 1))
    bad_labels = tmp_path / "labels.npz"
    np.savez(bad_labels, x=np.zeros((4, 32, 32, 3), np.uint8), y=np.array([0, 1, 2, 12]))
    empty = tmp_path / "empty.npz"
    np.savez(empty, x=np.zeros((0, 32, 32, 3), np.uint8), y=np.zeros((0,), np.int64))
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    return {
        "missing model": ([tmp_path / "absent.pt"], "not found"),
        "not a checkpoint": ([junk], "not a PyTorch checkpoint"),
        "arch mismatch": ([model_file, "--arch", "resnet20"], "does not match"),
        "unknown arch": ([model_file, "--arch", "resnet57"], "unknown architecture"),
        "unknown method": ([model_file, "--method", "l2"], "unknown method"),
        "target zero": ([model_file, "--target", "0"], "open interval (0, 1)"),
        "target one": ([model_file, "--target", "1"], "open interval (0, 1)"),
        "target negative": ([model_file, "--target", "-0.2"], "open interval (0, 1)"),
        "channels": ([model_file, "--data", gray], "channel"),
        "labels": ([model_file, "--data", bad_labels], "label"),
        "empty": ([model_file, "--data", empty], "empty"),
        "unwritable out": ([model_file, "--out", a_file / "sub"], "is a file"),
        "pickle": ([whole], "--trust-pickle"),
        "epochs without data": ([model_file, "--epochs", "1"], "--data"),
        "option of another method": ([model_file, "--method", "l1", "--cmi-alpha", "2"], "applies to --method cmi"),
        "cmi without data": ([model_file, "--method", "cmi"], "--data"),
        "at-init without epochs": ([model_file, "--at-init"], "--epochs"),
        "mipp option for l1": ([model_file, "--method", "l1", "--mipp-repeats", "3"], "applies to --method mipp"),
        "mipp bad estimator": ([model_file, "--method", "mipp", "--data", data_file, "--mipp-estimator", "mlp"],
                               "predictor"),
    }


@pytest.mark.parametrize("case", [
    "missing model", "not a checkpoint", "arch mismatch", "unknown arch", "unknown method", "target zero",
    "target one", "target negative", "channels", "labels", "empty", "unwritable out", "pickle", "epochs without data",
    "option of another method", "cmi without data", "at-init without epochs", "mipp option for l1",
    "mipp bad estimator",
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case: str, tmp_path: Path, model_file: Path,
                                                         data_file: Path) -> None:
    args, match = _bad_cases(tmp_path, model_file, data_file)[case]
    out = tmp_path / "out"
    if "--out" not in args:
        args = [*args, "--out", out]
    inputs = [p for p in args if isinstance(p, Path) and p.is_file()]
    digests = [_digest(p) for p in inputs]
    result = invoke(*args, "--bench-batch", "none")
    _assert_clean_failure(result, out, inputs, digests, match)


def test_unknown_method_suggests_close_matches(model_file: Path, tmp_path: Path) -> None:
    result = invoke(model_file, "--method", "l11", "--out", tmp_path / "o")
    assert result.exit_code == 2 and "Did you mean 'l1'" in result.stderr


def test_debug_shows_the_traceback(model_file: Path, tmp_path: Path) -> None:
    result = invoke(model_file, "--target", "2", "--debug", "--out", tmp_path / "o")
    assert result.exit_code != 0 and result.exception is not None


def test_ctrl_c_during_finetuning_leaves_nothing(monkeypatch: pytest.MonkeyPatch, model_file: Path,
                                                 data_file: Path, tmp_path: Path) -> None:
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("compressor.training.Trainer.fit", interrupted)
    out = tmp_path / "out"
    digests = [_digest(model_file), _digest(data_file)]
    result = invoke(model_file, "--data", data_file, "--epochs", "1", "--out", out, "--bench-batch", "none")
    assert result.exit_code == 130, result.output
    assert "interrupted" in result.stderr
    assert not out.exists() and not list(tmp_path.glob(".compressor-stage-*"))
    assert [_digest(model_file), _digest(data_file)] == digests


def test_existing_outputs_need_overwrite(model_file: Path, data_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("{}")
    result = invoke(model_file, "--out", out, "--bench-batch", "none")
    assert result.exit_code == 2 and "--overwrite" in result.stderr
    assert (out / "report.json").read_text() == "{}"


def test_default_out_is_a_new_folder_beside_the_model(model_file: Path, data_file: Path) -> None:
    result = invoke(model_file, "--eval-data", data_file, "--bench-batch", "1", "--bench-repeats", "3",
                    "--round-to", "8")
    assert result.exit_code == 0, result.output
    out = model_file.parent / "net-l1-0.33"
    assert (out / "compressed.onnx").exists() and (out / "report.json").exists()
    again = invoke(model_file, "--eval-data", data_file, "--bench-batch", "none")
    assert again.exit_code == 0, again.output
    assert (model_file.parent / "net-l1-0.33-2" / "report.json").exists(), "a second run must not overwrite the first"
    assert os.listdir(model_file.parent).count("net.pt") == 1


def test_both_onnxruntime_packages_installed_is_reported(monkeypatch: pytest.MonkeyPatch, model_file: Path,
                                                          tmp_path: Path) -> None:
    import exporters

    info = {"onnxruntime_version": "1.20", "available_providers": ["CPUExecutionProvider"], "conflict": True,
            "packages": {"onnxruntime": "1.20", "onnxruntime-gpu": "1.20"}}
    monkeypatch.setattr(exporters, "runtime_info", lambda: info)
    result = invoke(model_file, "--out", tmp_path / "o")
    assert result.exit_code == 2, result.output
    assert "onnxruntime-gpu" in result.stderr and "uninstall" in result.stderr.lower()


@pytest.mark.parametrize("flags, expected", [([], None), (["--distill"], True), (["--no-distill"], False)])
def test_distillation_is_on_by_default_and_can_be_turned_off(flags: list[str], expected: bool | None, api_calls,
                                                              tmp_path: Path) -> None:
    """No flag leaves the choice to the config (None: distil unless --at-init); the flags force it either way."""
    from compressor.config import CompressConfig

    assert CliRunner().invoke(cli.app, [str(tmp_path / "m.pt"), *flags]).exit_code == 0
    assert [c["distill"] for c in api_calls] == [expected]
    cfg = CompressConfig(distill=expected)
    assert cfg.distills is (expected is not False)
    assert CompressConfig(distill=expected, at_init=True).distills is (expected is True)
