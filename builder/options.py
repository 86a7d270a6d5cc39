"""Click options generated from config dataclasses, so the CLI, TOML files and defaults share one source."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Callable

import click


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
