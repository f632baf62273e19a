"""One-run privacy audit of example-level DP-SGD (Steinke, Nasr and Jagielski 2023, white box).

For each noise multiplier: one DP-SGD run on the digits MLP with 1000 Dirac gradient canaries
(each in the training set with probability 1/2), the empirical epsilon lower bound at 95%
confidence from 100 guesses, and the epsilon the run's own ledger reports. A lower bound above it
would mean the implementation or its accounting is broken; the last rows audit deliberately broken
mechanisms (charged 5.0 but adding 0.2; charged 2.0 but adding none, or half) to show which the
audit catches.

    python benchmarks/onerun_audit.py --out runs/bench/onerun_audit.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, markdown_table, write_json

from gradcomp.audit.onerun import OneRunConfig, one_run_audit

RUNS = [
    {"noise_multiplier": 0.5},
    {"noise_multiplier": 1.0},
    {"noise_multiplier": 2.0},
    {"noise_multiplier": 5.0, "noise_scale": 0.04},
    {"noise_multiplier": 2.0, "noise_scale": 0.0},
    {"noise_multiplier": 2.0, "noise_scale": 0.5},
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--canaries", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=len(RUNS), help="the first N configurations only (a smoke run)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    configs = RUNS[: args.runs]
    results = [one_run_audit(OneRunConfig(epochs=args.epochs, canaries=args.canaries, **run)) for run in configs]
    write_json(args.out, {"environment": environment(), "runs": results})
    rows = [
        [
            round(r["config"]["noise_multiplier"] * r["config"]["noise_scale"], 2),
            r["config"]["noise_multiplier"],
            r["steps"],
            f"{r['correct_guesses']}/{r['guesses']}",
            round(r["epsilon_lower_bound"], 2),
            round(r["epsilon_accountant"], 2),
            "yes" if r["consistent"] else "NO",
        ]
        for r in results
    ]
    headers = ["noise added", "noise charged", "steps", "correct", "epsilon lower bound", "accountant", "lb <= acc"]
    print(markdown_table(headers, rows))


if __name__ == "__main__":
    main()
