"""Built-in tasks and the `module:function` entry point for users' own.

A task is a model factory, a train set and an optional test set, and the objective it is
trained and scored by (`objective`: classification by default, next-token for language models).
Nothing is downloaded: digits ship with scikit-learn and the synthetic task is generated.
"""

from gradcomp.tasks.base import Task, TaskError, evaluate
from gradcomp.tasks.batches import batch_of, dataset_len, index_batches
from gradcomp.tasks.objective import Classification, NextToken, Objective
from gradcomp.tasks.registry import load_task, task_names

__all__ = [
    "Classification",
    "NextToken",
    "Objective",
    "Task",
    "TaskError",
    "batch_of",
    "dataset_len",
    "evaluate",
    "index_batches",
    "load_task",
    "task_names",
]
