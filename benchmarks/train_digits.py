"""Accuracy vs gradient bytes on the digits CNN, 2 data-parallel workers, same seed and epochs.

Compares dense all-reduce with topk, rtopk and randomk at ratio 0.01 (all with error
feedback), unit (SSGD) and example-level DP-SGD at noise multiplier 1.0. Workers are two
plain torch.distributed gloo processes running the same loop that `gradcomp train` runs
under Ray Train (gradcomp.worker.loop.train_worker), so the numbers are the product's.

    python benchmarks/train_digits.py --out runs/bench/train_digits.json
Target: rtopk(0.01)+ef within 1.5 accuracy points of dense while sending >= 30x fewer bytes.

`--only` with the `@50x` configurations compares the collectives at equal bytes (50x fewer
than dense at P = 2): all-gather topk/rtopk at 1% (int32 position + fp32 value), leader mode
at 1.33% (fp32 values, plus k int32 positions from one rank in two), shared-seed randomk at
2% (values only) and torch's PowerSGD at ranks 2 and 1 (37x and 64x here, two dense iterations
included: no rank lands on 50x). Per seed, then merged:

    python benchmarks/train_digits.py --seed S --only dense ...@50x --out runs/bench/digits-50x-sS.json
    python benchmarks/train_digits.py --merge runs/bench/digits-50x-s*.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, markdown_table, write_json

from gradcomp.config.train import TrainJob
from gradcomp.worker.local_group import spawn_gloo_ranks
from gradcomp.worker.loop import Session, train_worker

CONFIGS: dict[str, dict[str, Any]] = {
    "dense": {"compression": "none"},
    "topk(0.01)+ef": {"compression": "topk(ratio=0.01) | ef"},
    "rtopk(0.01)+ef": {"compression": "rtopk(ratio=0.01, r={r}) | ef"},
    "randomk(0.01)+ef": {"compression": "randomk(ratio=0.01) | ef"},
    "unit": {"compression": "unit"},
    "dp(sigma=1.0)": {"compression": "none", "dp": {"clip": 1.0, "noise_multiplier": 1.0, "delta": 1e-5}},
    # Equal bytes (50x fewer than dense at 2 workers), one per collective:
    "topk+ef gather@50x": {"compression": "topk(ratio=0.01) | ef"},
    "rtopk+ef gather@50x": {"compression": "rtopk(ratio=0.01, r={r}) | ef"},
    "topk+ef leader@50x": {"compression": "topk(ratio=0.01333, share=leader) | ef"},
    "rtopk+ef leader@50x": {"compression": "rtopk(ratio=0.01333, r=0.02667, share=leader) | ef"},
    "randomk+ef@50x": {"compression": "randomk(ratio=0.02) | ef"},
    "powersgd(rank=2)": {"compression": "powersgd(rank=2)"},
    "powersgd(rank=1)": {"compression": "powersgd(rank=1)"},
}


DEFAULT = ["dense", "topk(0.01)+ef", "rtopk(0.01)+ef", "randomk(0.01)+ef", "unit", "dp(sigma=1.0)"]
BASELINE = "topk+ef gather@50x"  # what the equal-bytes comparison measures against


def merge(paths: list[str], out: str | None) -> None:
    """Average per-seed result files (one run of this script each) into one table."""
    runs = [json.loads(Path(p).read_text()) for p in sorted(paths)]
    names = list(dict.fromkeys(name for run in runs for name in run["results"]))
    summary: dict[str, Any] = {}
    for name in names:
        per_seed = [run["results"][name] for run in runs if name in run["results"]]
        acc = [100 * r["test_accuracy"] for r in per_seed]
        summary[name] = {
            "spec": per_seed[0]["spec"],
            "seeds": [run["settings"]["seed"] for run in runs if name in run["results"]],
            "test_accuracy_mean": statistics.fmean(acc),
            "test_accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "accuracy_epochs_1_5_mean": statistics.fmean(100 * r["mean_accuracy_epochs_1_5"] for r in per_seed),
            "bytes_vs_dense": statistics.fmean(r["dense_bytes"] / r["bytes_sent"] for r in per_seed),
            "seconds_mean": statistics.fmean(r["seconds"] for r in per_seed),
        }
    base = summary.get(BASELINE)
    rows = []
    for name, r in summary.items():
        spec = r["spec"].replace("|", "\\|")  # inside a markdown table
        if base is not None:
            r["minus_baseline_points"] = r["test_accuracy_mean"] - base["test_accuracy_mean"]
        rows.append(
            [
                f"{name} (`{spec}`)",
                f"{r['bytes_vs_dense']:.1f}x",
                f"{r['test_accuracy_mean']:.2f} ± {r['test_accuracy_std']:.2f}",
                f"{r['minus_baseline_points']:+.2f}" if base is not None else "",
                f"{r['accuracy_epochs_1_5_mean']:.1f}",
                len(r["seeds"]),
            ]
        )
    write_json(out, {"benchmark": "train_digits_merged", "files": sorted(paths), "summary": summary})
    print()
    headers = ["run", "fewer bytes", "test acc % (mean ± sd)", f"vs {BASELINE} (pts)", "acc % epochs 1-5", "seeds"]
    print(markdown_table(headers, rows))


def _config(name: str, args: argparse.Namespace) -> dict[str, Any]:
    cfg = dict(CONFIGS[name])
    cfg["compression"] = cfg["compression"].format(r=args.r)
    return cfg


def _job(name: str, args: argparse.Namespace) -> TrainJob:
    return TrainJob.model_validate(
        {
            "name": re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-"),
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


def _worker(rank: int, names: list[str], args: argparse.Namespace, out: str) -> None:
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
                "train_loss": last.get("train_loss"),  # DP keeps it in the workers
                "bytes_sent": sum(e["bytes_sent"] for e in epochs),
                "dense_bytes": sum(e["dense_bytes"] for e in epochs),
                "epsilon": last.get("epsilon"),
                "epsilon_rank_message": last.get("epsilon_rank_message"),
                "seconds": round(seconds, 2),
                "accuracy_by_epoch": [round(e.get("test_accuracy", float("nan")), 4) for e in epochs],
                "mean_accuracy_epochs_1_5": statistics.fmean(e.get("test_accuracy", float("nan")) for e in epochs[:5]),
            }
    if rank == 0:
        torch.save(results, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=16, help="per worker")
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--r", type=float, default=0.02, help="rtopk: draw the 1%% from the top r fraction")
    parser.add_argument("--only", nargs="*", default=None, choices=list(CONFIGS), metavar="NAME")
    parser.add_argument("--merge", nargs="*", default=None, help="per-seed JSON files to average instead of training")
    parser.add_argument("--out", default=None, help="write JSON here too")
    args = parser.parse_args()
    if args.merge:
        merge(args.merge, args.out)
        return
    names = args.only or DEFAULT
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "results.pt")
        start = time.perf_counter()
        spawn_gloo_ranks(_worker, (names, args, out), world=2)
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
