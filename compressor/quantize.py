"""INT8 post-training quantisation of an exported ONNX graph with onnxruntime's own tools, verified by top-1.

onnxruntime does the quantising: ``quant_pre_process``, then ``quantize_static`` (QDQ, per-channel weights,
``nodes_to_exclude``) calibrated by a ``CalibrationDataReader`` over the run's calibration batches (float32 NCHW,
already normalised). Around it: :func:`quantize_int8` (one file, written atomically, input untouched);
:func:`quantize_verified` (bit-parity cannot hold for INT8, so check top-1 on evaluation data, or top-1 agreement
with fp32 on the calibration images, and keep the nodes ranked most sensitive by :func:`node_sensitivity` in float
until the drop is within ``max_drop``, else raise :class:`~compressor.errors.ValidationError` and write nothing);
:func:`choose_format` (time U8 and S8 activations on this machine); :func:`onnx_top1` and :func:`agreement`.

Defaults, measured by ``python -m benchmarks.int8_formats`` (``benchmarks/results/int8_formats.json``; CIFAR-10
ResNets of ``../shared``, 256 calibration images of ``train.npz``, top-1 on ``test1000.npz`` (+-0.9 points), AMD EPYC
with AVX-512 VNNI, onnxruntime 1.32; speed-up = fp32 p50 / INT8 p50, interleaved, on 1 thread / default threads)::

    ResNet-56, fp32 92.8, 3.58 MB   top-1  agree  bytes    quantise  b1: 1t / dft   b32: 1t / dft
    U8 minmax (default)             92.8   99.4   1.09 MB  3.3 s     2.09 / 2.31    2.56 / 2.50
    U8 percentile                   92.9   99.7   1.09 MB  7.1 s     2.13 / 2.66    2.50 / 2.47
    U8 entropy                      92.8   99.4   1.09 MB  7.3 s     2.16 / 2.69    2.56 / 2.56
    S8 minmax                       92.9   99.5   1.09 MB  2.9 s     0.79 / 0.54    0.86 / 0.73
    S8 percentile                   92.9   99.7   1.09 MB  6.4 s     0.82 / 0.55    0.83 / 0.74
    S8 entropy                      92.9   99.5   1.09 MB  6.0 s     0.82 / 1.05    0.81 / 0.72

ResNet-20 (fp32 91.5): 91.6 for every format; on 1 thread U8 2.0-2.1x (b1), 2.3-2.4x (b32), S8 0.81-0.89x.

- **U8 activations** (S8 weights): 2.1x (b1) and 2.6x (b32) faster than fp32 on 1 thread, where S8 activations
  are *slower* than fp32 (0.8x; VNNI's dot product is u8·s8). :func:`choose_format` still measures on the machine
  at hand (onnxruntime documents S8 as the default, and ARM favours it).
- **minmax** calibration: percentile and entropy change top-1 by at most 0.1 point and agreement by 0.3 (3 of
  1,000 images: noise), and take twice as long to calibrate. Latency does not depend on the calibration.
- per-channel weights (per-tensor not compared). Default threads ("dft") ran on 2 busy cores (load 4-5): noisy.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import io
import itertools
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from exporters import benchmark_latency, make_session
from exporters.runtime import describe_error, import_onnxruntime

from .errors import InputError, ValidationError
from .io import atomic_save
from .onnxfile import graph_inputs, read_onnx

__all__ = ["ACTIVATIONS", "CALIBRATIONS", "DEFAULT_FORMAT", "QUANTISABLE_OPS", "Int8Format", "Int8Result", "agreement",
           "choose_format", "node_sensitivity", "onnx_top1", "quantize_int8", "quantize_verified"]

Int8Type = Literal["U8", "S8"]
Calibration = Literal["minmax", "percentile", "entropy"]
ACTIVATIONS: tuple[Int8Type, ...] = ("U8", "S8")
CALIBRATIONS: tuple[Calibration, ...] = ("minmax", "percentile", "entropy")
QUANTISABLE_OPS = ("Conv", "Gemm", "MatMul")
SENSITIVITY_IMAGES = 64
_TYPES = {"U8": "QUInt8", "S8": "QInt8"}
_METHODS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}
_EPS = 1e-9  # drops are differences of counts over N; don't fail 0.0100000001 > 0.01


@dataclass(frozen=True)
class Int8Format:
    """How to quantise. ``activation``, ``weight``: ``"U8"``/``"S8"`` (``QuantType.QUInt8``/``QInt8``; onnxruntime has
    no S8 activations with U8 weights; U8 activations use the x86 u8·s8 VNNI kernels, S8 is onnxruntime's documented
    default: :func:`choose_format` measures). ``per_channel``: one scale per output channel of each weight.
    ``calibration``: ``"minmax"``, ``"percentile"`` (99.999) or ``"entropy"``, asymmetric ranges for all three.

    >>> Int8Format(activation="S8").name
    'S8/S8 per-channel minmax'
    """

    activation: Int8Type = "U8"
    weight: Int8Type = "S8"
    per_channel: bool = True
    calibration: Calibration = "minmax"

    def __post_init__(self) -> None:
        for what, value, known in (("activation", self.activation, ACTIVATIONS), ("weight", self.weight, ACTIVATIONS),
                                   ("calibration", self.calibration, CALIBRATIONS)):
            if value not in known:
                raise InputError(f"INT8 {what} must be one of {', '.join(known)}; got {value!r}")
        if not isinstance(self.per_channel, bool):
            raise InputError(f"per_channel must be True or False; got {self.per_channel!r}")
        if (self.activation, self.weight) == ("S8", "U8"):
            raise InputError("onnxruntime does not support S8 activations with U8 weights; use weight='S8'")

    @property
    def name(self) -> str:
        """Short label: activation/weight, per-channel or per-tensor, calibration."""
        channels = "per-channel" if self.per_channel else "per-tensor"
        return f"{self.activation}/{self.weight} {channels} {self.calibration}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


DEFAULT_FORMAT = Int8Format()


@dataclass(frozen=True)
class Int8Result:
    """A verified INT8 graph (:func:`quantize_verified`): ``accuracy``, ``fp32_accuracy`` (top-1 on the evaluation
    data, None without), ``agreement`` (top-1 agreement with fp32 on the evaluation images, else the calibration
    images), ``excluded`` (nodes kept in float: the most sensitive first, then those that quantise their outputs, see
    :func:`quantize_int8`), ``attempts`` (each quantisation tried: ``excluded`` (how many most sensitive nodes),
    ``float_nodes``, ``accuracy``, ``agreement``, ``drop``) and ``seconds`` (wall time)."""

    path: Path
    fmt: Int8Format
    accuracy: float | None
    fp32_accuracy: float | None
    agreement: float
    excluded: tuple[str, ...]
    attempts: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly dict (``path`` as a string, ``fmt`` as a dict)."""
        return {**asdict(self), "path": str(self.path), "fmt": self.fmt.to_dict(), "excluded": list(self.excluded)}


def _check_onnx(path: str | Path) -> Path:
    """An existing ONNX file with one float input, else a one-line :class:`InputError`."""
    path, proto = read_onnx(path)
    inputs = graph_inputs(proto)
    if not proto.graph.node or len(inputs) != 1:
        raise InputError(f"{path} is not an ONNX graph with one input (found {len(inputs)} inputs)")
    return path


def _check_batches(batches: Iterable[Any], what: str) -> list[np.ndarray]:
    """Float32 contiguous NCHW arrays; integer pixels are refused (they would be un-normalised)."""
    out = []
    for x in batches:
        array = np.asarray(x)
        if array.ndim != 4 or array.shape[0] < 1 or not np.issubdtype(array.dtype, np.floating):
            raise InputError(f"{what} must be normalised float NCHW batches; got {array.dtype} {array.shape} "
                             "(apply the run's normalisation first)")
        out.append(np.ascontiguousarray(array, dtype=np.float32))
    if not out:
        raise InputError(f"{what} is empty; give at least one batch of images")
    return out


def _predictions(path: Path, inputs: Iterable[np.ndarray], *, threads: int | None = None) -> np.ndarray:
    """Top-1 class of every image."""
    return np.concatenate([logits.argmax(axis=1) for logits in _logits(path, inputs, threads=threads)])


def _logits(path: Path, inputs: Iterable[np.ndarray], *, threads: int | None = None) -> list[np.ndarray]:
    session = make_session(path, threads=threads)
    name = session.get_inputs()[0].name
    return [np.asarray(session.run(None, {name: x})[0]) for x in inputs]


def onnx_top1(path: str | Path, batches: Iterable[tuple[np.ndarray, np.ndarray]], *,
              threads: int | None = None) -> float:
    """Top-1 accuracy of an ONNX graph in onnxruntime (CPU) on ``(x, y)`` batches (normalised float32 NCHW images,
    integer labels); ``threads`` is ``intra_op_num_threads`` (None: onnxruntime's default).

    >>> onnx_top1("runs/r56/compressed.int8.onnx", eval_batches, threads=1)  # doctest: +SKIP
    0.931
    """
    path = _check_onnx(path)
    pairs = [(x, np.asarray(y)) for x, y in batches]
    xs = _check_batches((x for x, _ in pairs), "evaluation data")
    predicted, labels = _predictions(path, xs, threads=threads), np.concatenate([y.reshape(-1) for _, y in pairs])
    if labels.shape != predicted.shape:
        raise InputError(f"evaluation data has {labels.size} labels for {predicted.size} images")
    return float(np.mean(predicted == labels))


def agreement(a: str | Path, b: str | Path, inputs: Iterable[np.ndarray], *, threads: int | None = None) -> float:
    """Fraction of images on which two graphs predict the same top-1 class.

    >>> agreement("original.onnx", "original.int8.onnx", calib_batches)  # doctest: +SKIP
    0.988
    """
    a, b = _check_onnx(a), _check_onnx(b)
    xs = _check_batches(inputs, "inputs")
    return float(np.mean(_predictions(a, xs, threads=threads) == _predictions(b, xs, threads=threads)))


class _Workspace:
    """A temp folder with the pre-processed graph and the calibration ranges shared by all its quantisations
    (onnxruntime without ``calibration_cache_path`` calibrates on every call: same result, slower)."""

    def __init__(self, fp32: Path, calib: list[np.ndarray]) -> None:
        self.fp32, self.calib, self.count = fp32, calib, itertools.count()

    def __enter__(self) -> _Workspace:
        import onnx

        import_onnxruntime()  # one-line errors when onnxruntime is missing or installed twice
        from onnxruntime.quantization import quant_pre_process

        self._tmp = tempfile.TemporaryDirectory(prefix="compressor-int8-")
        self.folder = Path(self._tmp.name)
        self.pre = self.folder / "pre.onnx"
        try:
            quant_pre_process(str(self.fp32), str(self.pre))
            graph = onnx.load(str(self.pre), load_external_data=False).graph
        except Exception as exc:
            self._tmp.cleanup()
            raise ValidationError(f"onnxruntime cannot prepare {self.fp32} for quantisation: "
                                  f"{describe_error(exc)}") from exc
        self.input_name = next(i.name for i in graph.input if i.name not in {w.name for w in graph.initializer})
        self.nodes = [n.name for n in graph.node if n.op_type in QUANTISABLE_OPS]
        self.all_nodes = {n.name for n in graph.node}
        return self

    def __exit__(self, *exc: object) -> None:
        self._tmp.cleanup()

    def check_names(self, names: Sequence[str]) -> None:
        unknown = [n for n in names if n not in self.all_nodes]
        if unknown:
            raise InputError(f"no node named {', '.join(map(repr, unknown))} in {self.fp32}; its "
                             f"{'/'.join(QUANTISABLE_OPS)} nodes: {', '.join(self.nodes[:6])}"
                             f"{', ...' if len(self.nodes) > 6 else ''}")

    def quantize(self, fmt: Int8Format, *, exclude: Sequence[str] = (), only: Sequence[str] = ()) -> Path:
        """``quantize_static`` of the pre-processed graph into a new file of the workspace."""
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        out = self.folder / f"q{next(self.count)}.onnx"
        kwargs: dict[str, Any] = {}
        if "calibration_cache_path" in inspect.signature(quantize_static).parameters:
            kwargs["calibration_cache_path"] = self.folder / f"ranges-{fmt.calibration}.json"
        try:
            with contextlib.redirect_stdout(io.StringIO()):  # histogram calibrators print progress
                quantize_static(
                    str(self.pre), str(out), _reader(self.calib, self.input_name), quant_format=QuantFormat.QDQ,
                    per_channel=fmt.per_channel, activation_type=QuantType[_TYPES[fmt.activation]],
                    weight_type=QuantType[_TYPES[fmt.weight]], nodes_to_exclude=list(exclude),
                    nodes_to_quantize=list(only), calibrate_method=CalibrationMethod[_METHODS[fmt.calibration]],
                    extra_options={"CalibTensorRangeSymmetric": False}, **kwargs)
        except Exception as exc:
            raise ValidationError(f"onnxruntime cannot quantise {self.fp32} ({fmt.name}): "
                                  f"{describe_error(exc)}") from exc
        return out

    def quantize_float(self, fmt: Int8Format, exclude: Sequence[str]) -> tuple[Path, tuple[str, ...]]:
        """Quantise with ``exclude`` in float, widened until onnxruntime cannot re-quantise any of them.

        onnxruntime's ``WeightBiasQuantization`` transformer (session level 1) quantises, per tensor, the float
        weights of a Conv/Gemm whose input comes from a DequantizeLinear and whose output (through a Relu it fuses)
        goes to a QuantizeLinear, undoing ``nodes_to_exclude`` for a Conv between quantised ones (ResNet-20: logits
        differ by 0.59 with and without it). So the nodes that quantise an excluded node's output stay float too.
        """
        kept = list(dict.fromkeys(exclude))
        while True:  # ends: each round adds nodes of a finite graph, or returns
            path = self.quantize(fmt, exclude=kept)
            extra = [n for n in _requantised_by(path, kept) if n not in kept]
            if not extra:
                return path, tuple(kept)
            kept += extra

    def sensitivity(self, fmt: Int8Format, images: int) -> list[tuple[str, float]]:
        """Relative L2 error of the logits with only one node quantised, per node, most sensitive first."""
        subset = [np.concatenate(self.calib)[:images]]
        reference = np.concatenate(_logits(self.pre, subset))
        scores = []
        for node in self.nodes:
            path = self.quantize(fmt, only=(node,))
            error = np.linalg.norm(np.concatenate(_logits(path, subset)) - reference)
            scores.append((node, float(error / max(float(np.linalg.norm(reference)), 1e-12))))
            path.unlink()
        return sorted(scores, key=lambda item: -item[1])


def _requantised_by(path: Path, excluded: Sequence[str]) -> list[str]:
    """The nodes that quantise the output of an excluded Conv/Gemm whose input is dequantised: such a node sits
    between DequantizeLinear and QuantizeLinear (through a Relu/Clip onnxruntime fuses into the Q), the pattern
    ``WeightBiasQuantization`` re-quantises."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    producer = {out: node for node in graph.node for out in node.output}
    users: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            users.setdefault(name, []).append(node)
    found: list[str] = []
    for node in graph.node:
        parent = producer.get(node.input[0]) if node.input else None
        if node.name not in excluded or node.op_type not in ("Conv", "Gemm") or parent is None \
                or parent.op_type != "DequantizeLinear":
            continue
        frontier = list(users.get(node.output[0], []))
        while frontier:
            child = frontier.pop()
            if child.op_type in ("Relu", "Clip"):
                frontier += users.get(child.output[0], [])
            elif child.op_type == "QuantizeLinear":
                found += [c.name for d in users.get(child.output[0], []) for c in users.get(d.output[0], [])]
    return list(dict.fromkeys(found))


def _reader(batches: list[np.ndarray], input_name: str) -> Any:
    """A ``CalibrationDataReader`` yielding ``{input_name: batch}`` once per batch."""
    from onnxruntime.quantization import CalibrationDataReader

    class BatchReader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self.items, None)
            return None if batch is None else {input_name: batch}

    return BatchReader()


def _check_out(fp32: Path, out: str | Path) -> Path:
    out = Path(out)
    if out.exists() and out.resolve() == fp32.resolve():
        raise InputError(f"the INT8 output {out} is the fp32 input; choose another file name")
    if out.is_dir():
        raise InputError(f"{out} is a directory; give a file name such as {out / 'model.int8.onnx'}")
    return out


def quantize_int8(fp32: str | Path, out: str | Path, calib: Iterable[np.ndarray], *,
                  fmt: Int8Format = DEFAULT_FORMAT, exclude: Sequence[str] = ()) -> Path:
    """Quantise an fp32 ONNX graph (one float input) to INT8 QDQ in ``out``, calibrated on ``calib`` (float32 NCHW
    batches, normalised as the model expects); no accuracy check. ``quant_pre_process`` writes to a temp folder and
    the result is renamed into ``out`` when complete: the input is never modified, no partial ``out`` is left.

    ``exclude``: nodes to keep in float (e.g. from :func:`node_sensitivity`). onnxruntime's
    ``WeightBiasQuantization`` transformer quantises (per tensor, at session load) the float weights of a Conv/Gemm
    between a DequantizeLinear and a QuantizeLinear, so the nodes that quantise an excluded node's output stay float
    too. Raises :class:`InputError` (missing or non-ONNX file, bad batches, unknown node) or :class:`ValidationError`.

    >>> quantize_int8("original.onnx", "original.int8.onnx", calib_batches, fmt=Int8Format())  # doctest: +SKIP
    PosixPath('original.int8.onnx')
    """
    fp32 = _check_onnx(fp32)
    out = _check_out(fp32, out)
    batches = _check_batches(calib, "calibration data")
    with _Workspace(fp32, batches) as ws:
        ws.check_names(exclude)
        return atomic_save(functools.partial(shutil.copyfile, ws.quantize_float(fmt, exclude)[0]), out)


def node_sensitivity(fp32: str | Path, calib: Sequence[np.ndarray], *, fmt: Int8Format = DEFAULT_FORMAT,
                     images: int = SENSITIVITY_IMAGES) -> list[tuple[str, float]]:
    """How much quantising each Conv/Gemm/MatMul node *alone* perturbs the graph's output.

    Per node, ``quantize_static(..., nodes_to_quantize=[node])`` (its weights, inputs and output in INT8, the rest in
    float; ranges calibrated once on ``calib``); the score is the relative error of the logits on the first
    ``images`` calibration images, :math:`\\lVert z_q - z \\rVert_2 / \\lVert z \\rVert_2`. Returns
    ``(node name, score)``, most sensitive first.

    >>> node_sensitivity("compressed.onnx", calib_batches)[:2]  # doctest: +SKIP
    [('node_Conv_374', 0.061), ('node_Gemm_500', 0.020)]
    """
    fp32 = _check_onnx(fp32)
    batches = _check_batches(calib, "calibration data")
    if isinstance(images, bool) or not isinstance(images, int) or images < 1:
        raise InputError(f"images must be a positive int; got {images!r}")
    with _Workspace(fp32, batches) as ws:
        return ws.sensitivity(fmt, images)


class _Verifier:
    """Reference predictions of the fp32 graph, and the drop of a quantised one against them."""

    def __init__(self, fp32: Path, calib: list[np.ndarray], eval_batches: Sequence[tuple[Any, Any]] | None,
                 fp32_accuracy: float | None) -> None:
        if eval_batches is None:
            self.inputs, self.labels = calib, None
        else:
            pairs = list(eval_batches)
            self.inputs = _check_batches((x for x, _ in pairs), "evaluation data")
            self.labels = np.concatenate([np.asarray(y).reshape(-1) for _, y in pairs])
        self.reference = _predictions(fp32, self.inputs)
        self.fp32_accuracy = None if self.labels is None else (
            float(np.mean(self.reference == self.labels)) if fp32_accuracy is None else float(fp32_accuracy))

    def measure(self, path: Path) -> dict[str, Any]:
        predicted = _predictions(path, self.inputs)
        agreed = float(np.mean(predicted == self.reference))
        if self.labels is None or self.fp32_accuracy is None:
            return {"accuracy": None, "agreement": agreed, "drop": round(1.0 - agreed, 9)}
        accuracy = float(np.mean(predicted == self.labels))
        return {"accuracy": accuracy, "agreement": agreed, "drop": round(self.fp32_accuracy - accuracy, 9)}


def _exclusion_counts(max_excluded: int, nodes: int) -> list[int]:
    """0, then 1, 2, 4, ... and finally the cap ``min(max_excluded, nodes)``."""
    cap = min(max_excluded, nodes)
    counts = [0] + [2**i for i in range(cap.bit_length()) if 2**i < cap]
    return counts + [cap] if cap > 0 else counts


def quantize_verified(fp32: str | Path, out: str | Path, *, calib: Sequence[np.ndarray],
                      eval_batches: Sequence[tuple[np.ndarray, np.ndarray]] | None,
                      fmt: Int8Format = DEFAULT_FORMAT, max_drop: float = 0.01, fp32_accuracy: float | None = None,
                      max_excluded: int = 8) -> Int8Result:
    """Quantise, check top-1, and keep the most sensitive nodes in float until the drop is within ``max_drop``.

    The drop is ``fp32_accuracy - int8_accuracy`` on ``eval_batches`` or, without them, ``1 - agreement`` with fp32
    top-1 on the calibration images. When it fails, the nodes are ranked once by :func:`node_sensitivity` and the
    1, 2, 4, ... (up to ``max_excluded``) most sensitive stay float; the first passing graph is written to ``out``.
    ``max_drop`` is a fraction in [0, 1) (0.01: one point of top-1); ``fp32_accuracy`` the fp32 top-1 on
    ``eval_batches`` when already measured (else measured on the fp32 graph); ``max_excluded`` the most sensitive
    nodes that may stay float (their consumers may too, see :func:`quantize_int8`; 0: none). Raises
    :class:`ValidationError` when still over ``max_drop``; nothing is written then.

    >>> r = quantize_verified("compressed.onnx", "compressed.int8.onnx", calib=calib_batches,
    ...                       eval_batches=eval_batches, fmt=Int8Format(), max_drop=0.01)  # doctest: +SKIP
    >>> r.excluded, [a["drop"] for a in r.attempts]  # doctest: +SKIP
    ((), [0.002])
    """
    start = time.perf_counter()
    fp32 = _check_onnx(fp32)
    out = _check_out(fp32, out)
    batches = _check_batches(calib, "calibration data")
    if isinstance(max_drop, bool) or not isinstance(max_drop, (int, float)) or not 0 <= max_drop < 1:
        raise InputError(f"max accuracy drop must be a fraction in [0, 1), e.g. 0.01 for 1 point; got {max_drop!r}")
    if isinstance(max_excluded, bool) or not isinstance(max_excluded, int) or max_excluded < 0:
        raise InputError(f"max_excluded must be an int >= 0; got {max_excluded!r}")
    verifier = _Verifier(fp32, batches, eval_batches, fp32_accuracy)
    attempts: list[dict[str, Any]] = []
    with _Workspace(fp32, batches) as ws:
        ranking: list[str] = []
        for count in _exclusion_counts(max_excluded, len(ws.nodes)):
            if count and not ranking:
                ranking = [name for name, _ in ws.sensitivity(fmt, SENSITIVITY_IMAGES)]
            path, excluded = ws.quantize_float(fmt, ranking[:count])
            measured = verifier.measure(path)
            attempts.append({"excluded": count, "float_nodes": list(excluded), **measured})
            if measured["drop"] <= max_drop + _EPS:
                atomic_save(functools.partial(shutil.copyfile, path), out)
                return Int8Result(out, fmt, measured["accuracy"], verifier.fp32_accuracy,
                                  measured["agreement"], excluded, attempts, time.perf_counter() - start)
    raise ValidationError(_failure_message(attempts[-1], ranking, max_drop, labelled=verifier.labels is not None))


def _failure_message(last: dict[str, Any], ranking: list[str], max_drop: float, *, labelled: bool) -> str:
    count = last["excluded"]
    kept = ", ".join(ranking[:min(count, 4)]) + (", ..." if count > 4 else "")
    what = "top-1 on the evaluation data" if labelled else "top-1 agreement with fp32 on the calibration images"
    tried = f"even with the {count} most sensitive nodes kept in float ({kept})" if count else \
        "and no node may stay float (max_excluded=0)"
    return (f"INT8 {what} drops {100 * last['drop']:.1f} points, more than the {100 * max_drop:.1f} allowed, {tried}; "
            "nothing was written: allow a larger drop (--max-accuracy-drop), calibrate on more or more typical images, "
            "or deploy fp32 (--quantize none)")


def choose_format(fp32: str | Path, calib: Sequence[np.ndarray], *, batch: int = 1, threads: int | None = None,
                  repeats: int = 30, base: Int8Format = DEFAULT_FORMAT) -> tuple[Int8Format, dict[str, Any]]:
    """Time U8 and S8 activations (S8 weights) with the fp32 graph, interleaved, by
    :func:`exporters.benchmark_latency` at ``batch`` on ``threads``, and return ``base`` with the faster (lower p50)
    activation type, and the measurements: ``batch``, ``threads``, ``p50_ms`` (per candidate and ``fp32``),
    ``speedup`` over fp32 per candidate, ``chosen``, ``onnxruntime_version``.

    >>> fmt, timing = choose_format("compressed.onnx", calib_batches, batch=1, threads=1)  # doctest: +SKIP
    >>> fmt.activation, timing["speedup"]  # doctest: +SKIP
    ('U8', {'U8': 2.03, 'S8': 0.8})
    """
    fp32 = _check_onnx(fp32)
    batches = _check_batches(calib, "calibration data")
    candidates = {act: replace(base, activation=act, weight="S8") for act in ACTIVATIONS}
    with _Workspace(fp32, batches) as ws:
        paths: dict[str, Path] = {"fp32": fp32, **{act: ws.quantize(f) for act, f in candidates.items()}}
        result = benchmark_latency(paths, batch_sizes=(batch,), threads=threads, repeats=repeats)
    p50 = {name: stats.p50_ms for name, stats in result.latency[batch].items()}
    chosen = min(candidates, key=lambda act: p50[act])
    return candidates[chosen], {
        "batch": batch, "threads": threads, "p50_ms": p50, "chosen": chosen,
        "speedup": {act: p50["fp32"] / p50[act] for act in candidates},
        "onnxruntime_version": result.onnxruntime_version,
    }
