"""What a task optimises and how it is scored: the loss per example, its mean, and the metrics.

Every training path takes its loss from the task's `Objective`: data-parallel training and the
federated client call `mean`, DP-SGD calls `per_example` on one example at a time under
`torch.func.vmap`, the vectorised cohort weights `per_example` rows under `vmap` inside a
`make_fx` recording, and the audit differentiates the mean loss of each victim batch. So
`per_example` must be a pure tensor function of (output, target): no `.item()`, no Python
branch on tensor values, no in-place update of its inputs.

Evaluation accumulates sums over batches (`batch_sums`) and turns them into metrics once at
the end (`metrics`), so a metric is exact over the whole set whatever the batch size.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.data import Dataset

from gradcomp.tasks.batches import batch_of, dataset_len, index_batches


class Objective:
    """Base objective: subclasses define `per_example`; the mean loss is the only metric by default."""

    name = "objective"
    # Targets are class labels a partitioner may split by (dirichlet, shards).
    class_labels = False

    def per_example(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The loss of each example of the batch: shape [batch]."""
        raise NotImplementedError

    def mean(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """The batch's mean loss (what a gradient step minimises)."""
        return self.per_example(output, target).mean()

    def batch_sums(self, output: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        """Sums over one batch that `metrics` turns into the evaluation metrics ('examples' counts rows)."""
        return {"loss": float(self.per_example(output, target).sum()), "examples": float(output.shape[0])}

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """The metrics from the sums of every batch; 'loss' is always there (mean loss per example)."""
        return {"loss": sums["loss"] / max(sums["examples"], 1.0)}

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, dataset: Dataset, device: str | torch.device = "cpu", batch_size: int = 512
    ) -> dict[str, float]:
        """The metrics of `model` (in eval mode) over all of `dataset`."""
        was_training = model.training
        model.eval()
        sums: dict[str, float] = {}
        try:
            for idx in index_batches(dataset_len(dataset), batch_size):
                x, y = batch_of(dataset, idx, device)
                for key, value in self.batch_sums(model(x), y).items():
                    sums[key] = sums.get(key, 0.0) + value
        finally:
            model.train(was_training)
        return self.metrics(sums) if sums else {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def token_nll(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """-log softmax(output) at the target class, over the last dim: shape of `target`.

    The same values and gradients as `cross_entropy(reduction="none")` without its ignore_index
    masking, which costs a third more operations in a recorded cohort step.
    """
    return -output.log_softmax(-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)


class Classification(Objective):
    """Cross-entropy over class logits [batch, classes] against integer labels [batch]; accuracy."""

    name = "classification"
    class_labels = True

    def per_example(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return token_nll(output, target)

    def batch_sums(self, output: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        return {
            "loss": float(token_nll(output.float(), target).sum()),
            "correct": float((output.argmax(dim=-1) == target).sum()),
            "examples": float(target.shape[0]),
        }

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums["examples"], 1.0)
        return {"loss": sums["loss"] / n, "accuracy": sums["correct"] / n}


class NextToken(Objective):
    """Next-token cross-entropy of a language model: logits [batch, time, vocab], targets [batch, time].

    An example's loss is the mean over its tokens. The metrics are per token over the whole set:
    `loss` (nats), `perplexity` = exp(loss) and `bits_per_<unit>` = loss / ln 2, where `unit` names
    what a token is ("token", "character", "byte").
    """

    name = "next-token"

    def __init__(self, unit: str = "token"):
        self.unit = unit

    def per_example(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return token_nll(output, target).mean(dim=-1)

    def batch_sums(self, output: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
        return {
            "loss": float(token_nll(output.float(), target).sum()),
            "tokens": float(target.numel()),
            "examples": float(target.shape[0]),
        }

    def metrics(self, sums: dict[str, float]) -> dict[str, float]:
        nats = sums["loss"] / max(sums["tokens"], 1.0)
        return {"loss": nats, "perplexity": math.exp(min(nats, 700.0)), f"bits_per_{self.unit}": nats / math.log(2)}

    def __repr__(self) -> str:
        return f"NextToken(unit={self.unit!r})"
