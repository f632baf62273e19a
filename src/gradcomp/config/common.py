"""Shared config machinery: strict pydantic base, YAML loading, `--set` overrides.

Errors are turned into one `ConfigError` whose message names the file, the key
path and what is allowed, so a bad job file fails before any work starts.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gradcomp.errors import GradcompError

M = TypeVar("M", bound=BaseModel)


class ConfigError(GradcompError, ValueError):
    """A job file or override that cannot be used; the message says what and where."""


# A run's name is a directory under --runs-dir: one path component that cannot be '.', '..' or hidden
# (a job named '..' wrote its run outside --runs-dir).
RunName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=128)]


class StrictModel(BaseModel):
    """Base for every config model: unknown keys are errors, values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)


class TaskConfig(StrictModel):
    """Which task: a built-in name or a user `module:function`, with its keyword arguments.

    A job file may also write just the name (`task: digits-cnn`).
    """

    name: str = Field(
        "digits-mlp",
        description="a built-in task (`digits-mlp`, `digits-cnn`, `synthetic`, `lm`, `resnet`) or your "
        "`module:function`, which "
        "returns a `gradcomp.tasks.Task` or `(model_factory, train_set, test_set)`",
    )
    args: dict[str, Any] = Field(default_factory=dict, description="keyword arguments of the task function")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        return {"name": value} if isinstance(value, str) else value

    @field_validator("name")
    @classmethod
    def _known(cls, value: str) -> str:
        from gradcomp.tasks import task_names

        if value not in task_names() and ":" not in value:
            raise ValueError(f"unknown task {value!r}: use one of {task_names()} or a 'module:function' entry point")
        return value


def compression_spec(value: Any) -> str:
    """Normalise a compression spec (string or YAML list of stages) and check it builds.

    Used as a pydantic `BeforeValidator`, so a wrong spec fails at load time with the
    compression library's own message (unknown stage, bad argument, unsound order).
    """
    from gradcomp.compression import SpecError, parse_spec

    if value is None:
        return "none"
    try:
        stages = parse_spec(value)
    except SpecError as err:
        raise ValueError(str(err)) from err
    return " | ".join(stage.to_spec() for stage in stages)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping, with an error naming the file when it is missing or malformed."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such job file")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: not valid YAML: {err}") from err
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    """`data['a']['b'] = value` for key 'a.b', creating sections; never replaces a value by a section."""
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"empty key {key!r}")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"key {key!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = copy.deepcopy(value)


def apply_overrides(data: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """Apply `key.sub=value` overrides (values parsed as YAML) to a copy of `data`."""
    out = copy.deepcopy(data)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set train.epochs=3")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            raise ConfigError(f"--set {item!r}: value is not valid YAML: {err}") from err
        try:
            set_dotted(out, key, value)
        except ConfigError as err:
            raise ConfigError(f"--set {item!r}: {err}") from None
    return out


def format_validation_error(source: str, err: ValidationError) -> str:
    """One line per problem: `source: key.path: message (got value)`."""
    lines = [f"{source}: invalid job file"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        elif e["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")  # our own validators already say what is wrong
        got = e.get("input")
        shown = "" if e["type"] in ("missing",) or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  {loc}: {msg}{shown}")
    return "\n".join(lines)


def validate(model: type[M], data: dict[str, Any], source: str = "job") -> M:
    """Validate `data` against `model`, raising `ConfigError` with every problem listed."""
    try:
        return model.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(source, err)) from None


def load_job(model: type[M], path: str | Path, overrides: list[str] | None = None) -> M:
    """Load, override and validate a job file in one step."""
    data = apply_overrides(load_yaml(path), overrides)
    return validate(model, data, source=str(path))
