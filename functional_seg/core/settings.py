"""Configs as the one source of settings: a dataclass field declares its default, help and parsing
once, and command-line flags are generated from it.

    @dataclass(frozen=True)
    class FitConfig:
        epochs: int = setting(2, help="passes over the training split")
        ...

    add_arguments(parser, FitConfig)        # --epochs N (default: 2), ... one flag per field
    config = from_arguments(FitConfig, ns)  # FitConfig(**the flags the user gave); the rest default

A flag the user did not give is absent from the namespace (``argparse.SUPPRESS``), so the
dataclass default is the only default there is; ``--help`` prints it from the field. A nested
dataclass field (``FitConfig.optimizer``) contributes its own fields' flags, unprefixed. A config
refuses a bad value in ``__post_init__`` with :func:`invalid`, which names the field; the CLI turns
the field into its flag (``--lr: must be a positive number, got -0.001``).

Standard library only: configs of every layer use it.
"""

from __future__ import annotations

import argparse
import builtins
import dataclasses
import sys
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["setting", "add_arguments", "from_arguments", "flag_of", "SettingError", "invalid", "parse_bool_or_auto",
           "parse_optional_bool", "parse_kv", "parse_value"]

_MISSING = dataclasses.MISSING


class SettingError(ValueError):
    """A setting with a bad value: ``field`` names it, the message says what was expected."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def invalid(field: str, message: str) -> SettingError:
    """The error a config raises for one bad field (``raise invalid("lr", "must be positive, got 0")``)."""
    return SettingError(field, message)


def flag_of(field: str) -> str:
    """``batch_size`` -> ``--batch-size``: the flag a field becomes."""
    return "--" + field.replace("_", "-")


def setting(default: Any = _MISSING, *, help: str, default_factory: Callable[[], Any] | Any = _MISSING,
            choices: tuple | None = None, parse: Callable[[str], Any] | None = None, metavar: str | None = None,
            nargs: str | None = None, flag: str | None = None, cli: bool = True) -> Any:
    """A dataclass field that knows its flag.

    Args:
        default / default_factory: as ``dataclasses.field``.
        help: one sentence for ``--help`` (the default is appended).
        choices: allowed values (shown in ``--help`` and checked by argparse).
        parse: str -> value for the flag (default: from the field's type: int, float, str).
        nargs, metavar: as argparse's.
        flag: the flag's name when it is not ``--field-name``.
        cli: False: a setting with no flag (filled in by code, e.g. ``total_steps``).
    """
    meta = {"help": help, "choices": choices, "parse": parse, "metavar": metavar, "nargs": nargs, "flag": flag,
            "cli": cli}
    if default_factory is not _MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


# ----------------------------------------------------------------------------------------------
# Small parsers for flag values


def parse_value(text: str) -> Any:
    """'3' -> 3, '0.5' -> 0.5, 'true' -> True, 'none' -> None, '8,16,32' -> (8, 16, 32), else str."""
    if "," in text:
        return tuple(parse_value(part) for part in text.split(",") if part != "")
    low = text.lower()
    if low in ("true", "yes"):
        return True
    if low in ("false", "no"):
        return False
    if low in ("none", "null"):
        return None
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def parse_kv(items: list[str] | str | None, what: str = "setting") -> dict[str, Any]:
    """``["a=1", "b=x,y"]`` -> ``{"a": 1, "b": ("x", "y")}`` (dashes in keys become underscores)."""
    out: dict[str, Any] = {}
    for item in [items] if isinstance(items, str) else items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{what} expects key=value, got {item!r}")
        out[key.strip().replace("-", "_")] = parse_value(value.strip())
    return out


def parse_bool_or_auto(value: str) -> bool | str:
    """'auto' -> "auto"; on/true/yes/1 -> True; off/false/no/0 -> False."""
    low = str(value).lower()
    if low == "auto":
        return "auto"
    if low in ("on", "true", "yes", "1"):
        return True
    if low in ("off", "false", "no", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected auto, on or off, got {value!r}")


def parse_optional_bool(value: str) -> bool | None:
    """'auto' -> None (decided later); on/off as :func:`parse_bool_or_auto`."""
    out = parse_bool_or_auto(value)
    return None if out == "auto" else out


# ----------------------------------------------------------------------------------------------
# Flags from fields and back


class _Unknown(dict):
    """A namespace where names imported only for type checkers read as ``object`` (no flag type)."""

    def __missing__(self, key):
        return object


def _hints(cls) -> dict[str, Any]:
    """Field types, resolved without importing what a module imports only for type checkers."""
    module = sys.modules.get(cls.__module__)
    namespace = _Unknown({**vars(builtins), **(vars(module) if module else {})})
    return {f.name: eval(f.type, {}, namespace) if isinstance(f.type, str) else f.type  # noqa: S307
            for f in dataclasses.fields(cls)}


def _nested(tp) -> type | None:
    """The dataclass a field holds (``OptimizerConfig``, ``OptimizerConfig | None``), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        found = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        return found[0] if found else None
    return None


def _scalar_parser(tp) -> Callable[[str], Any]:
    """int, float or str from a field type such as ``int``, ``float | None``."""
    args = typing.get_args(tp) if (isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union) else (tp,)
    for candidate in (int, float):
        if candidate in args:
            return candidate
    return str


def _default_text(f: dataclasses.Field) -> str | None:
    if f.default is not _MISSING:
        value = f.default
    elif f.default_factory is not _MISSING:
        value = f.default_factory()
    else:
        return None
    if value is None or value is False or value == {} or value == ():
        return None
    if value is True:
        return "on"
    return str(value)


def _fields(cls):
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        yield f, hints[f.name]


def add_arguments(parser, cls, *, only: tuple[str, ...] | None = None, skip: tuple[str, ...] = (),
                  _path: str = "") -> None:
    """One flag per field of ``cls`` (and of its nested dataclass fields) on ``parser``.

    Args:
        only: just these fields (by name); skip: all but these.
    """
    for f, tp in _fields(cls):
        meta = f.metadata
        if f.name in skip or (only is not None and f.name not in only and not _nested(tp)):
            continue
        if not meta.get("cli", False):
            continue
        dest = f"{_path}{f.name}"
        inner = _nested(tp)
        if inner is not None:
            add_arguments(parser, inner, only=only, skip=skip, _path=f"{dest}__")
            continue
        help_text = meta["help"]
        shown = _default_text(f)
        if shown is not None and "default" not in help_text:
            help_text = f"{help_text} (default: {shown})".replace("%", "%%")
        kwargs: dict[str, Any] = {"dest": dest, "default": argparse.SUPPRESS, "help": help_text}
        if tp is bool and f.default is False and meta.get("parse") is None:
            parser.add_argument(meta.get("flag") or flag_of(f.name), action="store_true", **kwargs)
            continue
        kwargs["type"] = meta.get("parse") or _scalar_parser(tp)
        if meta.get("choices") is None:
            kwargs["metavar"] = f.name.upper()
        for key in ("choices", "metavar", "nargs"):
            if meta.get(key) is not None:
                kwargs[key] = meta[key]
        parser.add_argument(meta.get("flag") or flag_of(f.name), **kwargs)


def given(namespace: argparse.Namespace | Mapping, cls, _path: str = "") -> dict[str, Any]:
    """The values the user gave for ``cls``'s fields, nested configs as dicts of theirs."""
    values = vars(namespace) if isinstance(namespace, argparse.Namespace) else dict(namespace)
    out: dict[str, Any] = {}
    for f, tp in _fields(cls):
        dest = f"{_path}{f.name}"
        inner = _nested(tp)
        if inner is not None:
            sub = given(values, inner, f"{dest}__")
            if sub:
                out[f.name] = sub
        elif dest in values:
            out[f.name] = values[dest]
    return out


def from_arguments(cls, namespace: argparse.Namespace | Mapping, **overrides):
    """``cls`` built from the flags the user gave (the rest keep their dataclass defaults)."""
    return build(cls, {**given(namespace, cls), **overrides})


def build(cls, values: Mapping[str, Any]):
    """``cls(**values)`` with nested dataclass fields given as dicts built first."""
    kwargs = {}
    for f, tp in _fields(cls):
        if f.name not in values:
            continue
        inner = _nested(tp)
        value = values[f.name]
        kwargs[f.name] = build(inner, value) if inner is not None and isinstance(value, Mapping) else value
    return cls(**kwargs)
