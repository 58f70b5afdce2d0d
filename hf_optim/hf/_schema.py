"""Typed ``optim_args`` for every registered optimizer, derived from its constructor.

transformers hands a handler ``optim_args`` as a dict of *strings* (``"c_min=0.05,betas=0.9:0.999"``
split on ``,`` and ``=``). This module turns those strings into constructor arguments, using
the class signature (annotations and defaults) as the single source of truth: no hand-written
copy of five argument lists that could drift from the classes.

Syntax: ``key=value`` pairs separated by ``,``; booleans ``true/false/1/0/yes/no``; ``none``
for ``None``; tuples with ``:`` (``betas=0.9:0.999``), because ``,`` already separates pairs.

Besides constructor arguments, two *glue options* are understood by the Hugging Face layer and
never reach the constructor (see :data:`GLUE_OPTIONS`).

This module imports only the standard library and torch.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .._registry import OptimizerInfo, get_optimizer_info

__all__ = [
    "ArgumentSpec",
    "GLUE_OPTIONS",
    "OptimArgsError",
    "argument_specs",
    "parse_optim_args",
    "split_optim_args",
]

#: Options read by the Hugging Face glue itself (not constructor arguments):
#: ``schedule_owner``: ``optimizer`` (default: the optimizer's own warm-up/cosine/window drives
#: the learning rate and the Trainer's scheduler is made constant) or ``trainer`` (the
#: optimizer's own schedule is switched off and the Trainer's scheduler drives); only for
#: optimizers that own a schedule. ``save_averaged``: ``Trainer.save_model`` writes the averaged
#: weights (AMaC's SWA/Lookahead), and every checkpoint gets an ``averaged/`` copy.
GLUE_OPTIONS: dict[str, tuple[str, ...] | type] = {
    "schedule_owner": ("optimizer", "trainer"),
    "save_averaged": bool,
}

#: Constructor arguments the glue never takes from ``optim_args``: ``params`` is built by the
#: Trainer; the rest are spelled differently on the command line.
_EXCLUDED = {"self", "params"}

_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off"}


class OptimArgsError(ValueError):
    """A bad ``optim_args`` key or value; the message names the valid keys."""


@dataclass(frozen=True)
class ArgumentSpec:
    """One constructor argument: its name, annotation (resolved where possible) and default."""

    name: str
    annotation: Any
    default: Any

    def describe(self) -> str:
        return f"{self.name}: {_type_name(self.annotation, self.default)} = {self.default!r}"

    def convert(self, text: str) -> Any:
        """Convert ``text`` to this argument's type; ``ValueError`` when it does not fit."""
        return _convert(text.strip(), self.annotation, self.default)


def _type_name(annotation: Any, default: Any) -> str:
    if annotation is inspect.Parameter.empty:
        return type(default).__name__ if default is not None else "any"
    if isinstance(annotation, type):
        return annotation.__name__
    return str(annotation).replace("typing.", "")


def _resolved_hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls.__init__)
    except Exception:  # noqa: BLE001 - unresolvable forward references: fall back to defaults
        return {}


def argument_specs(cls: type) -> dict[str, ArgumentSpec]:
    """Every keyword a user may set through ``optim_args``, from ``cls.__init__``."""
    hints = _resolved_hints(cls)
    specs: dict[str, ArgumentSpec] = {}
    for name, parameter in inspect.signature(cls.__init__).parameters.items():
        if name in _EXCLUDED or parameter.kind in (
            inspect.Parameter.VAR_POSITIONAL,
            inspect.Parameter.VAR_KEYWORD,
        ):
            continue
        annotation = hints.get(name, parameter.annotation)
        if isinstance(annotation, str):  # unresolved postponed annotation
            annotation = inspect.Parameter.empty
        default = None if parameter.default is inspect.Parameter.empty else parameter.default
        specs[name] = ArgumentSpec(name, annotation, default)
    return specs


def _union_members(annotation: Any) -> tuple[Any, ...] | None:
    origin = typing.get_origin(annotation)
    if origin is typing.Union or (
        hasattr(types, "UnionType") and isinstance(annotation, types.UnionType)
    ):
        return typing.get_args(annotation)
    return None


def _convert(text: str, annotation: Any, default: Any) -> Any:
    if annotation is inspect.Parameter.empty or annotation is Any:
        return _convert_by_example(text, default)
    members = _union_members(annotation)
    if members is not None:
        if type(None) in members and text.lower() == "none":
            return None
        errors = []
        # Try the narrowest types first so that "3" stays an int where an int is allowed.
        for member in sorted((m for m in members if m is not type(None)), key=_conversion_priority):
            try:
                return _convert(text, member, default)
            except ValueError as error:
                errors.append(str(error))
        raise ValueError("; ".join(errors) or f"cannot convert {text!r}")
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        choices = typing.get_args(annotation)
        for choice in choices:
            if text == str(choice) or (isinstance(choice, str) and text.lower() == choice.lower()):
                return choice
        raise ValueError(f"expected one of {list(choices)}, got {text!r}")
    if origin in (tuple, list) or annotation in (tuple, list):
        items = [item for item in text.split(":")] if text else []
        element_types = typing.get_args(annotation)
        if len(element_types) == 2 and element_types[1] is Ellipsis:
            converted = [_convert(item, element_types[0], None) for item in items]
        elif element_types:
            if len(items) != len(element_types):
                raise ValueError(
                    f"expected {len(element_types)} values separated by ':', got {text!r}"
                )
            converted = [_convert(i, t, None) for i, t in zip(items, element_types, strict=True)]
        else:
            example = default[0] if isinstance(default, (tuple, list)) and default else None
            converted = [_convert_by_example(item, example) for item in items]
        return tuple(converted) if (origin or annotation) is tuple else converted
    if annotation is bool:
        return _to_bool(text)
    if annotation is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"expected an integer, got {text!r}") from None
    if annotation is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"expected a number, got {text!r}") from None
    if annotation is str:
        return text
    if annotation is type(None):
        if text.lower() == "none":
            return None
        raise ValueError(f"expected none, got {text!r}")
    # Objects that cannot be written on a command line (process groups, generators, ...).
    raise ValueError(f"{_type_name(annotation, default)} cannot be given in optim_args")


def _conversion_priority(annotation: Any) -> int:
    order = {bool: 0, int: 1, float: 2}
    if annotation in order:
        return order[annotation]
    if typing.get_origin(annotation) is typing.Literal:
        return 3
    if typing.get_origin(annotation) in (tuple, list):
        return 4
    return 5 if annotation is not str else 6


def _to_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ValueError(f"expected a boolean (true/false), got {text!r}")


def _convert_by_example(text: str, example: Any) -> Any:
    """Without an annotation, follow the type of the default value."""
    if text.lower() == "none":
        return None
    if isinstance(example, bool):
        return _to_bool(text)
    if isinstance(example, int):
        # An unannotated ``0`` default (``weight_decay=0``) still takes ``0.01``.
        try:
            return int(text)
        except ValueError:
            return float(text)
    if isinstance(example, float):
        return float(text)
    if isinstance(example, (tuple, list)):
        items = text.split(":")
        if example and len(items) != len(example):
            raise ValueError(f"expected {len(example)} values separated by ':', got {text!r}")
        return tuple(
            _convert_by_example(item, example[i] if example else None)
            for i, item in enumerate(items)
        )
    if isinstance(example, str):
        return text
    for convert in (int, float):
        try:
            return convert(text)
        except ValueError:
            pass
    if text.lower() in _TRUE | _FALSE:
        return _to_bool(text)
    if ":" in text:
        return tuple(_convert_by_example(item, None) for item in text.split(":"))
    return text


def split_optim_args(text: str | Mapping[str, str] | None) -> dict[str, str]:
    """``"a=1, b=2:3"`` -> ``{"a": "1", "b": "2:3"}``, with a clear error for bad syntax."""
    if text is None or text == "":
        return {}
    if isinstance(text, Mapping):
        return {str(key).strip(): str(value).strip() for key, value in text.items()}
    pairs: dict[str, str] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or "=" in value:
            raise OptimArgsError(
                f"optim_args entry {item!r} is not of the form key=value "
                "(separate entries with ',' and tuple elements with ':', e.g. betas=0.9:0.999)"
            )
        pairs[key.strip()] = value.strip()
    return pairs


def _valid_keys_message(info: OptimizerInfo, specs: Mapping[str, ArgumentSpec]) -> str:
    lines = [spec.describe() for spec in specs.values()]
    glue = [
        f"{name}: {'|'.join(kind) if isinstance(kind, tuple) else kind.__name__}"
        for name, kind in GLUE_OPTIONS.items()
        if _glue_option_applies(info, name)
    ]
    return "valid keys for {}: {}".format(info.name, "; ".join(lines + glue))


def _glue_option_applies(info: OptimizerInfo, name: str) -> bool:
    if name == "schedule_owner":
        return info.owns_schedule
    if name == "save_averaged":
        return bool(getattr(info, "has_averaged_weights", False))
    return True


def parse_optim_args(
    name: str, text: str | Mapping[str, str] | None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Parse ``optim_args`` for optimizer ``name``.

    Returns ``(constructor_kwargs, glue_options)``. Raises :class:`OptimArgsError` naming the
    valid keys for an unknown key or a value of the wrong type.
    """
    info = get_optimizer_info(name)
    specs = argument_specs(info.load())
    kwargs: dict[str, Any] = {}
    glue: dict[str, Any] = {}
    for key, value in split_optim_args(text).items():
        if key in GLUE_OPTIONS and _glue_option_applies(info, key) and key not in specs:
            kind = GLUE_OPTIONS[key]
            if isinstance(kind, tuple):
                if value.lower() not in kind:
                    raise OptimArgsError(
                        f"optim_args {key}={value!r} for {name}: expected one of {list(kind)}"
                    )
                glue[key] = value.lower()
            else:
                try:
                    glue[key] = _to_bool(value)
                except ValueError as error:
                    raise OptimArgsError(
                        f"optim_args {key}={value!r} for {name}: {error}"
                    ) from None
            continue
        spec = specs.get(key)
        if spec is None:
            raise OptimArgsError(
                f"unknown optim_args key {key!r} for {name}; {_valid_keys_message(info, specs)}"
            )
        try:
            kwargs[key] = spec.convert(value)
        except ValueError as error:
            raise OptimArgsError(
                f"bad optim_args value {key}={value!r} for {name} ({error}); "
                f"{_valid_keys_message(info, specs)}"
            ) from None
    return kwargs, glue
