"""Click options generated from config dataclasses, so the CLI, TOML files and defaults share one source."""

from __future__ import annotations

import dataclasses
import math
import types
import difflib
import typing
from collections.abc import Callable

import click

from runtime.errors import MapbuildError


def require(*checks: tuple[bool, str]) -> None:
    """Raise the message of the first failed (condition, message) check: config validation in `__post_init__`."""
    for ok, message in checks:
        if not ok:
            raise MapbuildError(message)


def check_finite(config: object) -> None:
    """Every number setting of a config dataclass finite: click and TOML both read inf and nan as numbers, and
    `--epochs inf` reached the Trainer (OverflowError) while `nan` failed every comparison of its checks."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            raise MapbuildError(f"--{f.name.replace('_', '-')} must be a finite number, got {value}")


def one_of(value: object, choices: typing.Iterable, name: str) -> None:
    """The one check of every choice setting: a one-line error naming it and its choices."""
    choices = list(choices)
    if value not in choices:
        raise MapbuildError(f"{name} must be one of {', '.join(map(str, choices))}, got {value!r}")


def did_you_mean(word: str, choices: typing.Iterable[str]) -> str:
    """' (did you mean sample?)' for a near miss among `choices` (difflib's ratio at least 0.6), else ''."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def known_keys(given: typing.Iterable[str], allowed: typing.Iterable[str], where: str) -> None:
    """A one-line error naming the first unknown key of a TOML table, and the key it most likely meant."""
    allowed = set(allowed)
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise MapbuildError(f"{where}: unknown key {', '.join(unknown)}{did_you_mean(unknown[0], allowed)}")


NAMES = {int: "an integer", float: "a number", str: "a string", bool: "true or false", list: "a list"}


def _base_type(tp: object) -> type:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union else tp  # type: ignore[return-value]


def config_options(cls: type, skip: tuple[str, ...] = (), required: tuple[str, ...] = ()) -> Callable:
    """Add one `--flag` per dataclass field, with the field's help string and default; `required` ones have none."""
    hints = typing.get_type_hints(cls)

    def decorate(fn: Callable) -> Callable:
        for f in reversed(dataclasses.fields(cls)):
            if f.name in skip:
                continue
            flag = "--" + f.name.replace("_", "-")
            tp = _base_type(hints[f.name])
            decls = [f"{flag}/--no-{flag[2:]}"] if tp is bool else [flag]
            # recent click takes an explicit default=None as a value that satisfies `required`: leave it out
            extra = {"required": True} if f.name in required else {"default": f.default, "show_default": f.default is not None}
            fn = click.option(*decls, f.name, type=tp, help=f.metadata["help"], **extra)(fn)
        return fn

    return decorate


def check_types(cls: type, values: dict, where: str) -> None:
    """A one-line error naming the first key whose TOML value does not have its field's type (ints pass as floats)."""
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        tp = hints.get(key)
        if tp is None:
            continue
        optional = type(None) in typing.get_args(tp)
        base = typing.get_origin(_base_type(tp)) or _base_type(tp)
        if value is None and optional:
            continue
        ok = isinstance(value, base) and not (base is int and isinstance(value, bool))
        ok = ok or (base is float and isinstance(value, int) and not isinstance(value, bool))
        if base is list and ok:
            item = typing.get_args(_base_type(tp))
            ok = not item or all(isinstance(v, item[0]) for v in value)
        if not ok:
            raise MapbuildError(f"{where}: {key} must be {NAMES.get(base, base.__name__)}, got {value!r}")
