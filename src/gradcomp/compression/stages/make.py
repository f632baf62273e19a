"""A stage from its spec name and arguments: types coerced, errors naming stage and argument."""

from __future__ import annotations

import dataclasses
from typing import Any

from gradcomp.compression.spec import SpecError
from gradcomp.compression.stages.base import STAGES, Stage

_TYPES = {float: float, int: int, str: str, bool: bool, "float": float, "int": int, "str": str, "bool": bool}
_BOOL_WORDS = {"true": True, "yes": True, "false": False, "no": False}


def _coerce(stage: str, arg: str, want: type, value: Any) -> Any:
    """A spec value as the argument's type, or a SpecError naming stage and argument."""
    if want is bool:
        value = _BOOL_WORDS.get(value.lower(), value) if isinstance(value, str) else value
        if not isinstance(value, bool):
            raise SpecError(f"stage {stage!r}: argument {arg!r} must be true or false, got {value!r}")
        return value
    if want is str:
        if not isinstance(value, str):
            raise SpecError(f"stage {stage!r}: argument {arg!r} must be text, got {value!r}")
        return value
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SpecError(f"stage {stage!r}: argument {arg!r} must be a number, got {value!r}")
    if want is int and float(value) != int(value):
        raise SpecError(f"stage {stage!r}: argument {arg!r} must be an integer, got {value!r}")
    return want(value)


def make_stage(name: str, args: list[Any], kwargs: dict[str, Any]) -> Stage:
    """Instantiate and validate one stage, with errors naming the stage and argument."""
    cls = STAGES.get(name)
    if cls is None:
        raise SpecError(f"unknown stage {name!r}; known stages: {', '.join(sorted(STAGES))}")
    fields = list(dataclasses.fields(cls))  # type: ignore[arg-type]  # every registered stage is a dataclass
    names = [f.name for f in fields]
    if len(args) > len(names):
        raise SpecError(
            f"stage {name!r} takes {len(names)} argument(s) ({', '.join(names) or 'none'}), got {len(args)} positional"
        )
    given = dict(zip(names, args, strict=False))
    for key, value in kwargs.items():
        if key not in names:
            takes = ", ".join(names) if names else "no arguments"
            raise SpecError(f"stage {name!r} has no argument {key!r}; it takes: {takes}")
        if key in given:
            raise SpecError(f"stage {name!r}: argument {key!r} given twice")
        given[key] = value
    for f in fields:
        if f.name not in given:
            if f.default is dataclasses.MISSING:
                raise SpecError(f"stage {name!r}: missing argument {f.name!r}")
            continue
        given[f.name] = _coerce(name, f.name, _TYPES[f.type], given[f.name])
    stage = cls(**given)
    stage.check()
    return stage
