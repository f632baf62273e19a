"""The anchor task on Flower's Ray simulation runtime: FedAvg (weighted by examples), one CPU per client.

Run by benchmarks/fl_anchors.py with runs/bench/venv-flower/bin/python; prints one RESULT line.
The server's evaluate_fn runs after every round: it stamps the round clock and, after the
last round, measures test accuracy on the global model.
"""

from __future__ import annotations

import numpy as np
import torch
from anchor_common import RoundClock, accuracy, load, mlp, parse_args
from flwr.client import ClientApp, NumPyClient
from flwr.common import Context, ndarrays_to_parameters
from flwr.server import ServerApp, ServerAppComponents, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.simulation import run_simulation
from torch import nn


def get_weights(model: nn.Module) -> list[np.ndarray]:
    return [v.detach().cpu().numpy() for v in model.state_dict().values()]


def set_weights(model: nn.Module, weights: list[np.ndarray]) -> None:
    model.load_state_dict({k: torch.from_numpy(np.array(w)) for k, w in zip(model.state_dict(), weights, strict=True)})


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    x, y, x_test, y_test, shards = load(args.data)
    clock = RoundClock()
    result: dict[str, float] = {}

    class Client(NumPyClient):
        def __init__(self, cid: int) -> None:
            torch.set_num_threads(1)
            self.x, self.y = torch.from_numpy(x[shards[cid]]), torch.from_numpy(y[shards[cid]])
            self.model = mlp()

        def fit(self, parameters, config):
            set_weights(self.model, parameters)
            opt = torch.optim.SGD(self.model.parameters(), lr=args.lr)
            for _ in range(args.epochs):
                order = torch.randperm(len(self.y))
                for start in range(0, len(self.y), args.batch_size):
                    b = order[start : start + args.batch_size]
                    opt.zero_grad()
                    nn.functional.cross_entropy(self.model(self.x[b]), self.y[b]).backward()
                    opt.step()
            return get_weights(self.model), len(self.y), {}

    def evaluate(server_round: int, parameters, config):
        if server_round > 0:
            clock.tick()
        if server_round == args.rounds:
            model = mlp()
            set_weights(model, parameters)
            result["accuracy"] = accuracy(model, x_test, y_test)
        return None

    def server_fn(context: Context) -> ServerAppComponents:
        strategy = FedAvg(
            fraction_fit=args.per_round / len(shards),
            fraction_evaluate=0.0,
            min_fit_clients=args.per_round,
            min_available_clients=len(shards),
            evaluate_fn=evaluate,
            initial_parameters=ndarrays_to_parameters(get_weights(mlp())),
        )
        return ServerAppComponents(strategy=strategy, config=ServerConfig(num_rounds=args.rounds))

    run_simulation(
        server_app=ServerApp(server_fn=server_fn),
        client_app=ClientApp(client_fn=lambda context: Client(int(context.node_config["partition-id"])).to_client()),
        num_supernodes=len(shards),
        backend_config={
            "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
            "init_args": {"num_cpus": args.actors, "include_dashboard": False},
        },
    )
    clock.report(args.per_round, result.get("accuracy"), simulator="flower", actors=args.actors)


if __name__ == "__main__":
    main()
