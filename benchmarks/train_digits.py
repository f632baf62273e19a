"""Accuracy vs gradient bytes on the digits CNN, 2 data-parallel workers, same seed and epochs.

Compares dense all-reduce with topk, rtopk and randomk at ratio 0.01 (all with error
feedback), unit (SSGD) and example-level DP-SGD at noise multiplier 1.0. Workers are two
plain torch.distributed gloo processes running the same loop that `gradcomp train` runs
under Ray Train (gradcomp.worker.loop.train_worker), so the numbers are the product's.

    python benchmarks/train_digits.py --out runs/bench/train_digits.json
Target: rtopk(0.01)+ef within 1.5 accuracy points of dense while sending >= 30x fewer bytes.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, markdown_table, write_json

from gradcomp.config.train import TrainJob
from gradcomp.worker.loop import Session, train_worker

CONFIGS: dict[str, dict[str, Any]] = {
    "dense": {"compression": "none"},
    "topk(0.01)+ef": {"compression": "topk(ratio=0.01) | ef"},
    "rtopk(0.01)+ef": {"compression": "rtopk(ratio=0.01, r={r}) | ef"},
    "randomk(0.01)+ef": {"compression": "randomk(ratio=0.01) | ef"},
    "unit": {"compression": "unit"},
    "dp(sigma=1.0)": {"compression": "none", "dp": {"clip": 1.0, "noise_multiplier": 1.0, "delta": 1e-5}},
}


def _config(name: str, args: argparse.Namespace) -> dict[str, Any]:
    cfg = dict(CONFIGS[name])
    cfg["compression"] = cfg["compression"].format(r=args.r)
    return cfg


def _job(name: str, args: argparse.Namespace) -> TrainJob:
    return TrainJob.model_validate(
        {
            "name": name.replace("(", "-").replace(")", "").replace("+", "-").replace("=", ""),
            "task": {"name": "digits-cnn"},
            "seed": args.seed,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "optimizer": {"name": "momentum", "lr": args.lr, "momentum": 0.9},
            "schedule": {"name": "cosine", "warmup_steps": 20},
            "checkpoint": {"every_epochs": 0},
            **_config(name, args),
        }
    )


def _worker(rank: int, init: str, names: list[str], args: argparse.Namespace, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    results = {}
    for name in names:
        events: list[dict[str, Any]] = []
        session = Session(
            rank, 2, torch.device("cpu"), lambda m, d: None, progress=lambda e, sink=events: sink.extend(e["events"])
        )
        t0 = time.perf_counter()
        train_worker(_job(name, args), session)
        seconds = time.perf_counter() - t0
        epochs = [e for e in events if e["type"] == "epoch"]
        if rank == 0:
            last = epochs[-1]
            results[name] = {
                "spec": _config(name, args)["compression"],
                "dp": CONFIGS[name].get("dp"),
                "test_accuracy": last.get("test_accuracy"),
                "train_loss": last["train_loss"],
                "bytes_sent": sum(e["bytes_sent"] for e in epochs),
                "dense_bytes": sum(e["dense_bytes"] for e in epochs),
                "epsilon": last.get("epsilon"),
                "seconds": round(seconds, 2),
                "accuracy_by_epoch": [round(e.get("test_accuracy", float("nan")), 4) for e in epochs],
            }
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=16, help="per worker")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--r", type=float, default=0.02, help="rtopk: draw the 1%% from the top r fraction")
    parser.add_argument("--only", nargs="*", default=None, help=f"subset of {list(CONFIGS)}")
    parser.add_argument("--out", default=None, help="write JSON here too")
    args = parser.parse_args()
    names = args.only or list(CONFIGS)
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "results.pt")
        start = time.perf_counter()
        mp.spawn(_worker, args=(f"file://{tmp}/rdzv", names, args, out), nprocs=2, join=True)
        results = torch.load(out, weights_only=False)
    dense = results.get("dense")
    rows = []
    for name, r in results.items():
        r["bytes_vs_dense"] = r["dense_bytes"] / r["bytes_sent"]
        if dense is not None:
            r["accuracy_minus_dense_points"] = round(100 * (r["test_accuracy"] - dense["test_accuracy"]), 2)
        rows.append(
            [
                name,
                f"{100 * r['test_accuracy']:.2f}",
                r.get("accuracy_minus_dense_points", ""),
                f"{r['bytes_sent'] / 2**20:.2f}",
                f"{r['bytes_vs_dense']:.1f}x",
                "" if r["epsilon"] is None else f"{r['epsilon']:.2f}",
            ]
        )
    target = None
    if dense is not None and "rtopk(0.01)+ef" in results:
        r = results["rtopk(0.01)+ef"]
        target = {
            "accuracy_gap_points": round(100 * (dense["test_accuracy"] - r["test_accuracy"]), 2),
            "bytes_reduction": round(r["bytes_vs_dense"], 1),
            "met": dense["test_accuracy"] - r["test_accuracy"] <= 0.015 and r["bytes_vs_dense"] >= 30,
        }
    payload = {
        "benchmark": "train_digits",
        "settings": {"task": "digits-cnn", "workers": 2, **vars(args)},
        "environment": environment(),
        "results": results,
        "target": target,
        "seconds": round(time.perf_counter() - start, 1),
    }
    write_json(args.out, payload)
    print()
    print(markdown_table(["run", "test acc %", "vs dense (pts)", "grad MiB sent", "fewer bytes", "epsilon"], rows))
    if target is not None:
        print(f"\ntarget rtopk(0.01)+ef within 1.5 pts of dense and >= 30x fewer bytes: {target}")


if __name__ == "__main__":
    main()
