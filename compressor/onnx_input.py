"""An ONNX graph as the model to compress: ``compress model.onnx ...``.

:func:`load_onnx` converts the graph to PyTorch with onnx2torch (an optional dependency: the ``onnx-input`` extra),
checks that the converted model runs at more than one image per batch, and records where it came from; the run then
compresses and re-exports it as usual. :func:`verify_input` (called by :func:`compressor.pipeline.prepare`) checks
the converted model against the *input* graph in onnxruntime on the run's parity images, with the same tolerance
as the export check (``--atol`` + relative), and its numbers go to the report (``model.onnx_input``); a mismatch
stops the run before any work, nothing written.

onnx2torch 1.5 predates the opset-18+ graphs that ``torch.onnx.export`` writes today. Three converters are added
through its own registry (:func:`onnx2torch.node_converters.registry.add_converter`), for operators CNN exports use:

- ``ReduceMean``/``ReduceMax``/... from opset 18, whose ``axes`` moved from an attribute to a constant input;
- ``Reshape`` from opset 19 and 21 (and ``allowzero=1``, which changes nothing when the shape holds no 0);
- a ``Reshape`` that flattens (constant shape ``[-1, K]``, ``[N, -1]``, ``[0, -1]``, ``[N, K]`` with ``K`` the size
  of one sample) becomes ``torch.flatten(x, 1)``: with the constant, pruning the channels before it would break the
  model; flattened, torch-pruning follows the channels into the classifier. This also frees the batch size of
  graphs exported with a fixed batch.

Any other operator the converter does not know stops the run with one line naming them all (exit 2, nothing
written), before any conversion.

The compressed model is saved with arch ``onnx:<absolute path of the input>``: :func:`compressor.load_compressed`
converts that file again and replays the pruning, so it needs the input ONNX where it was.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import InputError, ModelLoadError, ValidationError
from .io import ONNX_PREFIX, LoadedModel

__all__ = ["INSTALL", "load_onnx", "onnx_factory", "unsupported_operators", "verify_input"]

INSTALL = 'pip install "compressor[onnx-input]" (or: pip install onnx2torch)'
_REDUCE_18 = ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceSum", "ReduceProd", "ReduceL1", "ReduceL2",
              "ReduceLogSum", "ReduceLogSumExp", "ReduceSumSquare")
_REGISTERED: list[bool] = []


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def _import_onnx2torch() -> Any:
    """onnx2torch (with our converters registered), or a one-line error saying what to install."""
    try:
        module = importlib.import_module("onnx2torch")
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] == "onnx2torch":
            raise InputError(f"an ONNX model as input needs onnx2torch, which is not installed: {INSTALL}") from None
        raise InputError(f"onnx2torch cannot be imported ({_first_line(exc)}); {INSTALL}") from None
    except Exception as exc:  # noqa: BLE001 - torchvision built for another torch fails with RuntimeError
        hint = (" (onnx2torch imports torchvision, which must be the build paired with this torch, CPU or CUDA: e.g. "
                "torchvision==0.28.0 for torch 2.13)") if "torchvision" in str(exc) else ""
        raise InputError(f"onnx2torch is installed but does not import with torch {torch.__version__} "
                         f"({_first_line(exc)}){hint}") from None
    if not _REGISTERED:
        _register_converters()
        _REGISTERED.append(True)
    return module


# ------------------------------------------------------------------------------------------ converters we add
class _Reduce(nn.Module):
    """``Reduce*`` with constant axes (opset 18+: axes as an input)."""

    def __init__(self, op: str, axes: list[int] | None, keepdims: bool) -> None:
        super().__init__()
        self.op, self.axes, self.keepdims = op, axes, keepdims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = list(range(x.dim())) if not self.axes else self.axes
        keep = self.keepdims
        if self.op == "ReduceMean":
            return x.mean(dim=dims, keepdim=keep)
        if self.op == "ReduceSum":
            return x.sum(dim=dims, keepdim=keep)
        if self.op == "ReduceMax":
            return x.amax(dim=dims, keepdim=keep)
        if self.op == "ReduceMin":
            return x.amin(dim=dims, keepdim=keep)
        if self.op == "ReduceL1":
            return x.abs().sum(dim=dims, keepdim=keep)
        if self.op == "ReduceL2":
            return x.square().sum(dim=dims, keepdim=keep).sqrt()
        if self.op == "ReduceSumSquare":
            return x.square().sum(dim=dims, keepdim=keep)
        if self.op == "ReduceLogSum":
            return x.sum(dim=dims, keepdim=keep).log()
        if self.op == "ReduceLogSumExp":
            return torch.logsumexp(x, dim=dims, keepdim=keep)
        out = x
        for d in sorted(dims, reverse=True):  # ReduceProd: one axis at a time
            out = out.prod(dim=d, keepdim=keep)
        return out


class _Flatten(nn.Module):
    """A ``Reshape`` to ``(batch, one sample's size)``: ``torch.flatten(x, 1)``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.flatten(x, 1)


def _static_shape(graph: Any, name: str) -> list[int] | None:
    info = graph.value_info.get(name)
    if info is None or not info.type.tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else -1 for d in info.type.tensor_type.shape.dim]


def _flattens(shape: list[int], target: list[int]) -> bool:
    """Whether reshaping ``shape`` (inferred, -1 unknown) to the constant ``target`` is ``flatten(x, 1)``."""
    if len(target) != 2 or len(shape) < 2 or any(d < 0 for d in shape[1:]):
        return False
    sample = math.prod(shape[1:])
    first, second = target
    if second == sample and first in (-1, 0, shape[0]):
        return True
    return second == -1 and (first == 0 or (first > 0 and first == shape[0]))


def _register_converters() -> None:
    from onnx2torch.node_converters import registry
    from onnx2torch.node_converters.reshape import OnnxReshape
    from onnx2torch.utils.common import (OnnxMapping, OperationConverterResult, get_const_value,
                                         onnx_mapping_from_node)

    def only_first_input(node: Any) -> Any:
        return OnnxMapping(inputs=(node.input_values[0],), outputs=node.output_values)

    def reduce18(node: Any, graph: Any) -> Any:
        axes = None
        if len(node.input_values) > 1 and node.input_values[1]:
            axes = [int(a) for a in get_const_value(node.input_values[1], graph).reshape(-1).tolist()]
        if not axes and node.attributes.get("noop_with_empty_axes", 0) == 1:
            return OperationConverterResult(torch_module=nn.Identity(), onnx_mapping=only_first_input(node))
        module = _Reduce(node.operation_type, axes, bool(node.attributes.get("keepdims", 1)))
        return OperationConverterResult(torch_module=module, onnx_mapping=only_first_input(node))

    def reshape(node: Any, graph: Any) -> Any:
        try:
            target = [int(v) for v in get_const_value(node.input_values[1], graph).reshape(-1).tolist()]
        except KeyError:  # a shape computed in the graph
            target = None
        if target is not None:
            shape = _static_shape(graph, node.input_values[0])
            if shape is not None and _flattens(shape, target):
                return OperationConverterResult(torch_module=_Flatten(), onnx_mapping=only_first_input(node))
        if node.attributes.get("allowzero", 0) == 1 and (target is None or 0 in target):
            raise NotImplementedError('"allowzero=1" with a zero in the shape is not implemented')
        return OperationConverterResult(torch_module=OnnxReshape(), onnx_mapping=onnx_mapping_from_node(node))

    table = registry._CONVERTER_REGISTRY  # noqa: SLF001 - the registry add_converter writes; we replace Reshape's
    for op in _REDUCE_18:
        registry.add_converter(operation_type=op, version=18)(reduce18)
    for version in (5, 13, 14, 19, 21):
        table[registry.OperationDescription(domain="", operation_type="Reshape", version=version)] = reshape


# ------------------------------------------------------------------------------------------------- conversion
def _read(path: Path) -> Any:
    import onnx

    if not path.is_file():
        raise ModelLoadError(f"model file not found: {path}")
    try:
        return onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError and others on a corrupt file
        raise ModelLoadError(f"{path} is not a readable ONNX file ({_first_line(exc)})") from None


def unsupported_operators(model: Any) -> list[str]:
    """``op (domain, opset)`` of every node onnx2torch has no converter for, sorted, once each."""
    from onnx2torch.node_converters.registry import get_converter

    _import_onnx2torch()
    opsets = {o.domain or "": o.version for o in model.opset_import}
    missing = set()
    for node in model.graph.node:
        domain = node.domain or ""
        try:
            get_converter(operation_type=node.op_type, version=opsets.get(domain, 1), domain=domain)
        except NotImplementedError:
            where = f"{domain}, " if domain not in ("", "ai.onnx") else ""
            missing.add(f"{node.op_type} ({where}opset {opsets.get(domain, '?')})")
    return sorted(missing)


def _input_shape(model: Any) -> tuple[int, ...] | None:
    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    if len(inputs) != 1:
        raise InputError(f"the ONNX graph has {len(inputs)} inputs; compressor takes one image input (N, C, H, W)")
    dims = [d.dim_value if d.HasField("dim_value") else None for d in inputs[0].type.tensor_type.shape.dim]
    if len(dims) != 4:
        raise InputError(f"the ONNX graph's input has {len(dims)} dimensions; compressor takes images (N, C, H, W)")
    rest = dims[1:]
    return tuple(int(d) for d in rest) if all(d for d in rest) else None  # type: ignore[arg-type]


def convert(path: str | Path) -> tuple[nn.Module, tuple[int, ...] | None, dict[str, Any]]:
    """The PyTorch model of the ONNX file ``path``, its input shape ``(C, H, W)`` (None when not static) and facts
    for the report. Unsupported operators and conversion failures are one-line :class:`InputError` messages."""
    path = Path(path)
    onnx2torch = _import_onnx2torch()
    model = _read(path)
    shape = _input_shape(model)
    missing = unsupported_operators(model)
    version = importlib.metadata.version("onnx2torch")
    if missing:
        raise InputError(f"{path} uses operators onnx2torch {version} cannot convert to PyTorch: {', '.join(missing)}; "
                         "export the model without them (or compress the PyTorch model itself)")
    try:
        module = onnx2torch.convert(model)
    except Exception as exc:  # noqa: BLE001 - a converter refusing a node's attributes raises anything
        raise InputError(f"onnx2torch {version} cannot convert {path}: {_first_line(exc)}") from None
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    facts = {"path": str(path), "opset": opset, "converter": f"onnx2torch {version}", "producer":
             f"{model.producer_name} {model.producer_version}".strip() or None}
    return module.eval(), shape, facts


def onnx_factory(path: str) -> tuple[Callable[..., nn.Module], tuple[int, ...] | None]:
    """``--arch onnx:<path>`` (the arch of a compressed model that came from an ONNX file): a factory converting
    the file again, and its input shape."""
    if not Path(path).is_file():
        raise ModelLoadError(f"this model was converted from {path}, which is not there any more; rebuilding it "
                             "needs that ONNX file (compressed.onnx holds the compressed graph on its own)")
    module, shape, _ = convert(path)

    def factory(**kwargs: Any) -> nn.Module:
        return module

    return factory, shape


def load_onnx(path: str | Path) -> LoadedModel:
    """Stage 1 for an ONNX file: the converted model, checked to run on a batch of two images."""
    path = Path(path)
    module, shape, facts = convert(path)
    if shape is not None:
        try:
            with torch.no_grad():
                module(torch.zeros((2, *shape)))
        except Exception as exc:  # noqa: BLE001 - any failure here means the graph fixes the batch size
            raise InputError(f"{path}: the converted model does not run on a batch of 2 ({_first_line(exc)}); "
                             "export the ONNX with a dynamic batch axis") from None
    arch = f"{ONNX_PREFIX}{path.resolve()}"
    return LoadedModel(module, arch, shape, str(path), {"onnx": True}, {}, {"onnx_input": facts})


def _chunks(batches: list[torch.Tensor], size: int | None) -> list[torch.Tensor]:
    if not size:
        return batches
    return [c for b in batches for c in torch.split(b, size) if c.shape[0] == size]


def verify_input(loaded: LoadedModel, inputs: list[torch.Tensor], *, atol: float) -> dict[str, Any]:
    """Parity of the converted model against the input ONNX in onnxruntime (the report's ``model.onnx_input``).

    Raises :class:`ValidationError` (nothing written) when they disagree beyond the export check's tolerance."""
    import onnx

    from exporters import check_parity

    facts = dict(loaded.details["onnx_input"])
    graph = onnx.load(facts["path"], load_external_data=False)
    first = graph.graph.input[0].type.tensor_type.shape.dim[0]
    batch = first.dim_value if first.HasField("dim_value") else None
    parity = check_parity(loaded.model, facts["path"], _chunks(inputs, batch), atol=atol)
    facts["parity"] = parity.to_dict()
    if not parity.ok:
        raise ValidationError(f"the PyTorch conversion of {facts['path']} disagrees with it in onnxruntime "
                              f"({parity.describe()}); nothing was written")
    return facts
