"""Task lookup: the built-in tasks by name, and users' `package.module:function` entry points.

It sits above the task modules (they import only `tasks.base`), so the imports run one way.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from gradcomp.tasks.base import Task, TaskError
from gradcomp.tasks.digits import digits_cnn, digits_mlp
from gradcomp.tasks.lm import lm
from gradcomp.tasks.synthetic import synthetic
from gradcomp.tasks.vision import resnet

BUILTIN: dict[str, Callable[..., Task]] = {
    "digits-mlp": digits_mlp,
    "digits-cnn": digits_cnn,
    "synthetic": synthetic,
    "lm": lm,
    "resnet": resnet,
}


def task_names() -> list[str]:
    """The built-in task names (job files may also name a `module:function`)."""
    return sorted(BUILTIN)


def load_task(name: str, **kwargs: Any) -> Task:
    """Load a built-in task by name, or a user's `package.module:function`.

    A user function is called with `**kwargs` and returns a `Task` or a
    `(model_factory, train_set, test_set)` tuple.
    """
    if name in BUILTIN:
        try:
            return BUILTIN[name](**kwargs)
        except TypeError as err:
            raise TaskError(f"task {name!r}: bad arguments {kwargs}: {err}") from err
    if ":" not in name:
        raise TaskError(f"unknown task {name!r}: use one of {sorted(BUILTIN)} or a 'module:function' entry point")
    module_name, func_name = name.split(":", 1)
    try:
        func = getattr(importlib.import_module(module_name), func_name)
    except (ImportError, AttributeError) as err:
        raise TaskError(f"task entry point {name!r} cannot be loaded: {err}") from err
    out = func(**kwargs)
    if isinstance(out, Task):
        return out
    if isinstance(out, tuple) and len(out) == 3 and callable(out[0]):
        return Task(name=name, make_model=out[0], train_set=out[1], test_set=out[2])
    raise TaskError(
        f"task entry point {name!r} must return a Task or (model_factory, train_set, test_set),"
        f" got {type(out).__name__}"
    )
