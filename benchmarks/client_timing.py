"""What a local-DP client's round time says about its shard size, in epoch mode and fixed-work mode.

The coordinator (local DP's adversary) sees when a client pulls a task and when its update
arrives. In epoch mode a round runs epochs x ceil(examples / batch) steps, so that time grows
with the shard; in fixed-work mode (`local.steps`, `gradcomp client --local-steps`) it is the
same number of steps on the same batch size for every shard. This times `ClientRuntime.train_round`
(local training, clip, keyed noise, the request) on digits-mlp shards of several sizes, all
settings interleaved so machine load hits each alike; medians over the repeats.

    python benchmarks/client_timing.py --out runs/bench/client_timing.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, markdown_table, write_json

from gradcomp.fedclient.config import LocalTrainingConfig
from gradcomp.fedclient.data import dataset_view
from gradcomp.fedclient.runtime import ClientMemory, ClientRuntime
from gradcomp.protocol.codec import serialize_model
from gradcomp.tasks import load_task

SIZES = [60, 240, 960]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=SIZES)
    parser.add_argument("--steps", type=int, default=8, help="fixed-work mode's local steps")
    parser.add_argument("--repeats", type=int, default=60)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # what `gradcomp client` uses
    task = load_task("digits-mlp")
    model = serialize_model(dict(task.make_model().named_parameters()), 1)
    runtimes = {}
    for steps in (0, args.steps):
        cfg = LocalTrainingConfig(
            task="digits-mlp", epochs=1, batch_size=32, lr=0.1, momentum=0.0, spec="dp(clip=1.0, sigma=1.0)",
            seed=0, steps=steps,
        )  # fmt: skip
        runtimes[steps] = ClientRuntime(cfg, task=task)
        runtimes[steps].load_global(1, model)
    shards = {n: dataset_view(task.train_set).subset(torch.arange(n)) for n in args.sizes}
    for data in shards.values():
        _ = data.digest  # hashed once before any round, as `gradcomp client` does
    times: dict[tuple[int, int], list[float]] = {(s, n): [] for s in runtimes for n in shards}
    for r in range(args.repeats):
        for steps, n in times:
            t0 = time.perf_counter()
            runtimes[steps].train_round(client="c", round=r + 1, model_version=1, data=shards[n], memory=ClientMemory())
            times[(steps, n)].append(time.perf_counter() - t0)
    rows = [
        {"mode": f"fixed-work, {s} steps" if s else "epoch mode, 1 epoch", "examples": n,
         "round_ms": round(1e3 * statistics.median(t[min(5, len(t) - 1):]), 2)}
        for (s, n), t in times.items()
    ]  # fmt: skip
    print(
        markdown_table(
            ["mode", "examples", "round (ms, median)"], [[r["mode"], r["examples"], r["round_ms"]] for r in rows]
        )
    )
    write_json(args.out, {"environment": environment(), "batch_size": 32, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
