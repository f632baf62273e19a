"""Step time of dense vs rtopk(0.01)+ef data-parallel SGD over shaped links.

Two plain torch.distributed gloo processes train a ~25M-parameter synthetic MLP with DDP and
gradcomp's compression hook. Both run inside a network namespace this script creates, whose
loopback is shaped with `tc qdisc ... tbf` to 1 Gbit/s and 100 Mbit/s (and left unshaped
for the baseline). Both ranks' traffic crosses the one shaped loopback device.

    sudo python benchmarks/bandwidth.py --out runs/bench/bandwidth.json
Needs root plus `ip` and `tc` (iproute2); otherwise it says so and exits 0 without numbers.
Targets: at 100 Mbit/s compressed steps >= 10x faster than dense; on the unshaped loopback
the compressed step <= 1.3x the dense step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, markdown_table, write_json
from _netns import SHAPES, benchmark_parser, driver_args, namespace, worker_result

SPECS = {"dense": "none", "rtopk(0.01)+ef": "rtopk(ratio=0.01, r=0.05) | ef"}
LINKS = SHAPES
TAG = "gradcomp-bw"


# --- worker (runs inside the namespace) ---------------------------------------------------------


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn

    from gradcomp.tasks import load_task
    from gradcomp.worker.hook import register
    from gradcomp.worker.local_group import end_rank

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank, world_size=2)
    task = load_task("synthetic", num_params=args.params, num_examples=512)
    x_all, y_all = task.train_set.tensors  # type: ignore[attr-defined]
    out: dict[str, Any] = {"parameters": task.info["num_params"]}
    # Unshaped (CPU-bound): both variants live side by side and take turns step by step, so
    # machine load hits both alike. Shaped: each variant runs its steps in one block, since
    # a dense step floods the tbf queue and the TCP back-off it causes would land on the
    # next (compressed) step, which real training never does.
    runs = {}
    for name in args.specs:
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(task.make_model())
        runs[name] = (model, register(model, SPECS[name], seed=0), torch.optim.SGD(model.parameters(), lr=0.01))
    times: dict[str, list[float]] = {name: [] for name in args.specs}
    traffic: dict[str, Any] = {}
    steps = range(args.warmup + args.steps)
    if args.interleave:
        order = [(step, name) for step in steps for name in runs]
    else:
        order = [(step, name) for name in runs for step in steps]
    for step, name in order:
        lo = (step * 16 + args.rank * 8) % (len(x_all) - 8)
        x, y = x_all[lo : lo + 8], y_all[lo : lo + 8]
        model, state, opt = runs[name]
        dist.barrier()
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        dt = time.perf_counter() - t0
        traffic[name] = state.take_traffic()
        if step >= args.warmup:
            times[name].append(dt)
    for name in args.specs:
        out[name] = {
            "step_seconds": statistics.median(times[name]),
            "all_steps": times[name],
            "bytes_sent": traffic[name].bytes_sent,
            "dense_bytes": traffic[name].dense_bytes,
        }
    if args.rank == 0:
        Path(args.result).write_text(json.dumps(out))
    end_rank()


# --- driver --------------------------------------------------------------------------------------


def run_link(link: str, args: argparse.Namespace, port: int) -> dict[str, Any]:
    with namespace(link, TAG) as inside:
        steps = args.slow_steps if link == "100mbit" else args.steps
        with tempfile.TemporaryDirectory() as tmp:
            result = Path(tmp) / "result.json"
            procs = [
                subprocess.Popen(
                    [
                        *inside,
                        sys.executable,
                        __file__,
                        "--worker",
                        "--rank",
                        str(rank),
                        "--port",
                        str(port),
                        "--params",
                        str(args.params),
                        "--steps",
                        str(steps),
                        "--warmup",
                        str(args.warmup),
                        "--result",
                        str(result),
                        "--specs",
                        *args.specs,
                        *(["--interleave"] if SHAPES[link] is None else []),
                    ]
                )
                for rank in range(2)
            ]
            return worker_result(link, procs, result, args.timeout)


def main() -> None:
    parser = benchmark_parser(
        __doc__.split("\n\n")[0], params=25_000_000, slow_steps=2, links=LINKS, specs=SPECS, port=29512
    )
    args = driver_args(parser, "bandwidth", worker)
    if args is None:
        return
    start = time.perf_counter()
    results: dict[str, Any] = {}
    for i, link in enumerate(args.links):
        results[link] = run_link(link, args, 29512 + i)
        print(
            f"{link}: " + ", ".join(f"{s} {results[link][s]['step_seconds']:.3f} s/step" for s in args.specs),
            flush=True,
        )
    rows = []
    for link, r in results.items():
        d, c = r.get("dense"), r.get("rtopk(0.01)+ef")
        if d and c:
            r["speedup"] = d["step_seconds"] / c["step_seconds"]
            r["compressed_over_dense"] = c["step_seconds"] / d["step_seconds"]
            rows.append(
                [
                    link,
                    f"{d['step_seconds']:.3f}",
                    f"{c['step_seconds']:.3f}",
                    f"{r['speedup']:.1f}x",
                    f"{d['bytes_sent'] / 2**20:.1f}",
                    f"{c['bytes_sent'] / 2**20:.2f}",
                ]
            )
    targets = {}
    if "speedup" in results.get("100mbit", {}):
        targets["speedup_at_100mbit"] = {"value": round(results["100mbit"]["speedup"], 2), "target": ">= 10"}
    if "compressed_over_dense" in results.get("loopback", {}):
        targets["compressed_over_dense_loopback"] = {
            "value": round(results["loopback"]["compressed_over_dense"], 3),
            "target": "<= 1.3",
        }
    params = next(iter(results.values()))["parameters"] if results else None
    write_json(
        args.out,
        {
            "benchmark": "bandwidth",
            "settings": {
                "workers": 2,
                "parameters": params,
                "batch_per_worker": 8,
                **{k: v for k, v in vars(args).items() if k not in ("worker", "rank", "port", "result")},
            },
            "environment": environment(),
            "results": results,
            "targets": targets,
            "seconds": round(time.perf_counter() - start, 1),
        },
    )
    print()
    print(
        markdown_table(
            [
                "link",
                "dense s/step",
                "rtopk(0.01)+ef s/step",
                "speedup",
                "dense MiB/step/worker",
                "rtopk MiB/step/worker",
            ],
            rows,
        )
    )
    for name, t in targets.items():
        print(f"{name}: {t['value']} (target {t['target']})")


if __name__ == "__main__":
    main()
