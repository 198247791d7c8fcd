"""Typed method options: one dataclass per method, one place that validates them and names their flags.

A method declares its options as a frozen dataclass whose fields are made with :func:`option`::

    @dataclass(frozen=True)
    class CMIOptions:
        alpha: float = option(2.0, help="Renyi entropy order", example="1.01", low=0.0, low_open=True)
        condition: str = option("layer", help="conditioning set", choices=("layer", "full", "compact"))

:func:`parse_options` turns user values (API keywords or CLI flags; ``None`` means "not given") into an instance,
raising one :class:`~compressor.errors.InputError` line that names the flag (``--cmi-alpha``) on bad input. The CLI
builds its ``--<method>-<option>`` flags from the same fields (:func:`describe`), so an option is added in one place.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .errors import InputError


def option(default: Any, *, help: str, example: str | None = None, choices: Sequence[str] = (),
           low: float | None = None, high: float | None = None, low_open: bool = False,
           high_open: bool = False) -> Any:
    """A dataclass field carrying the option's help, an example value, allowed ``choices`` and numeric bounds.

    ``low``/``high`` are inclusive unless ``low_open``/``high_open``. Example: ``option(0.1, help="truncation
    tolerance", example="0.2", low=0, high=1, low_open=True, high_open=True)``.
    """
    meta = {"help": help, "example": example, "choices": tuple(choices), "low": low, "high": high,
            "low_open": low_open, "high_open": high_open}
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class OptionSpec:
    """One option as the CLI and ``compress methods`` show it."""

    name: str
    flag: str
    kind: str  # "bool", "int", "float", "str", "float|str"
    default: Any
    help: str
    example: str | None
    choices: tuple[str, ...]
    optional: bool  # None is a meaningful value (e.g. "searched")

    def describe(self) -> str:
        """The help line: text, choices, example and default."""
        parts = [self.help.rstrip(".")]
        if self.choices:
            parts.append(f"one of {', '.join(self.choices)}")
        text = "; ".join(parts) + "."
        if self.example is not None:
            text += f" E.g. {self.flag} {self.example}" if self.kind != "bool" else f" E.g. {self.flag}"
        default = "unset" if self.default is None else self.default
        return f"{text} [default: {default}]"


def _kind(annotation: Any) -> tuple[str, bool]:
    """``("float", optional?)`` for ``float``, ``float | None``; ``"float|str"`` for ``float | str``."""
    args = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else ()
    members = [a for a in args if a is not type(None)] if args else [annotation]
    names = sorted(m.__name__ for m in members)
    kind = "float|str" if names == ["float", "str"] else names[0]
    return kind, type(None) in args


def specs(options_cls: type, prefix: str) -> list[OptionSpec]:
    """The :class:`OptionSpec` of every field of ``options_cls``; flags are ``--<prefix>-<field>``."""
    hints = typing.get_type_hints(options_cls)
    out = []
    for f in dataclasses.fields(options_cls):
        kind, optional = _kind(hints[f.name])
        out.append(OptionSpec(f.name, f"--{prefix}-{f.name.replace('_', '-')}", kind, f.default,
                              f.metadata.get("help", ""), f.metadata.get("example"),
                              tuple(f.metadata.get("choices", ())), optional))
    return out


def _number(value: Any, spec: OptionSpec, integer: bool) -> float | int:
    hint = "an integer" if integer else "a number"
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{spec.flag} must be {hint}; got {value!r}") from None
    if isinstance(value, bool) or not math.isfinite(number) or (integer and number != int(number)):
        raise InputError(f"{spec.flag} must be {hint}; got {value!r}")
    return int(number) if integer else number


def _check_bounds(number: float, spec: OptionSpec, meta: Mapping[str, Any]) -> None:
    low, high = meta.get("low"), meta.get("high")
    too_low = low is not None and (number <= low if meta.get("low_open") else number < low)
    too_high = high is not None and (number >= high if meta.get("high_open") else number > high)
    if too_low or too_high:
        left = "(" if meta.get("low_open") else "["
        right = ")" if meta.get("high_open") else "]"
        span = f"{left}{'-inf' if low is None else f'{low:g}'}, {'inf' if high is None else f'{high:g}'}{right}"
        raise InputError(f"{spec.flag} must be in {span}; got {number:g}")


def _coerce(value: Any, spec: OptionSpec, meta: Mapping[str, Any]) -> Any:
    """The value of one option, checked against its kind, choices and bounds."""
    if value is None and spec.optional:
        return None
    if spec.kind == "bool":
        if not isinstance(value, bool):
            raise InputError(f"{spec.flag} must be true or false; got {value!r}")
        return value
    if spec.kind == "str" or (spec.kind == "float|str" and value in spec.choices):
        if spec.choices and value not in spec.choices:
            raise InputError(f"{spec.flag} must be one of {', '.join(spec.choices)}; got {value!r}")
        return str(value)
    number = _number(value, spec, spec.kind == "int")
    _check_bounds(number, spec, meta)
    return number


def parse_options(options_cls: type, prefix: str, values: Mapping[str, Any]) -> Any:
    """An ``options_cls`` instance from ``values`` keyed by field name; ``None`` values take the default.

    >>> from compressor.methods.tucker import TuckerOptions  # doctest: +SKIP
    >>> parse_options(TuckerOptions, "tucker", {"tau": 0.2}).tau  # doctest: +SKIP
    0.2
    """
    fields = {f.name: f for f in dataclasses.fields(options_cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        flags = [f"--{prefix}-{n.replace('_', '-')}" for n in fields]
        bad = f"--{prefix}-{unknown[0].replace('_', '-')}"
        close = difflib.get_close_matches(bad, flags, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise InputError(f"unknown {prefix} option {bad}{hint}; known: {', '.join(flags) or 'none'}")
    given = {}
    for spec in specs(options_cls, prefix):
        if values.get(spec.name) is not None or (spec.name in values and spec.optional):
            given[spec.name] = _coerce(values[spec.name], spec, fields[spec.name].metadata)
    return options_cls(**given)


def split_prefixed(values: Mapping[str, Any], prefixes: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``{"cmi_alpha": 2, "tucker_tau": .1}`` -> ``{"cmi": {"alpha": 2}, "tucker": {"tau": .1}}`` for ``prefixes``.

    A key whose prefix is not in ``prefixes`` is an error naming the method it belongs to.
    """
    out: dict[str, dict[str, Any]] = {p: {} for p in prefixes}
    for key, value in values.items():
        owner = next((p for p in sorted(prefixes, key=len, reverse=True) if key.startswith(f"{p}_")), None)
        if owner is None:
            flag, other = "--" + key.replace("_", "-"), key.split("_", 1)[0]
            methods = "+".join(p for p in prefixes if p != "chain")
            raise InputError(f"option {flag} applies to --method {other}, not to --method {methods}")
        out[owner][key[len(owner) + 1:]] = value
    return out
