"""The anchor task on pfl-research (package `pfl`), one process: FedAvg weighted by examples.

Run by benchmarks/fl_anchors.py with runs/bench/venv-pfl/bin/python; prints one RESULT line.
Users are sampled without reuse until all were used ('minimize_reuse'), the closest pfl
sampler to gradcomp's per-round sample without replacement.
"""

from __future__ import annotations

import numpy as np
import torch
from anchor_common import RoundClock, accuracy, load, mlp, parse_args
from pfl.aggregate.simulate import SimulatedBackend
from pfl.aggregate.weighting import WeightByDatapoints
from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
from pfl.callback.base import TrainingProcessCallback
from pfl.data.dataset import Dataset
from pfl.data.federated_dataset import FederatedDataset
from pfl.data.sampling import get_user_sampler
from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
from pfl.metrics import Metrics, Weighted
from pfl.model.pytorch import PyTorchModel
from torch import nn


class PflMLP(nn.Module):
    """The digits MLP with the loss/metrics methods pfl's PyTorchModel calls."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def loss(self, x: torch.Tensor, y: torch.Tensor, eval: bool = False) -> torch.Tensor:
        self.eval() if eval else self.train()
        return nn.functional.cross_entropy(self(x), y.long())

    @torch.no_grad()
    def metrics(self, x: torch.Tensor, y: torch.Tensor, eval: bool = False) -> dict:
        loss = nn.functional.cross_entropy(self(x), y.long(), reduction="sum").item()
        return {"loss": Weighted(loss, len(y))}


class Clock(TrainingProcessCallback):
    def __init__(self, clock: RoundClock) -> None:
        self.clock = clock

    def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
        self.clock.tick()
        return False, Metrics()


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    np.random.seed(args.seed)
    x, y, x_test, y_test, shards = load(args.data)
    users = [(x[s], y[s]) for s in shards]
    fed = FederatedDataset(
        lambda uid: Dataset(raw_data=list(users[uid]), user_id=uid),
        get_user_sampler("minimize_reuse", list(range(len(users)))),
    )
    net = PflMLP()
    model = PyTorchModel(
        model=net,
        local_optimizer_create=torch.optim.SGD,
        central_optimizer=torch.optim.SGD(net.parameters(), lr=1.0),
    )
    backend = SimulatedBackend(training_data=fed, val_data=None, postprocessors=[WeightByDatapoints()])
    clock = RoundClock()
    FederatedAveraging().run(
        algorithm_params=NNAlgorithmParams(
            central_num_iterations=args.rounds,
            evaluation_frequency=args.rounds + 1,
            train_cohort_size=args.per_round,
            val_cohort_size=0,
        ),
        backend=backend,
        model=model,
        model_train_params=NNTrainHyperParams(
            local_num_epochs=args.epochs, local_learning_rate=args.lr, local_batch_size=args.batch_size
        ),
        model_eval_params=NNEvalHyperParams(local_batch_size=None),
        callbacks=[Clock(clock)],
    )
    clock.report(args.per_round, accuracy(net, x_test, y_test), simulator="pfl")


if __name__ == "__main__":
    main()
