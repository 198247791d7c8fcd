"""compress bench on tiny hand-built ONNX graphs (no torch export; 3 repeats; no timing ratios asserted), and the
exit-code mapping every subcommand shares (run_guarded)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

from compressor.bench import bench_onnx, read_input_shape, render_bench
from compressor.commands import bench, inspect
from compressor.commands.common import make_app, parse_ints, run_guarded
from compressor.errors import InputError
from exporters.errors import ExportError

from .conftest import SAMPLES

pytest.importorskip("onnxruntime")

runner = CliRunner()
app = make_app()
inspect.register(app)
bench.register(app)


def invoke(*args: object, **options: str):
    """``compress bench ARGS`` with fast options (3 repeats, 1 warm-up, 1 thread, CPU) unless overridden."""
    options = {"repeats": "3", "warmup": "1", "threads": "1", "device": "cpu", **options}
    flags = [x for key, value in options.items() for x in (f"--{key}", value)]
    return runner.invoke(app, ["bench", *(str(a) for a in args), *flags])


def _conv_net(path: Path, *, width: int, size: int = 8, batch: int | str = "batch") -> Path:
    """input (batch, 3, size, size) -> Conv 3x3 -> Relu -> GlobalAveragePool -> Flatten -> logits (batch, width)."""
    weight = np.random.default_rng(width).standard_normal((width, 3, 3, 3)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["input", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["g"]),
             helper.make_node("Flatten", ["g"], ["logits"])]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, size, size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, width])],
        initializer=[numpy_helper.from_array(weight, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="module")
def graphs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bench")
    return {"wide": _conv_net(folder / "wide.onnx", width=16), "narrow": _conv_net(folder / "narrow.onnx", width=4),
            "big": _conv_net(folder / "big.onnx", width=4, size=16),
            "fixed": _conv_net(folder / "fixed.onnx", width=4, batch=1)}


def assert_one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output and result.stdout == ""
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_json_has_percentiles_per_batch_and_providers(graphs: dict[str, Path]) -> None:
    result = invoke(graphs["wide"], graphs["narrow"], "--batch", "1,2", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert set(data["latency"]) == {"1", "2"}
    for row in data["latency"].values():
        assert set(row) == {"wide.onnx", "narrow.onnx"}
        for stats in row.values():
            assert stats["p50_ms"] > 0 and stats["p90_ms"] >= stats["p50_ms"] and stats["p99_ms"] >= stats["p90_ms"]
            assert stats["n"] == 3
    assert data["providers"] == {"wide.onnx": ["CPUExecutionProvider"], "narrow.onnx": ["CPUExecutionProvider"]}
    assert data["baseline"] == "wide.onnx" and data["input_shape"] == [3, 8, 8] and data["threads"] == 1
    assert data["speedup"]["1"]["wide.onnx"] == 1.0 and data["speedup"]["2"]["narrow.onnx"] > 0
    assert [m["path"] for m in data["models"]] == [str(graphs["wide"]), str(graphs["narrow"])]


def test_table_output(graphs: dict[str, Path]) -> None:
    result = invoke(graphs["wide"], graphs["narrow"], "--batch", "1")
    assert result.exit_code == 0, result.output
    for needle in ("p50 ms", "p99 ms", "narrow.onnx", "vs wide.onnx", "providers: CPUExecutionProvider"):
        assert needle in result.stdout


def test_python_function_and_names(graphs: dict[str, Path]) -> None:
    report = bench_onnx([graphs["wide"], graphs["wide"]], batch_sizes=(1,), repeats=3, warmup=0, threads=1,
                        device="cpu")
    names = [m.name for m in report.models]
    assert names == [str(graphs["wide"]), f"{graphs['wide']}#2"]  # same file twice: still two rows
    assert set(report.speedups()[1]) == set(names) and report.models[0].bytes == graphs["wide"].stat().st_size
    assert report.result.latency[1][names[1]].n == 3
    from rich.console import Console

    console = Console(record=True, width=120)
    render_bench(report, console=console)
    assert "#2" in console.export_text()


def test_read_input_shape(graphs: dict[str, Path], tmp_path: Path) -> None:
    assert read_input_shape(graphs["big"]) == (3, 16, 16)
    assert read_input_shape(graphs["fixed"]) == (3, 8, 8)
    symbolic = _conv_net(tmp_path / "sym.onnx", width=2, size=8)
    proto = onnx.load(str(symbolic))
    proto.graph.input[0].type.tensor_type.shape.dim[2].dim_param = "h"
    onnx.save(proto, str(symbolic))
    with pytest.raises(InputError, match="fixed dims after the batch axis"):
        read_input_shape(symbolic)


def test_mismatched_input_shapes_exit_2(graphs: dict[str, Path]) -> None:
    assert_one_line_error(invoke(graphs["wide"], graphs["big"]), "disagree on the input shape", "3x16x16")


@pytest.mark.parametrize("bad", ["missing", "empty", "checkpoint", "text"])
def test_missing_or_not_onnx_exit_2(graphs: dict[str, Path], tmp_path: Path, bad: str) -> None:
    path = {"missing": tmp_path / "gone.onnx", "empty": tmp_path / "empty.onnx",
            "checkpoint": SAMPLES / "samplenet.pt", "text": tmp_path / "notes.onnx"}[bad]
    if bad == "empty":
        path.write_bytes(b"")
    if bad == "text":
        path.write_text("not a graph\n")
    needle = "not found" if bad == "missing" else "not an ONNX model"
    assert_one_line_error(invoke(graphs["wide"], path), needle)


@pytest.mark.parametrize(("options", "needle"), [
    ({"batch": "1,x"}, "--batch expects"),
    ({"batch": "2"}, "fixed batch of 1"),
    ({"repeats": "0"}, "repeats"),
    ({"threads": "0"}, "threads"),
    ({"device": "tpu"}, "device must be one of"),
])
def test_bad_options_exit_2(graphs: dict[str, Path], options: dict[str, str], needle: str) -> None:
    assert_one_line_error(invoke(graphs["fixed"], graphs["narrow"], **options), needle)


# ------------------------------------------------------------------------------------------------- run_guarded
def _raise(exc: BaseException):
    def fn() -> None:
        raise exc
    return fn


@pytest.mark.parametrize("exc", [InputError("bad --arch"), ExportError("bad graph")])
def test_run_guarded_user_errors_exit_2(exc: Exception, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_guarded(_raise(exc), debug=False) == (2, None)
    assert capsys.readouterr().err == f"error: {exc}\n"
    with pytest.raises(type(exc)):
        run_guarded(_raise(exc), debug=True)


def test_run_guarded_bug_exit_1_interrupt_130(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_guarded(lambda: 7, debug=False) == (0, 7)
    assert run_guarded(_raise(RuntimeError("boom\nsecond line")), debug=False) == (1, None)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("internal error: RuntimeError: boom") and "--debug" in err
    with pytest.raises(RuntimeError):
        run_guarded(_raise(RuntimeError("boom")), debug=True)
    assert run_guarded(_raise(KeyboardInterrupt()), debug=False) == (130, None)
    assert "interrupted" in capsys.readouterr().err


def test_parse_ints() -> None:
    assert parse_ints("1,32", flag="--batch", example="1,32") == (1, 32)
    with pytest.raises(InputError, match="--batch values must be >= 1"):
        parse_ints("0", flag="--batch", example="1,32")


def test_help_has_examples() -> None:
    for command in ("bench", "inspect"):
        result = runner.invoke(app, [command, "-h"])
        assert result.exit_code == 0 and f"Example: compress {command}" in result.stdout
