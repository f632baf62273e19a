"""Built-in tasks and the `module:function` entry point for users' own.

A task is a model factory plus a train set and an optional test set. Nothing is
downloaded: digits ship with scikit-learn and the synthetic task is generated.
"""

from gradcomp.tasks.base import Task, TaskError, evaluate
from gradcomp.tasks.registry import load_task, task_names

__all__ = ["Task", "TaskError", "evaluate", "load_task", "task_names"]
