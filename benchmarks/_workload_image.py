"""Table 3 of workloads.py: ResNet step time per spec on synthetic CIFAR-shaped images over a shaped link.

Two gloo ranks train the resnet task (GroupNorm, synthetic data) with DDP and gradcomp's hook inside
a network namespace whose loopback is shaped (`_netns`, as `bandwidth.py`): each spec's steps run
in one block per repeat, repeats alternate the specs, and the table gives the median step time with
the standard error of the per-repeat medians.

    sudo python benchmarks/workloads.py image --links 100mbit --out runs/bench/workloads-image.json
Needs root plus `ip` and `tc`; otherwise it says so and exits 0 without numbers.
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
from _stats import compare, fmt, fmt_diff, mean_se, noise_note

SPECS = {
    "dense": "none",
    "fp16": "fp16",
    "topk+ef@50x": "topk(ratio=0.01) | ef",
    "rtopk+ef@50x": "rtopk(ratio=0.01, r=0.02) | ef",
    "topk+ef leader@50x": "topk(ratio=0.01333, share=leader) | ef",
    "randomk+ef@50x": "randomk(ratio=0.02) | ef",
    "powersgd(rank=2)": "powersgd(rank=2)",
}
TAG = "gradcomp-img"


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn

    from gradcomp.tasks import batch_of, load_task
    from gradcomp.worker.hook import register
    from gradcomp.worker.local_group import end_rank

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank, world_size=2)
    task = load_task("resnet", depth=args.depth, width=args.width, synthetic_examples=256)
    runs = {}
    for name in args.specs:
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(task.make_model())
        runs[name] = (model, register(model, SPECS[name], seed=0), torch.optim.SGD(model.parameters(), lr=0.01))
    times: dict[str, list[list[float]]] = {name: [] for name in args.specs}
    traffic: dict[str, Any] = {}
    for _repeat in range(args.repeats):
        for name, (model, state, opt) in runs.items():
            block = []
            for step in range(args.warmup + args.steps):
                x, y = batch_of(task.train_set, torch.arange(step * 16 + args.rank * 8, step * 16 + args.rank * 8 + 8))
                dist.barrier()
                t0 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                task.objective.mean(model(x), y).backward()
                opt.step()
                if step >= args.warmup:
                    block.append(time.perf_counter() - t0)
            times[name].append(block)
            traffic[name] = state.take_traffic()
    params = sum(p.numel() for p in task.make_model().parameters())
    out = {"parameters": params}
    for name in args.specs:
        medians = [statistics.median(b) for b in times[name]]
        mean, se = mean_se(medians)
        out[name] = {"step_seconds": mean, "se": se, "repeat_medians": medians,
                     "bytes_sent": traffic[name].bytes_sent, "dense_bytes": traffic[name].dense_bytes}  # fmt: skip
    if args.rank == 0:
        Path(args.result).write_text(json.dumps(out))
    end_rank()


def run_link(link: str, args: argparse.Namespace, port: int) -> dict[str, Any]:
    with namespace(link, TAG) as inside, tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        common = ["--port", str(port), "--steps", str(args.steps), "--warmup", str(args.warmup)]
        common += ["--result", str(result), "--repeats", str(args.repeats)]
        common += ["--depth", str(args.depth), "--width", str(args.width), "--specs", *args.specs]
        run = [*inside, sys.executable, __file__, "--worker"]
        procs = [subprocess.Popen([*run, "--rank", str(r), *common]) for r in range(2)]
        return worker_result(link, procs, result, args.timeout)


def main() -> None:
    parser = benchmark_parser(
        __doc__.split("\n\n")[0], params=0, slow_steps=3, links=list(SHAPES), specs=SPECS, port=29540
    )
    parser.add_argument("--repeats", type=int, default=3, help="blocks per spec (alternating specs)")
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--width", type=int, default=16)
    parser.set_defaults(links=["100mbit"])
    args = driver_args(parser, "workloads-image", worker)
    if args is None:
        return
    start = time.perf_counter()
    notes: list[str] = []
    results = {link: run_link(link, args, 29540 + i) for i, link in enumerate(args.links)}
    rows = []
    for link, r in results.items():
        paired = compare({n: dict(enumerate(r[n]["repeat_medians"])) for n in args.specs}, "dense")
        r["vs_dense"] = paired
        for name in args.specs:
            s, row = r[name], paired[name]
            fewer = s["dense_bytes"] / max(s["bytes_sent"], 1)
            rows.append([link, name, fmt(row["mean"], row["se"], 4), fmt_diff(row, 4), f"{fewer:.1f}x"])
        notes.append(f"{link}: {noise_note(paired)}")
    settings = {k: v for k, v in vars(args).items() if k not in ("worker", "rank", "port", "result")}
    write_json(args.out, {"benchmark": "workloads-image", "settings": settings, "environment": environment(),
                          "results": results, "seconds": round(time.perf_counter() - start, 1)})  # fmt: skip
    print()
    head = ["link", "spec", "s/step (mean of repeat medians ± SE)", "vs dense (paired by repeat)", "fewer bytes"]
    print(markdown_table(head, rows))
    print("\n".join(notes))


if __name__ == "__main__":
    main()
