"""ONNX export and PyTorch/onnxruntime parity.

Exporter path
-------------
:func:`export_onnx` uses the ``torch.export``-based exporter (``torch.onnx.export(..., dynamo=True)``, translated by
onnxscript). In torch 2.13 it is the default and the TorchScript exporter (``dynamo=False``) is deprecated with a
"will be removed" warning. Both export the tiny CNNs and :class:`compressor.models.layers.ChannelShortcut` (strided
slicing, ``F.pad`` on channels, the ``index_select`` gather) with parity near 1e-7, but the dynamo path traces shapes
symbolically instead of baking Python-side shape arithmetic into constants, and produces a cleaner graph
(``Slice`` + ``Pad`` instead of ``Cast``/``Transpose``/``ConstantOfShape`` chains). Conv + BatchNorm pairs are folded
into the ``Conv`` in eval mode.

Three quirks of that exporter are handled here:

- it writes the weights to a side ``<file>.data`` unless ``external_data=False``;
- it may *silently* specialise a dynamic batch axis to the example's size (e.g. ``x.reshape(2, -1)``) instead of
  raising, so the saved graph's batch axis is checked after export;
- its per-node ``pkg.torch.onnx.stack_trace`` metadata embeds absolute paths of the caller's source files, so that
  entry is stripped.

onnxruntime is optional (``cpu`` / ``gpu`` extras); its sessions come from :mod:`exporters.runtime`, which imports it
lazily.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import os
import uuid
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from exporters.errors import ExportError, ParityError
from exporters.runtime import CPU_PROVIDER, create_session, describe_error, import_onnxruntime, single_input_name

__all__ = ["ParityReport", "check_parity", "export_onnx"]

logger = logging.getLogger(__name__)

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
_STACK_TRACE_KEY = "pkg.torch.onnx.stack_trace"
# Loggers the exporter chats on (e.g. "torchvision is not installed. Skipping torchvision::nms").
_QUIET_LOGGERS = ("torch.onnx", "torch.export", "torch._export", "torch._dynamo", "torch.fx", "onnxscript", "onnx_ir")


# --------------------------------------------------------------------------------------------------------- export


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    example_input: torch.Tensor,
    *,
    opset: int | None = None,
    dynamic_batch: bool = True,
) -> Path:
    """Export ``model`` to one self-contained ONNX file, checked and written atomically.

    Parameters
    ----------
    model : nn.Module
        The network. It is exported in eval mode; the train/eval flags of its modules are restored afterwards.
    path : path-like
        Destination ``.onnx`` file. Its directory must exist; an existing file is replaced only on success.
    example_input : torch.Tensor
        One input batch ``(N, C, H, W)`` on the model's device, used to trace the graph.
    opset : int, optional
        ONNX opset; ``None`` keeps the exporter's default (20 with torch 2.13).
    dynamic_batch : bool
        Make axis 0 of ``input`` and ``logits`` symbolic (``"batch"``).

    Returns
    -------
    Path
        ``path``. The graph has one input ``input`` and output ``logits``, weights embedded (no ``.data`` file),
        and passes ``onnx.checker.check_model(full_check=True)``.

    Raises
    ------
    ExportError
        Bad arguments, the exporter failed, the checker rejected the graph, or the batch axis could not be made
        dynamic. The temporary file is removed and ``path`` is left untouched; the exporter's captured output is
        logged at WARNING level and the original exception is chained.
    """
    path = Path(path)
    _check_export_args(model, path, example_input, opset)
    # A fresh name rather than mkstemp: mkstemp's 0600 mode would survive os.replace into the final file.
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    captured: list[str] = []
    try:
        _run_exporter(model, tmp, example_input, opset=opset, dynamic_batch=dynamic_batch, captured=captured)
        _strip_stack_traces(tmp)
        _verify_onnx(tmp, dynamic_batch=dynamic_batch)
        os.replace(tmp, path)
    except BaseException as exc:
        for leftover in (tmp, tmp.with_name(tmp.name + ".data")):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
        text = "\n".join(line for line in captured if line.strip())
        if text and isinstance(exc, Exception):
            logger.warning("torch.onnx output before the failure:\n%s", text)
        if isinstance(exc, Exception) and not isinstance(exc, ExportError):
            raise ExportError(f"cannot write ONNX file {path}: {describe_error(exc)}") from exc
        raise
    return path


def _check_export_args(model: object, path: Path, example_input: object, opset: object) -> None:
    if not isinstance(model, nn.Module):
        raise ExportError(f"export_onnx needs a torch.nn.Module, got {type(model).__name__}.")
    if not isinstance(example_input, torch.Tensor) or not example_input.is_floating_point():
        raise ExportError("example_input must be a floating-point tensor batch (N, C, H, W).")
    if example_input.ndim < 1 or example_input.shape[0] < 1:
        raise ExportError(f"example_input needs a non-empty batch axis, got shape {tuple(example_input.shape)}.")
    if opset is not None and (isinstance(opset, bool) or not isinstance(opset, int) or opset < 1):
        raise ExportError(f"opset must be a positive int or None, got {opset!r}.")
    if not path.parent.is_dir():
        raise ExportError(f"output directory {path.parent} does not exist; create it first.")
    if path.is_dir():
        raise ExportError(f"{path} is a directory; give a file name such as {path / 'model.onnx'}.")


def _run_exporter(
    model: nn.Module,
    target: Path,
    example_input: torch.Tensor,
    *,
    opset: int | None,
    dynamic_batch: bool,
    captured: list[str],
) -> None:
    """Run ``torch.onnx.export`` (dynamo path) quietly; its chatter goes into ``captured``."""
    kwargs: dict[str, Any] = {
        "input_names": [INPUT_NAME],
        "output_names": [OUTPUT_NAME],
        "dynamo": True,
        "external_data": False,  # the default writes weights to a side "<file>.data"
        "optimize": True,
        "verbose": False,
    }
    if opset is not None:
        kwargs["opset_version"] = opset
    if dynamic_batch:
        kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch")},)
        if example_input.shape[0] == 1:
            # torch.export specialises size-1 dimensions ("0/1 specialisation"), so a batch of one traced as dynamic
            # can contradict itself: LayerNorm2d's permute after a 1x1 pool (ConvNeXt's head) fails with "Invalid
            # ranges [2:1]". The same image twice traces the batch axis as a general size.
            example_input = example_input.expand(2, *example_input.shape[1:]).contiguous()
    with _captured_output(captured), _eval_mode(model):
        try:
            torch.onnx.export(model, (example_input,), str(target), **kwargs)
        except Exception as exc:
            raise ExportError(f"ONNX export of {type(model).__name__} failed: {describe_error(exc)}") from exc


def _strip_stack_traces(path: Path) -> None:
    """Drop the ``pkg.torch.onnx.stack_trace`` node metadata, which embeds absolute paths of the caller's sources.

    The other node metadata (module names and classes) is kept: it maps ONNX nodes back to the PyTorch modules.
    """
    import onnx

    proto = onnx.load(str(path))
    graphs, changed = [proto.graph], False
    nodes = [node for function in proto.functions for node in function.node]
    while graphs:
        graph = graphs.pop()
        nodes.extend(graph.node)
        for node in graph.node:
            for attribute in node.attribute:
                graphs.extend([attribute.g] if attribute.HasField("g") else list(attribute.graphs))
    for node in nodes:
        kept = [entry for entry in node.metadata_props if entry.key != _STACK_TRACE_KEY]
        if len(kept) != len(node.metadata_props):
            del node.metadata_props[:]
            node.metadata_props.extend(kept)
            changed = True
    if changed:
        onnx.save(proto, str(path))


def _verify_onnx(path: Path, *, dynamic_batch: bool) -> None:
    """Check the graph, that no tensor lives in external data, and that the batch axis is symbolic if asked."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        raise ExportError(f"the exported graph fails onnx.checker: {describe_error(exc)}") from exc
    proto = onnx.load(str(path), load_external_data=False)
    if any(uses_external_data(tensor) for tensor in proto.graph.initializer):
        raise ExportError("the exported graph references external data; it would not be a self-contained file.")
    if dynamic_batch:
        dims = proto.graph.input[0].type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value"):
            raise ExportError(
                f"the exporter fixed the batch axis to {dims[0].dim_value} (the model's forward uses the batch "
                "size as a constant, e.g. x.view(N, -1)); use x.flatten(1) or export with dynamic_batch=False."
            )


@contextlib.contextmanager
def _captured_output(captured: list[str]) -> Iterator[None]:
    """Silence the exporter: capture stdout/stderr and warnings, raise its loggers to ERROR; restore everything.

    Redirecting ``sys.stdout`` is process-wide, so exports must not run concurrently with printing threads.
    """
    buffer = io.StringIO()
    loggers = [logging.getLogger(name) for name in _QUIET_LOGGERS]
    levels = [log.level for log in loggers]
    try:
        for log in loggers:
            log.setLevel(logging.ERROR)
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    yield
                finally:
                    captured.append(buffer.getvalue())
                    captured.extend(f"{w.category.__name__}: {w.message}" for w in caught)
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode and restore every submodule's own ``training`` flag afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, mode in modes:
            module.training = mode


# --------------------------------------------------------------------------------------------------------- parity


@dataclass(frozen=True)
class ParityReport:
    """Agreement between a PyTorch model and its ONNX graph over some batches.

    Attributes
    ----------
    max_abs_diff : float
        ``max |y_torch - y_onnx|`` over every output element of every sample (NaN if either side produced NaN).
    top1_agreement : float
        Fraction of samples whose arg-max over the first output agrees, in [0, 1].
    n_samples : int
        Number of samples (rows over all batches).
    atol : float
        Tolerance on ``max_abs_diff``.
    providers : tuple of str
        onnxruntime providers the session actually used, read back from it.
    scale : float
        ``max |y_torch|``: the size of the outputs the difference is judged against.
    rtol : float
        Relative tolerance: the check allows ``atol + rtol * scale`` (float32 sums over deep networks drift in
        proportion to the values summed).
    outputs : tuple of dict
        Per output, in graph order: ``name``, ``max_abs_diff``, ``scale`` (``max |y_torch|`` of that output) and
        ``rel_diff`` (``max_abs_diff / scale``; 0 when both are 0, inf when only the scale is).
    """

    max_abs_diff: float
    top1_agreement: float
    n_samples: int
    atol: float
    providers: tuple[str, ...]
    scale: float = 0.0
    rtol: float = 0.0
    outputs: tuple[dict[str, Any], ...] = ()

    @property
    def tolerance(self) -> float:
        """``atol + rtol * scale``."""
        return self.atol + self.rtol * self.scale

    @property
    def ok(self) -> bool:
        """``max_abs_diff <= atol + rtol * scale`` and every top-1 label agrees (NaN differences fail)."""
        return bool(self.max_abs_diff <= self.tolerance) and self.top1_agreement == 1.0

    def describe(self) -> str:
        """One line: per output the max abs and relative difference, the tolerance, top-1 agreement, providers.

        >>> ParityReport(2e-4, 1.0, 8, 1e-4, ("CPUExecutionProvider",), 1.0, 1e-5,
        ...              ({"name": "logits", "max_abs_diff": 2e-4, "scale": 1.0, "rel_diff": 2e-4},)).describe()[:60]
        'logits: max abs diff 0.0002, relative 0.0002 (max |output| 1)'
        """
        rows = self.outputs or ({"name": "output", "max_abs_diff": self.max_abs_diff, "scale": self.scale,
                                 "rel_diff": _relative(self.max_abs_diff, self.scale)},)
        parts = [f"{row['name']}: max abs diff {row['max_abs_diff']:.3g}, relative {row['rel_diff']:.3g} "
                 f"(max |output| {row['scale']:.3g})" for row in rows]
        providers = ", ".join(self.providers) or "unknown providers"
        return (f"{'; '.join(parts)}; tolerance {self.tolerance:.3g} = atol {self.atol:.3g} + rtol {self.rtol:.3g}"
                f" x max |output| {self.scale:.3g}; top-1 agreement {self.top1_agreement:.2%} over "
                f"{self.n_samples} samples on {providers}")

    def raise_if_failed(self) -> None:
        """Raise :class:`ParityError` with the numbers of :meth:`describe` unless :attr:`ok`."""
        if not self.ok:
            raise ParityError(f"ONNX output differs from PyTorch: {self.describe()}; re-export the model, or raise "
                              "atol if the difference is expected.")

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict, including ``ok``."""
        data = asdict(self)
        data["providers"] = list(self.providers)
        data["outputs"] = [{**row, "rel_diff": row["rel_diff"] if math.isfinite(row["rel_diff"]) else None}
                           for row in self.outputs]
        data["ok"] = self.ok
        return data


def check_parity(
    model: nn.Module,
    onnx_path: str | os.PathLike[str],
    batches: Iterable[torch.Tensor],
    *,
    atol: float = 1e-4,
    providers: Sequence[str] | None = None,
    rtol: float = 1e-4,
) -> ParityReport:
    """Run the same batches through PyTorch (CPU, float32, eval, no_grad) and onnxruntime, and compare.

    Output count/names and shapes are compared first and a mismatch raises; values are then summarised as
    ``max_abs_diff`` and top-1 agreement. A value mismatch is *reported*, not raised: call
    :meth:`ParityReport.raise_if_failed` to make it fatal.

    Parameters
    ----------
    model : nn.Module
        Reference network. Used as is when already on CPU in float32, otherwise a CPU float32 copy; train/eval flags
        are restored afterwards.
    onnx_path : path-like
        The exported graph (one input).
    batches : iterable of torch.Tensor
        Normalised float input batches ``(N, C, H, W)``.
    atol : float
        Absolute tolerance on the maximum absolute difference.
    providers : sequence of str, optional
        onnxruntime providers; default CPU only. Each requested non-CPU provider must be active after read-back.
    rtol : float
        Relative tolerance: ``max_abs_diff <= atol + rtol * max |y_torch|`` passes (1e-4: float32 round-off summed
        over a deep network; reconstructed ResNet-56s differed by 1.4e-4 and 5.7e-4 on logits of ~15-20 with every
        top-1 equal. An export bug shows as differences of order 1 or top-1 disagreement).

    Returns
    -------
    ParityReport

    Raises
    ------
    ParityError
        Different number/names of outputs or different shapes.
    ExportError
        No batches, a bad ``atol``, onnxruntime missing, or a requested provider inactive.
    """
    if not (isinstance(atol, (int, float)) and math.isfinite(atol) and atol >= 0):
        raise ExportError(f"atol must be a finite number >= 0, got {atol!r}.")
    if not (isinstance(rtol, (int, float)) and math.isfinite(rtol) and rtol >= 0):
        raise ExportError(f"rtol must be a finite number >= 0, got {rtol!r}.")
    requested = tuple(providers) if providers else (CPU_PROVIDER,)
    ort = import_onnxruntime()
    required = tuple(p for p in requested if p != CPU_PROVIDER)
    session = create_session(ort, Path(onnx_path), requested, threads=None, required=required)
    input_name = single_input_name(session)
    names = [output.name for output in session.get_outputs()]
    reference = _cpu_float_model(model)
    diffs, scales = [0.0] * len(names), [0.0] * len(names)
    agree, total = 0, 0
    with _eval_mode(reference), torch.no_grad():
        for index, batch in enumerate(batches):
            x = _as_cpu_float(batch, index)
            expected = _torch_outputs(reference(x), names)
            actual = session.run(names, {input_name: x.numpy()})
            _check_shapes(expected, actual, names, index)
            for k, (want, got) in enumerate(zip(expected, actual)):
                diffs[k] = float(np.maximum(diffs[k], np.max(np.abs(want - got), initial=0.0)))
                scales[k] = max(scales[k], float(np.max(np.abs(want), initial=0.0)))
            rows = expected[0].shape[0] if expected[0].ndim else 1
            agree += int(np.sum(_top1(expected[0], rows) == _top1(actual[0], rows)))
            total += rows
    if total == 0:
        raise ExportError("check_parity got no samples; pass at least one non-empty batch.")
    outputs = tuple({"name": name, "max_abs_diff": diff, "scale": size, "rel_diff": _relative(diff, size)}
                    for name, diff, size in zip(names, diffs, scales))
    max_diff = float(np.max(diffs)) if diffs else 0.0  # np.max keeps a NaN difference
    return ParityReport(max_diff, agree / total, total, float(atol), tuple(session.get_providers()),
                        max(scales, default=0.0), float(rtol), outputs)


def _relative(diff: float, scale: float) -> float:
    """``diff / scale``: 0 when both are 0, inf when only ``scale`` is."""
    if scale > 0 or math.isnan(diff):
        return diff / scale if scale > 0 else diff
    return 0.0 if diff == 0 else math.inf


def _cpu_float_model(model: nn.Module) -> nn.Module:
    tensors = [*model.parameters(), *model.buffers()]
    if all(t.device.type == "cpu" and (t.dtype == torch.float32 or not t.is_floating_point()) for t in tensors):
        return model
    return copy.deepcopy(model).to(device="cpu", dtype=torch.float32)


def _as_cpu_float(batch: object, index: int) -> torch.Tensor:
    if not isinstance(batch, torch.Tensor) or not batch.is_floating_point():
        raise ExportError(f"batch {index} is not a floating-point tensor ({type(batch).__name__}); pass inputs only.")
    return batch.detach().to(device="cpu", dtype=torch.float32).contiguous()


def _torch_outputs(output: object, names: Sequence[str]) -> list[np.ndarray]:
    """PyTorch outputs as float32 arrays in the ONNX output order; count or names must match."""
    if isinstance(output, torch.Tensor):
        tensors = [output]
    elif isinstance(output, Mapping):
        if list(output) != list(names):
            raise ParityError(f"output names differ: PyTorch {list(output)} vs ONNX {list(names)}.")
        tensors = list(output.values())
    elif isinstance(output, (tuple, list)):
        tensors = list(output)
    else:
        raise ParityError(f"the model returned {type(output).__name__}; expected a tensor or a tuple of tensors.")
    if len(tensors) != len(names):
        raise ParityError(f"PyTorch returns {len(tensors)} outputs but the ONNX graph has {len(names)} ({names}).")
    return [t.detach().to(device="cpu", dtype=torch.float32).numpy() for t in tensors]


def _check_shapes(expected: list[np.ndarray], actual: list[Any], names: Sequence[str], index: int) -> None:
    for name, want, got in zip(names, expected, actual):
        if tuple(want.shape) != tuple(np.shape(got)):
            raise ParityError(
                f"output {name!r} has shape {tuple(np.shape(got))} in ONNX but {tuple(want.shape)} in PyTorch "
                f"(batch {index}); the graph does not match the model, re-export it."
            )


def _top1(values: np.ndarray, rows: int) -> np.ndarray:
    return np.asarray(values).reshape(rows, -1).argmax(axis=1)
