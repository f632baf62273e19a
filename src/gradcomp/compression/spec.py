"""Parsing of compression specs: `"dp(clip=1.0, sigma=0.8) | rtopk(ratio=0.01, r=0.05) | ef"`.

Also accepts the YAML-list form of job files: a list whose items are stage strings
(`"topk(ratio=0.01)"`), bare names (`"ef"`) or one-key mappings (`{topk: {ratio: 0.01}}`).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Mapping, Sequence
from typing import Any

from gradcomp.errors import GradcompError

_STAGE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:\((.*)\))?\s*$", re.S)


class SpecError(GradcompError, ValueError):
    """A compression spec that cannot be built; the message names the stage and argument."""


class PrivacyOrderError(SpecError):
    """Stages in an order that would void the privacy guarantee the spec claims."""


def _literal(text: str, where: str) -> Any:
    text = text.strip()
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_\-]*", text):
            return text  # bare word, e.g. mechanism=laplace
        raise SpecError(f"{where}: cannot read value {text!r}") from None


def _split_args(body: str, name: str) -> tuple[list[Any], dict[str, Any]]:
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    if not body.strip():
        return args, kwargs
    for part in body.split(","):
        if not part.strip():
            raise SpecError(f"stage {name!r}: empty argument in ({body})")
        if "=" in part:
            key, value = part.split("=", 1)
            key = key.strip()
            if not key.isidentifier():
                raise SpecError(f"stage {name!r}: bad argument name {key!r}")
            if key in kwargs:
                raise SpecError(f"stage {name!r}: argument {key!r} given twice")
            kwargs[key] = _literal(value, f"stage {name!r}, argument {key!r}")
        else:
            if kwargs:
                raise SpecError(f"stage {name!r}: positional argument after keyword arguments")
            args.append(_literal(part, f"stage {name!r}"))
    return args, kwargs


def split_stages(spec: str | Sequence[Any] | None) -> list[tuple[str, list[Any], dict[str, Any]]]:
    """Spec (string or list form) -> [(name, positional args, keyword args)], nothing validated."""
    if spec is None:
        return [("none", [], {})]
    if isinstance(spec, str):
        items: list[Any] = [s for s in spec.split("|")]
        if not spec.strip():
            raise SpecError("empty compression spec; use 'none' for no compression")
    elif isinstance(spec, Sequence):
        items = list(spec)
        if not items:
            raise SpecError("empty compression spec list; use [none] for no compression")
    else:
        raise SpecError(f"compression spec must be a string or a list of stages, got {type(spec).__name__}")
    out: list[tuple[str, list[Any], dict[str, Any]]] = []
    for item in items:
        if isinstance(item, Mapping):
            if len(item) != 1:
                raise SpecError(f"stage mapping must have exactly one key (the stage name), got {dict(item)}")
            ((name, kwargs),) = item.items()
            if kwargs is None:
                kwargs = {}
            if not isinstance(kwargs, Mapping):
                raise SpecError(f"stage {name!r}: arguments must be a mapping, got {kwargs!r}")
            out.append((str(name), [], dict(kwargs)))
            continue
        if not isinstance(item, str):
            raise SpecError(f"stage must be a string or a one-key mapping, got {item!r}")
        m = _STAGE.match(item)
        if not m:
            raise SpecError(f"cannot parse stage {item.strip()!r}; expected name(arg=value, ...)")
        name, body = m.group(1), m.group(2) or ""
        args, kwargs = _split_args(body, name)
        out.append((name, args, kwargs))
    return out
