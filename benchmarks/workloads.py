"""Workloads that can tell the methods apart: the byte-level LM (data-parallel and federated) and the
ResNet's step time on a shaped link. Every number is a mean over seeds with its standard error, and
each table says which differences from its reference exceed two standard errors.

    python benchmarks/workloads.py dp    --out runs/bench/workloads-dp.json     # table 1
    python benchmarks/workloads.py fed   --out runs/bench/workloads-fed.json    # table 2
    python benchmarks/workloads.py image --out runs/bench/workloads-image.json  # table 3 (root, ip, tc)

1. Data-parallel LM (`gradcomp train`'s own loop on gloo ranks): dense, fp16, topk+ef and rtopk+ef
   (all-gather and leader), randomk+ef, unit and PowerSGD rank 1/2/4, at about 50x and 200x fewer
   bytes than dense; test loss and bits per byte. The defaults are the issue's configuration (`small`,
   2 and 4 ranks, 3 seeds); `--size`, `--max-bytes`, `--epochs`, `--world`, `--seeds`, `--only` shrink it.
   `--schedules cosine step sigmoid` trains each spec under each learning-rate schedule (after the same
   warm-up; `step` multiplies by 0.1 each epoch, `sigmoid` is the founding papers' sigmoid decay) and
   compares every row against `dense [cosine]`.
2. Federated LM on the natural partition (one client per stdlib module): FedAvg dense against
   compressed uploads and against central and local DP: test loss, bytes and epsilon.
3. ResNet on synthetic CIFAR-shaped images: step time per spec over a 100 Mbit/s link
   (`_workload_image.py` in the namespace harness of `bandwidth.py`).
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, markdown_table, write_json
from _stats import compare, fmt, fmt_diff, noise_note

LN2 = math.log(2)
DP_SPECS: dict[str, str] = {
    "dense": "none",
    "fp16": "fp16",
    "topk+ef gather@50x": "topk(ratio=0.01) | ef",
    "rtopk+ef gather@50x": "rtopk(ratio=0.01, r=0.02) | ef",
    "topk+ef leader@50x": "topk(ratio=0.01333, share=leader) | ef",
    "rtopk+ef leader@50x": "rtopk(ratio=0.01333, r=0.02667, share=leader) | ef",
    "randomk+ef@50x": "randomk(ratio=0.02) | ef",
    "topk+ef gather@200x": "topk(ratio=0.0025) | ef",
    "rtopk+ef gather@200x": "rtopk(ratio=0.0025, r=0.005) | ef",
    "topk+ef leader@200x": "topk(ratio=0.00333, share=leader) | ef",
    "rtopk+ef leader@200x": "rtopk(ratio=0.00333, r=0.00667, share=leader) | ef",
    "randomk+ef@200x": "randomk(ratio=0.005) | ef",
    "unit": "unit",
    "powersgd(rank=1)": "powersgd(rank=1)",
    "powersgd(rank=2)": "powersgd(rank=2)",
    "powersgd(rank=4)": "powersgd(rank=4)",
}


def _lm_args(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"size": args.size}
    if args.max_bytes is not None:
        out["max_bytes"] = args.max_bytes
    return out


SCHEDULES = ("cosine", "step", "sigmoid")


def _row(spec: str, schedule: str, args: argparse.Namespace) -> str:
    """A table row's name: the spec, and the schedule when the run compares several."""
    return spec if len(args.schedules) == 1 else f"{spec} [{schedule}]"


def _dp_job(row: str, args: argparse.Namespace, seed: int) -> Any:
    from gradcomp.config.train import TrainJob

    name, _, schedule = row.partition(" [")
    schedule = schedule.rstrip("]") or args.schedules[0]

    return TrainJob.model_validate(
        {
            "name": re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-"),
            "task": {"name": "lm", "args": _lm_args(args)},
            "seed": seed,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "optimizer": {"name": "adam", "lr": args.lr},
            "schedule": {"name": schedule, "warmup_steps": args.warmup},
            "checkpoint": {"every_epochs": 0},
            "compression": DP_SPECS[name],
        }
    )


def _dp_rank(rank: int, world: int, names: list[str], args: argparse.Namespace, seed: int, out: str) -> None:
    from gradcomp.worker.loop import Session, train_worker

    results = {}
    for name in names:
        events: list[dict[str, Any]] = []
        session = Session(
            rank, world, torch.device("cpu"), lambda m, d: None, progress=lambda e, s=events: s.extend(e["events"])
        )
        t0 = time.perf_counter()
        train_worker(_dp_job(name, args, seed), session)
        epochs = [e for e in events if e["type"] == "epoch"]
        if rank == 0:
            last = epochs[-1]
            results[name] = {
                "test_loss": last["test_loss"],
                "bits_per_byte": last["test_loss"] / LN2,
                "bytes_sent": sum(e["bytes_sent"] for e in epochs),
                "dense_bytes": sum(e["dense_bytes"] for e in epochs),
                "steps": last["step"],
                "seconds": round(time.perf_counter() - t0, 2),
            }
    if rank == 0:
        torch.save(results, out)


def _dp_trampoline(rank: int, world: int, names: list[str], args: argparse.Namespace, seed: int, out: str) -> None:
    torch.set_num_threads(max(1, args.threads))
    _dp_rank(rank, world, names, args, seed, out)


def run_dp(args: argparse.Namespace) -> dict[str, Any]:
    """Every (world, seed): one spawn of `world` gloo ranks training each spec in turn."""
    from gradcomp.worker.local_group import spawn_gloo_ranks

    names = [_row(spec, sched, args) for spec in args.only or list(DP_SPECS) for sched in args.schedules]
    reference = _row("dense", args.schedules[0], args)
    raw: dict[str, dict[str, dict[int, dict[str, Any]]]] = {}
    for world in args.world:
        for seed in args.seeds:
            with tempfile.TemporaryDirectory() as tmp:
                out = os.path.join(tmp, "r.pt")
                spawn_gloo_ranks(_dp_trampoline, (world, names, args, seed, out), world=world)
                for name, r in torch.load(out, weights_only=False).items():
                    raw.setdefault(str(world), {}).setdefault(name, {})[seed] = r
            print(f"dp: world {world} seed {seed} done", flush=True)
    tables = {}
    for world, runs in raw.items():
        loss = compare({n: {s: r["test_loss"] for s, r in v.items()} for n, v in runs.items()}, reference)
        for name, row in loss.items():
            first = next(iter(runs[name].values()))
            row["fewer_bytes"] = first["dense_bytes"] / max(first["bytes_sent"], 1)
            row["spec"] = DP_SPECS[name.partition(" [")[0]]
        tables[world] = loss
    return {"per_seed": raw, "tables": tables}


def dp_markdown(result: dict[str, Any]) -> str:
    parts = []
    for world, rows in result["tables"].items():
        body = [
            [f"{n} (`{r['spec'].replace('|', chr(92) + '|')}`)", f"{r['fewer_bytes']:.1f}x", fmt(r["mean"], r["se"]),
             fmt(r["mean"] / LN2, r["se"] / LN2 if r["se"] is not None else None), fmt_diff(r)]
            for n, r in rows.items()
        ]  # fmt: skip
        head = ["spec", "fewer bytes", "test loss (nats/byte)", "bits per byte", "vs dense (paired)"]
        parts.append(f"**{world} ranks**\n\n{markdown_table(head, body)}\n\n{noise_note(rows)}")
    return "\n\n".join(parts)


FED_CONFIGS: dict[str, dict[str, Any]] = {
    "fedavg dense": {},
    "topk+ef@50x uploads": {"compression": "topk(ratio=0.01) | ef"},
    "rtopk+ef@50x uploads": {"compression": "rtopk(ratio=0.01, r=0.02) | ef"},
    "central dp": {"privacy": {"mode": "central", "clip": 1.0, "noise_multiplier": 0.5, "delta": 1e-5}},
    "central dp + topk+ef": {
        "compression": "topk(ratio=0.01) | ef",
        "privacy": {"mode": "central", "clip": 1.0, "noise_multiplier": 0.5, "delta": 1e-5},
    },
    "local dp": {"privacy": {"mode": "local", "clip": 1.0, "noise_multiplier": 0.3, "delta": 1e-5}},
}


def _fed_job(name: str, args: argparse.Namespace, seed: int) -> Any:
    from gradcomp.sim.setup import fedsim_job

    data = {
        "name": re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-"),
        "task": {"name": "lm", "args": _lm_args(args)},
        "rounds": args.rounds,
        "clients": {"expected": args.clients},
        "round": {"fraction": args.per_round / args.clients, "min_clients": 1, "deadline_seconds": 600},
        "local": {"epochs": 1, "batch_size": args.batch_size, "lr": args.client_lr, "momentum": 0.0},
        "strategy": {"name": "fedavg", "server_lr": 1.0},
        "seed": seed,
        "simulation": {"partition": "natural", "actors": 0, "eval_every": args.rounds},
        **FED_CONFIGS[name],
    }
    return fedsim_job(data)


def run_fed(args: argparse.Namespace) -> dict[str, Any]:
    """Each config and seed: one in-process `gradcomp fedsim` on the natural partition."""
    import json

    from gradcomp.sim.run import simulate

    raw: dict[str, dict[int, dict[str, Any]]] = {}
    for name in args.only or list(FED_CONFIGS):
        for seed in args.seeds:
            with tempfile.TemporaryDirectory() as tmp:
                job = _fed_job(name, args, seed)
                t0 = time.perf_counter()
                simulate(job, Path(tmp), show=False)
                rec = json.loads((Path(tmp) / job.name / "results.json").read_text())
            last = next(e for e in reversed(rec["history"]) if "test_loss" in e)
            raw.setdefault(name, {})[seed] = {
                "test_loss": last["test_loss"],
                "bits_per_byte": last["test_loss"] / LN2,
                "bytes_sent": rec["bytes_sent"],
                "dense_bytes": rec["dense_bytes"],
                "epsilon": rec["epsilon"],
                "vectorized": rec["final"].get("vectorized"),
                "seconds": round(time.perf_counter() - t0, 1),
            }
            print(f"fed: {name} seed {seed}: loss {last['test_loss']:.4f}", flush=True)
    rows = compare({n: {s: r["test_loss"] for s, r in v.items()} for n, v in raw.items()}, "fedavg dense")
    for name, row in rows.items():
        first = next(iter(raw[name].values()))
        row.update(bytes_sent=first["bytes_sent"], epsilon=first["epsilon"], vectorized=first["vectorized"])
    return {"per_seed": raw, "table": rows}


def fed_markdown(result: dict[str, Any]) -> str:
    rows = result["table"]
    body = [
        [n, f"{r['bytes_sent'] / 2**20:.2f}", fmt(r["mean"], r["se"]), fmt_diff(r),
         "-" if r["epsilon"] is None else f"{r['epsilon']:.2f}"]
        for n, r in rows.items()
    ]  # fmt: skip
    head = ["run", "uplink MiB", "test loss (nats/byte)", "vs dense (paired)", "epsilon (delta 1e-5)"]
    return f"{markdown_table(head, body)}\n\n{noise_note(rows)}"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="table", required=True)
    for name, defaults in (("dp", {"batch_size": 16, "lr": 3e-3}), ("fed", {"batch_size": 16, "lr": 3e-3})):
        p = sub.add_parser(name)
        p.add_argument("--size", default="small", help="lm size: tiny, small, large")
        p.add_argument("--max-bytes", type=int, default=None, help="cap the corpus (default: the size's)")
        p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2])
        p.add_argument("--batch-size", type=int, default=defaults["batch_size"], help="per rank / per client")
        p.add_argument("--lr", type=float, default=defaults["lr"])
        p.add_argument("--only", nargs="*", default=None, metavar="NAME")
        p.add_argument("--out", default=None)
    dp = sub.choices["dp"]
    dp.add_argument("--world", type=int, nargs="*", default=[2, 4])
    dp.add_argument("--epochs", type=int, default=1)
    dp.add_argument("--warmup", type=int, default=50)
    dp.add_argument("--threads", type=int, default=1, help="intra-op threads per rank")
    dp.add_argument("--schedules", nargs="+", default=["cosine"], choices=SCHEDULES, help="the first is the reference")
    fed = sub.choices["fed"]
    fed.add_argument("--clients", type=int, default=120)
    fed.add_argument("--per-round", type=int, default=12)
    fed.add_argument("--rounds", type=int, default=30)
    fed.add_argument("--client-lr", type=float, default=0.5)
    sub.add_parser("image", help="_workload_image.py with the arguments that follow (see its --help)")
    return parser.parse_args(argv)


def main() -> None:
    if sys.argv[1:2] == ["image"]:  # its own harness (a namespace, worker processes) takes the other arguments
        os.execv(sys.executable, [sys.executable, str(Path(__file__).with_name("_workload_image.py")), *sys.argv[2:]])
    args = parse()
    start = time.perf_counter()
    result = run_dp(args) if args.table == "dp" else run_fed(args)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    payload = {"benchmark": f"workloads-{args.table}", "settings": settings, "environment": environment(), **result}
    payload["seconds"] = round(time.perf_counter() - start, 1)
    write_json(args.out, payload)
    print()
    print(dp_markdown(result) if args.table == "dp" else fed_markdown(result))


if __name__ == "__main__":
    main()
