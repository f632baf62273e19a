"""Render the job-key and metric references of docs/ from the code, so they cannot drift from it.

The pydantic job models (`config.train.TrainJob`, `config.fed.FedJob`, each strategy's `Config`,
`config.sweep.SweepJob`) and every metric in `gradcomp.metrics` are written as Markdown tables into
marked regions of docs/jobs.md and docs/metrics.md:

    <!-- BEGIN GENERATED: NAME (make docs) -->
    ...
    <!-- END GENERATED: NAME -->

Everything outside the markers is hand-written and left alone.

    python tools/docgen.py           # rewrite the regions (what `make docs` runs)
    python tools/docgen.py --check   # exit 1, naming the stale regions, when a rewrite would change them
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import types
import typing
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import annotated_types as at
from pydantic import BaseModel, BeforeValidator
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

ROOT = Path(__file__).resolve().parents[1]
COMMAND = "make docs (or: python tools/docgen.py)"


# --- job models ---------------------------------------------------------------------------------


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _strip(tp: Any) -> Any:
    """The type under Annotated[...] wrappers."""
    while typing.get_origin(tp) is typing.Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _union_args(tp: Any) -> tuple[Any, ...]:
    tp = _strip(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return tuple(_strip(a) for a in typing.get_args(tp))
    return (tp,)


def type_text(tp: Any) -> str:
    """A reader's name for a field type: `one of a, b`, `float or null`, `list of int`, `section`."""
    tp = _strip(tp)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "null"
    if tp is Any:
        return "any"
    if origin is typing.Literal:
        return "one of " + ", ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        parts = [type_text(a) for a in args if a is not type(None)]
        return " or ".join(parts + (["null"] if type(None) in args else []))
    if origin is list:
        return "list of entries" if _is_model(_strip(args[0])) else f"list of {type_text(args[0])}"
    if origin is dict:
        return f"mapping of {type_text(args[0])} to {type_text(args[1])}"
    if origin is tuple:
        return "[" + ", ".join(type_text(a) for a in args) + "]"
    if _is_model(tp):
        return "section"
    if isinstance(tp, type) and issubclass(tp, Path):
        return "path"
    return getattr(tp, "__name__", str(tp))


_BOUNDS: tuple[tuple[type, str, str], ...] = (
    (at.Gt, "gt", "> {}"),
    (at.Ge, "ge", ">= {}"),
    (at.Lt, "lt", "< {}"),
    (at.Le, "le", "<= {}"),
    (at.MinLen, "min_length", "length >= {}"),
    (at.MaxLen, "max_length", "length <= {}"),
)


def constraints(info: FieldInfo) -> list[str]:
    """The bounds pydantic enforces on a field (`> 0`, `<= 1`, ...), and a spec field's parsing."""
    out = []
    for meta in info.metadata:
        for kind, attr, text in _BOUNDS:
            if isinstance(meta, kind):
                out.append(text.format(getattr(meta, attr)))
        if getattr(meta, "pattern", None):
            out.append(f"matching `{meta.pattern}`")
        if isinstance(meta, BeforeValidator) and getattr(meta.func, "__name__", "") == "compression_spec":
            out.append("a compression spec (string or YAML list)")
    return out


def default_text(info: FieldInfo) -> str:
    if info.default_factory is not None:
        value = info.default_factory()  # type: ignore[call-arg]  # pydantic's factories here take no argument
    elif info.default is PydanticUndefined:
        return "required"
    else:
        value = info.default
    if isinstance(value, BaseModel):
        return "" if not _union_args(info.annotation)[1:] else f"`{_discriminator(value)}`"
    if isinstance(value, list) and value and isinstance(value[0], BaseModel):
        value = [v.model_dump(mode="json") for v in value]
    if isinstance(value, Path):
        value = str(value)
    if isinstance(value, tuple):
        value = list(value)
    return f"`{json.dumps(value)}`" if not isinstance(value, str) else f"`{value}`"


def _discriminator(model: BaseModel) -> str:
    return str(getattr(model, "name", type(model).__name__))


def key_rows(model: type[BaseModel], prefix: str = "") -> Iterator[list[str]]:
    """One row per job key (dotted), depth first: a section's keys follow the section."""
    for name, info in model.model_fields.items():
        key = f"{prefix}{name}"
        members = [a for a in _union_args(info.annotation) if a is not type(None)]
        shape = typing.get_origin(_strip(info.annotation))
        item = _strip(typing.get_args(_strip(info.annotation))[0]) if shape is list else None
        if len(members) > 1 and all(_is_model(m) for m in members):  # a discriminated union (strategy:)
            yield [f"`{key}`", "one of the sections below, by `name`", default_text(info), info.description or ""]
        elif len(members) == 1 and _is_model(members[0]):
            yield [f"`{key}`", type_text(info.annotation), default_text(info), _describe(info, members[0])]
            yield from key_rows(members[0], f"{key}.")
        elif item is not None and _is_model(item):
            yield [f"`{key}`", type_text(info.annotation), default_text(info), _describe(info, item)]
            yield from key_rows(item, f"{key}[].")
        else:
            kind = ", ".join([type_text(info.annotation), *constraints(info)])
            yield [f"`{key}`", kind, default_text(info), info.description or ""]


def _describe(info: FieldInfo, section: type[BaseModel]) -> str:
    """A section's row: the field's own description, else the first paragraph of the model's docstring."""
    doc = section.__dict__.get("__doc__") or ""
    return info.description or " ".join(doc.strip().split("\n\n")[0].split())


def _cell(text: str) -> str:
    """A table cell: pipes escaped, and a `<` that could open a tag, outside code spans, as an entity
    (Markdown would take runs/<name>/ for an HTML tag)."""
    parts = text.replace("|", "\\|").replace("\n", " ").split("`")
    return "`".join(p if i % 2 else re.sub(r"<(?=[A-Za-z/!])", "&lt;", p) for i, p in enumerate(parts))


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def job_table(model: type[BaseModel]) -> str:
    return table(["key", "type", "default", "description"], list(key_rows(model)))


def strategy_table() -> str:
    from gradcomp.strategies import strategy_class, strategy_names

    rows = []
    for name in strategy_names():
        keys = [row for row in key_rows(strategy_class(name).Config) if row[0] != "`name`"]
        rows += [[f"`{name}`", *row] for row in keys] or [[f"`{name}`", "-", "", "", "no keys of its own"]]
    return table(["strategy", "key", "type", "default", "description"], rows)


# --- metrics ------------------------------------------------------------------------------------


def metric_rows() -> list[list[str]]:
    """Every metric object of `gradcomp.metrics`, in definition order. prometheus_client exposes a
    metric's labels and help only on the object (a labelled metric without children has no samples)."""
    from prometheus_client.metrics import MetricWrapperBase

    from gradcomp import metrics

    label_values = {"reason": metrics.REJECT_REASONS}
    rows = []
    for obj in vars(metrics).values():
        if not isinstance(obj, MetricWrapperBase):
            continue
        kind = obj._type
        name = obj._name + ("_total" if kind == "counter" else "")
        labels = [
            f"`{label}`" + (f" ({', '.join(label_values[label])})" if label in label_values else "")
            for label in obj._labelnames
        ]
        rows.append([f"`{name}`", kind, ", ".join(labels), obj._documentation])
    return rows


def metric_table() -> str:
    return table(["metric", "type", "labels", "help"], metric_rows())


# --- regions ------------------------------------------------------------------------------------


def regions() -> dict[tuple[str, str], Callable[[], str]]:
    """(docs page, region name) -> the function that renders it."""
    from gradcomp.config.fed import FedJob
    from gradcomp.config.sweep import SweepJob
    from gradcomp.config.train import TrainJob

    return {
        ("docs/jobs.md", "train-keys"): lambda: job_table(TrainJob),
        ("docs/jobs.md", "fed-keys"): lambda: job_table(FedJob),
        ("docs/jobs.md", "strategy-keys"): strategy_table,
        ("docs/jobs.md", "sweep-keys"): lambda: job_table(SweepJob),
        ("docs/metrics.md", "metrics"): metric_table,
    }


def replace_region(text: str, name: str, body: str) -> str:
    begin = f"<!-- BEGIN GENERATED: {name} ({COMMAND.split(' (')[0]}) -->"
    end = f"<!-- END GENERATED: {name} -->"
    pattern = re.compile(re.escape(begin) + r"\n.*?" + re.escape(end), flags=re.S)
    if len(pattern.findall(text)) != 1:
        raise ValueError(f"expected exactly one region {begin!r} ... {end!r}")
    return pattern.sub(lambda _: f"{begin}\n{body}\n{end}", text)


def render(root: Path = ROOT) -> dict[Path, tuple[str, str]]:
    """page -> (text now, text with every region regenerated)."""
    out: dict[Path, tuple[str, str]] = {}
    for (page, name), make in regions().items():
        path = root / page
        old, new = out.get(path, (path.read_text(), path.read_text()))
        out[path] = (old, replace_region(new, name, make()))
    return out


def stale(root: Path = ROOT) -> list[str]:
    """The pages whose generated regions differ from what the code says."""
    return [str(p.relative_to(root)) for p, (old, new) in render(root).items() if old != new]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="report stale regions, write nothing")
    args = parser.parse_args(argv)
    pages = render()
    if args.check:
        bad = [str(p.relative_to(ROOT)) for p, (old, new) in pages.items() if old != new]
        for page in bad:
            print(f"{page}: generated reference is stale; run {COMMAND}", file=sys.stderr)
        return 1 if bad else 0
    for path, (old, new) in pages.items():
        if old != new:
            path.write_text(new)
            print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
