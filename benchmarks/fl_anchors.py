"""Anchor benchmark: gradcomp's federated simulator against pfl-research and Flower.

The task: sklearn digits, 100 clients with label Dirichlet(0.5) shards, 10 per round, FedAvg
weighted by examples (server lr 1), 5 local epochs of batch-10 SGD at lr 0.05, MLP 64-128-10,
50 rounds. Every simulator runs as its own child process, interleaved pass by pass, and the
peak memory of that child's whole process tree (Ray's raylet, GCS and workers included) is
sampled from /proc. All of them train on the same shards (written once to an .npz).

Parts (--parts, default all):
  anchors    the task on gradcomp (sequential and vectorised in the driver, Ray pool with 1
             and 2 actors), pfl-research and Flower (2 Ray actors)
  scale      1000 clients, 100 per round: gradcomp (vectorised, sequential) against pfl-research
  crossover  vectorised vs sequential in the driver for the digits MLP, the digits CNN and a
             ~1M-parameter synthetic MLP: where vectorising stops paying off
  accuracy   test accuracy at round 50 for 3 seeds, vectorised vs sequential
  breakdown  milliseconds per round of each part of a gradcomp round (steps, request building,
             the coordinator's parsing and decoding, Ray round trips; gradcomp.sim.timing),
             and against it what 10x pfl-research's measured updates/s leaves per round

pfl-research and Flower live in their own virtual environments under runs/bench/, created on
first use (`pfl[pytorch]`, `flwr[simulation]`, torch pinned to 2.13.0); a simulator that
cannot be installed is skipped with the reason in the output.

    python benchmarks/fl_anchors.py --out runs/bench/fl_anchors.json
    python benchmarks/fl_anchors.py --parts anchors --passes 2 --out runs/bench/fl_anchors.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import venv
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from _common import environment, markdown_table, write_json

BENCH_DIR = Path("runs/bench")
ANCHOR_DIR = Path(__file__).parent / "anchors"
TORCH_PIN = "torch==2.13.0"
ANCHORS = {
    "pfl": {"requirements": ["pfl[pytorch]", TORCH_PIN, "scikit-learn"], "import": "pfl"},
    "flower": {"requirements": ["flwr[simulation]", TORCH_PIN, "scikit-learn"], "import": "flwr"},
}
TASK = {"epochs": 5, "batch_size": 10, "lr": 0.05, "partition": "dirichlet(alpha=0.5)"}
GRADCOMP_MODES = {
    "gradcomp-sequential": {"actors": 0, "vectorize": "off"},
    "gradcomp-vectorised": {"actors": 0, "vectorize": "on"},
    "gradcomp-ray1-sequential": {"actors": 1, "vectorize": "off"},
    "gradcomp-ray2-sequential": {"actors": 2, "vectorize": "off"},
    "gradcomp-ray1-vectorised": {"actors": 1, "vectorize": "on"},
    "gradcomp-ray2-vectorised": {"actors": 2, "vectorize": "on"},
}
UNFAIRNESS = [
    "gradcomp runs every update through its real coordinator: protobuf request bytes, validation, "
    "decoding and aggregation; pfl-research and Flower aggregate in memory.",
    "pfl-research samples users with its 'minimize_reuse' sampler and iterates each user's data in a "
    "fixed order; gradcomp and Flower reshuffle every epoch. Flower samples with its own RNG.",
    "Peak memory is the sum of resident set sizes over the process tree (shared libraries counted once "
    "per process), sampled every 20 ms; the proportional set size (PSS, shared pages split) is given "
    "too. Ray runs start several processes (GCS, raylet, workers), which the sums count.",
    "Steady throughput leaves out the first round (imports, actor start, first model). gradcomp's "
    "vectorised path records a step graph the second time a cohort shape appears; that cost is counted.",
    "gradcomp and pfl-research train with one torch thread; Flower's clients set one thread each.",
]


# --- the anchors' own environments ---------------------------------------------------------
def anchor_python(name: str) -> Path:
    return BENCH_DIR / f"venv-{name}" / "bin" / "python"


def ensure_anchor(name: str) -> tuple[Path | None, str]:
    """Create the anchor's own virtual environment on first use; (python or None, message)."""
    python = anchor_python(name)
    spec = ANCHORS[name]
    check = [str(python), "-c", f"import {spec['import']}, torch, sklearn"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python, "ready"
    venv.EnvBuilder(with_pip=True, clear=True).create(python.parent.parent)
    log = BENCH_DIR / f"install-{name}.log"
    with log.open("w") as fh:
        cmd = [str(python), "-m", "pip", "install", *spec["requirements"]]
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
    if proc.returncode != 0 or subprocess.run(check, capture_output=True).returncode != 0:
        return None, f"skipped: pip install {' '.join(spec['requirements'])} failed (see {log})"
    return python, "installed"


# --- measuring a child process tree --------------------------------------------------------
def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def _kib(path: str, field: str) -> int:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class TreeMemory:
    """Peak RSS and PSS summed over a process and all its descendants, sampled in a thread."""

    def __init__(self, pid: int, every: float = 0.02):
        self.pid, self.every = pid, every
        self.peak_rss = self.peak_pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        tick = 0
        while not self._stop.is_set():
            pids = _tree(self.pid)
            self.peak_rss = max(self.peak_rss, sum(_kib(f"/proc/{p}/status", "VmRSS:") for p in pids) * 1024)
            if tick % 10 == 0:  # PSS is dearer to read: every 10th sample
                pss = sum(_kib(f"/proc/{p}/smaps_rollup", "Pss:") for p in pids) * 1024
                self.peak_pss = max(self.peak_pss, pss)
            tick += 1
            self._stop.wait(self.every)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_child(cmd: list[str], cwd: Path | None = None, timeout: float = 900) -> dict[str, Any]:
    """Run one simulator; its RESULT line plus whole-process wall time and peak tree memory."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    mem = TreeMemory(proc.pid)
    try:
        out, _ = proc.communicate(timeout=timeout)
    finally:
        mem.stop()
    wall = time.perf_counter() - t0
    line = next((ln for ln in reversed(out.splitlines()) if ln.startswith("RESULT ")), None)
    if proc.returncode != 0 or line is None:
        return {"error": f"exit {proc.returncode}: {out[-1500:]}"}
    res = json.loads(line[len("RESULT ") :])
    res.update(wall_seconds=round(wall, 2), peak_rss_bytes=mem.peak_rss, peak_pss_bytes=mem.peak_pss)
    return res


# --- the task's data and the gradcomp worker -------------------------------------------------
def write_task_data(path: Path, clients: int, seed: int) -> None:
    """The digits split and gradcomp's own Dirichlet shards, for every simulator."""
    from gradcomp.partition import partition
    from gradcomp.tasks import load_task

    task = load_task("digits-mlp")
    x, y = task.train_set.tensors
    xt, yt = task.test_set.tensors
    shards = partition(y.numpy(), clients, TASK["partition"], seed=seed)
    offsets = np.cumsum([0] + [len(s) for s in shards])
    np.savez(
        path,
        x_train=x.numpy(),
        y_train=y.numpy(),
        x_test=xt.numpy(),
        y_test=yt.numpy(),
        indices=np.concatenate(shards).astype(np.int64),
        offsets=offsets,
    )


def gradcomp_job(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "name": "fl-anchor",
        "task": {"name": args.task, "args": json.loads(args.task_args)},
        "rounds": args.rounds,
        "clients": {"expected": args.clients},
        "round": {"fraction": args.per_round / args.clients, "min_clients": 1, "deadline_seconds": 60},
        "local": {"epochs": TASK["epochs"], "batch_size": TASK["batch_size"], "lr": TASK["lr"]},
        "strategy": {"name": "fedavg", "server_lr": 1.0},
        "compression": "none",
        "seed": args.seed,
        "simulation": {
            "partition": TASK["partition"],
            "actors": args.actors,
            "vectorize": args.vectorize,
            "eval_every": args.rounds,
        },
    }


def gradcomp_worker(args: argparse.Namespace) -> None:
    """One gradcomp simulation in this process (a child of the benchmark); prints its RESULT line."""
    import yaml

    from gradcomp.raycluster import connect
    from gradcomp.sim.setup import build_simulation, load_fedsim_job
    from gradcomp.sim.timing import NO_TIMINGS, Timings

    if args.actors:
        connect(None, num_cpus=args.actors)
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as fh:
        yaml.safe_dump(gradcomp_job(args), fh)
    job = load_fedsim_job(fh.name)
    os.unlink(fh.name)
    timings = Timings() if args.breakdown else NO_TIMINGS
    sim, _ = build_simulation(job, quiet=True, timings=timings)
    ends, counts, accuracy = [], [], None
    while not sim.coord.done:
        entry, _ = sim.run_round()
        ends.append(time.perf_counter())
        counts.append(sim.updates_trained)
        if entry is not None and "test_accuracy" in entry:
            accuracy = entry["test_accuracy"]
        if len(ends) == 1:  # parts are measured after the first round, as steady throughput
            timings.reset()
    steady = ends[-1] - ends[0]
    updates = counts[-1] - counts[0]
    out = {
        "rounds": len(ends),
        "steady_updates": updates,
        "steady_seconds": round(steady, 4),
        "updates_per_second": round(updates / steady, 2),
        "accuracy": accuracy,
        "vectorized": sim.pool.vectorized,
        "actors": args.actors,
    }
    if timings.enabled:
        out["breakdown"] = per_round(timings, len(ends) - 1)
    sim.pool.close()
    print("RESULT " + json.dumps(out), flush=True)


def per_round(timings: Any, rounds: int) -> dict[str, Any]:
    """Milliseconds per round for each part (gradcomp.sim.timing), and the step count and cost when
    steps were timed."""
    out: dict[str, Any] = {label: round(s / rounds * 1e3, 3) for label, s in timings.seconds.items()}
    if timings.calls["steps"]:
        out["steps per round"] = round(timings.calls["steps"] / rounds, 2)
        out["us per step"] = round(timings.seconds["steps"] / timings.calls["steps"] * 1e6, 1)
    return out


# --- the parts -------------------------------------------------------------------------------
def gradcomp_cmd(mode: dict[str, Any], data: dict[str, Any]) -> list[str]:
    cmd = [sys.executable, __file__, "--worker", "--actors", str(mode["actors"]), "--vectorize", mode["vectorize"]]
    for key in ("clients", "per_round", "rounds", "seed", "task"):
        cmd += [f"--{key.replace('_', '-')}", str(data[key])]
    cmd += ["--breakdown"] if data.get("breakdown") else []
    return [*cmd, "--task-args", json.dumps(data.get("task_args", {}))]


def anchor_cmd(name: str, python: Path, npz: Path, data: dict[str, Any]) -> list[str]:
    script = ANCHOR_DIR / f"{'pfl' if name == 'pfl' else 'flower'}_digits.py"
    cmd = [str(python.resolve()), str(script.resolve()), "--data", str(npz.resolve())]
    return [*cmd, "--rounds", str(data["rounds"]), "--per-round", str(data["per_round"]), "--actors", "2"]


def interleaved(runners: dict[str, list[str]], passes: int) -> dict[str, list[dict[str, Any]]]:
    """Every runner once per pass, in the same order each pass, so load drifts hit all of them."""
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in runners}
    for p in range(passes):
        for name, cmd in runners.items():
            res = run_child(cmd, cwd=ANCHOR_DIR if not name.startswith("gradcomp") else None)
            print(f"pass {p + 1}: {name}: {_brief(res)}", file=sys.stderr, flush=True)
            out[name].append(res)
    return out


def _brief(res: dict[str, Any]) -> str:
    if "error" in res:
        return "ERROR " + res["error"][-300:]
    return (
        f"{res['updates_per_second']} updates/s, wall {res['wall_seconds']} s, "
        f"peak {res['peak_rss_bytes'] / 2**20:.0f} MiB, accuracy {res['accuracy']}"
    )


def part_runs(clients: int, per_round: int, rounds: int, modes: list[str], passes: int, anchors: list[str]):
    """Interleaved runs of the task at one scale; (results per simulator, skipped anchors)."""
    data = {"clients": clients, "per_round": per_round, "rounds": rounds, "seed": 0, "task": "digits-mlp"}
    npz = BENCH_DIR / f"fl_anchors_{clients}.npz"
    write_task_data(npz, clients, seed=0)
    runners = {m: gradcomp_cmd(GRADCOMP_MODES[m], data) for m in modes}
    skipped = {}
    for name in anchors:
        python, message = ensure_anchor(name)
        if python is None:
            skipped[name] = message
            print(f"{name}: {message}", file=sys.stderr)
        else:
            runners[name] = anchor_cmd(name, python, npz, data)
    return interleaved(runners, passes), skipped


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, results in runs.items():
        ok = [r for r in results if "error" not in r]
        if not ok:
            out[name] = {"error": results[0]["error"] if results else "no run"}
            continue
        ups = [r["updates_per_second"] for r in ok]
        out[name] = {
            "updates_per_second": round(statistics.median(ups), 1),
            "updates_per_second_range": [min(ups), max(ups)],
            "wall_seconds_range": [min(r["wall_seconds"] for r in ok), max(r["wall_seconds"] for r in ok)],
            "peak_rss_bytes": max(r["peak_rss_bytes"] for r in ok),
            "peak_pss_bytes": max(r["peak_pss_bytes"] for r in ok),
            "accuracy": ok[0]["accuracy"],
            "passes": len(ok),
        }
    return out


def crossover(rounds: int) -> dict[str, Any]:
    """Vectorised vs sequential in the driver, per model: the speed-up, and where it falls under 1."""
    models = {
        "digits-mlp (9.6k params)": ("digits-mlp", {}),
        "digits-cnn (280k params)": ("digits-cnn", {}),
        "synthetic MLP (1M params)": ("synthetic", {"num_params": 1_000_000}),
    }
    out = {}
    for label, (task, task_args) in models.items():
        data = {"clients": 100, "per_round": 10, "rounds": rounds, "seed": 0, "task": task, "task_args": task_args}
        runs = interleaved({m: gradcomp_cmd(GRADCOMP_MODES[m], data) for m in GRADCOMP_MODES if "ray" not in m}, 1)
        seq, vec = (runs[m][0].get("updates_per_second") for m in ("gradcomp-sequential", "gradcomp-vectorised"))
        out[label] = {"sequential": seq, "vectorised": vec, "speedup": round(vec / seq, 2) if seq and vec else None}
    return out


def accuracy_seeds(rounds: int, seeds: int = 3) -> dict[str, Any]:
    """Test accuracy after `rounds` rounds, vectorised vs sequential, for several seeds."""
    acc: dict[str, list[float]] = {"gradcomp-sequential": [], "gradcomp-vectorised": []}
    for seed in range(seeds):
        data = {"clients": 100, "per_round": 10, "rounds": rounds, "seed": seed, "task": "digits-mlp"}
        for mode in acc:
            res = run_child(gradcomp_cmd(GRADCOMP_MODES[mode], data))
            if "error" in res:
                raise SystemExit(f"{mode}, seed {seed}: {res['error']}")
            acc[mode].append(res["accuracy"])
    means = {m: statistics.mean(v) for m, v in acc.items()}
    gap = abs(means["gradcomp-vectorised"] - means["gradcomp-sequential"]) * 100
    return {"per_seed": acc, "mean": means, "gap_points": round(gap, 3), "target_within_1_point": gap <= 1.0}


BREAKDOWN_RUNS = {  # label: (clients, per round, mode)
    "100 clients, vectorised in the driver": (100, 10, "gradcomp-vectorised"),
    "1000 clients / 100 per round, vectorised in the driver": (1000, 100, "gradcomp-vectorised"),
    "100 clients, sequential, 2 actors": (100, 10, "gradcomp-ray2-sequential"),
    "100 clients, vectorised, 2 actors": (100, 10, "gradcomp-ray2-vectorised"),
}


def breakdown(rounds: int, scale_rounds: int) -> dict[str, Any]:
    """Milliseconds per round of each part of a gradcomp round (gradcomp.sim.timing)."""
    out = {}
    for label, (clients, per_round_, mode) in BREAKDOWN_RUNS.items():
        n = rounds if clients == 100 else scale_rounds
        data = {"clients": clients, "per_round": per_round_, "rounds": n, "seed": 0, "task": "digits-mlp"}
        res = run_child(gradcomp_cmd(GRADCOMP_MODES[mode], {**data, "breakdown": True}))
        out[label] = {"updates_per_second": res.get("updates_per_second"), **res.get("breakdown", res)}
        print(f"breakdown: {label}: {out[label]}", file=sys.stderr, flush=True)
    probe = [sys.executable, str(Path(__file__).parent / "_ray_probe.py"), "--kib", "390", "--pieces", "10"]
    out["ray round trip, 2 idle actors, 10 x 39 kB back"] = run_child([*probe, "--actors", "2"])
    return out


def ten_x_budget(report: dict[str, Any]) -> dict[str, Any]:
    """What 10x pfl-research's updates/s leaves per round, against what the measured parts take."""
    out = {}
    for table, label, per_round_ in (
        ("task", "100 clients, vectorised in the driver", 10),
        ("scale", "1000 clients / 100 per round, vectorised in the driver", 100),
    ):
        pfl = report.get(table, {}).get("pfl", {}).get("updates_per_second")
        parts = report.get("breakdown", {}).get(label)
        if not pfl or not parts:
            continue
        out[label] = {
            "budget_ms_per_round_at_10x_pfl": round(per_round_ / (10 * pfl) * 1e3, 2),
            "steps_ms_per_round": parts.get("steps"),
            "per_client_work_ms_per_round": round(parts.get("build requests", 0) + parts.get("accept updates", 0), 2),
            "measured_ms_per_round": round(per_round_ / parts["updates_per_second"] * 1e3, 2),
        }
    return out


def paired_ratios(runs: dict[str, list[dict[str, Any]]], mine: str, theirs: str) -> list[float]:
    """mine / theirs updates/s within each pass (the two ran minutes apart, so machine drift mostly cancels)."""
    pairs = zip(runs.get(mine, []), runs.get(theirs, []), strict=False)
    return [
        round(a["updates_per_second"] / b["updates_per_second"], 2)
        for a, b in pairs
        if "error" not in a and "error" not in b
    ]


def targets(task: dict[str, Any], scale: dict[str, Any] | None, acc: dict[str, Any] | None) -> dict[str, Any]:
    """The targets set for the simulator against the anchors, each with the measured value and whether it is met."""

    def ups(table: dict[str, Any], name: str) -> float:
        return float(table.get(name, {}).get("updates_per_second") or math.nan)

    out: dict[str, Any] = {}
    vec, pfl = ups(task, "gradcomp-vectorised"), ups(task, "pfl")
    out["speedup_vs_pfl_100_clients"] = {"value": round(vec / pfl, 2), "target": 10, "met": vec / pfl >= 10}
    if scale is not None:
        s = ups(scale, "gradcomp-vectorised") / ups(scale, "pfl")
        out["speedup_vs_pfl_1000_clients"] = {"value": round(s, 2), "target": 10, "met": s >= 10}
    if "pfl" in task and "gradcomp-vectorised" in task:
        mine, theirs = task["gradcomp-vectorised"]["peak_rss_bytes"], task["pfl"]["peak_rss_bytes"]
        out["peak_memory_vs_pfl"] = {"value": round(mine / theirs, 3), "target": "<= 1", "met": mine <= theirs}
    for n in (1, 2):  # (updates/s with n actors) / (n x in-driver updates/s), same training path
        for path in ("sequential", "vectorised"):
            eff = ups(task, f"gradcomp-ray{n}-{path}") / (n * ups(task, f"gradcomp-{path}"))
            met = eff >= 0.8 if n == 2 else None
            out[f"pool_efficiency_{n}_actors_{path}"] = {"value": round(eff, 3), "target": 0.8, "met": met}
    if acc is not None:
        out["accuracy_gap_points"] = {"value": acc["gap_points"], "target": "<= 1", "met": acc["target_within_1_point"]}
    return out


def table(summary: dict[str, dict[str, Any]]) -> str:
    rows = []
    for name, s in summary.items():
        if "error" in s:
            rows.append([name, "error", "", "", ""])
            continue
        lo, hi = s["updates_per_second_range"]
        wl, wh = s["wall_seconds_range"]
        acc = f"{s['accuracy']:.3f}" if s["accuracy"] is not None else "-"
        mem = f"{s['peak_rss_bytes'] / 2**20:.0f} / {s['peak_pss_bytes'] / 2**20:.0f}"
        rows.append([name, f"{lo:.0f}-{hi:.0f}", f"{wl:.1f}-{wh:.1f}", mem, acc])
    headers = ["simulator", "steady updates/s", "wall s (whole process)", "peak MiB RSS / PSS (tree)", "accuracy"]
    return markdown_table(headers, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["anchors", "scale", "crossover", "accuracy", "breakdown"])
    parser.add_argument("--passes", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--scale-rounds", type=int, default=20)
    parser.add_argument("--crossover-rounds", type=int, default=8)
    parser.add_argument("--accuracy-seeds", type=int, default=3, help="seeds of the accuracy part")
    parser.add_argument("--anchors", nargs="*", default=["pfl", "flower"])
    parser.add_argument("--install-only", action="store_true")
    parser.add_argument("--out", default=None)
    parser.add_argument("--append", action="store_true", help="add these parts to an existing --out report")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--breakdown", action="store_true", help=argparse.SUPPRESS)
    for key, default in (("clients", 100), ("per-round", 10), ("seed", 0), ("actors", 0)):
        parser.add_argument(f"--{key}", type=int, default=default, help=argparse.SUPPRESS)
    for key, default in (("vectorize", "auto"), ("task", "digits-mlp"), ("task-args", "{}")):
        parser.add_argument(f"--{key}", default=default, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        gradcomp_worker(args)
        return 0
    BENCH_DIR.mkdir(parents=True, exist_ok=True)
    if args.install_only:
        for name in ANCHORS:
            print(f"{name}: {ensure_anchor(name)[1]}", file=sys.stderr)
        return 0
    report: dict[str, Any] = {"environment": environment(), "unfairness": UNFAIRNESS}
    if args.append and args.out and Path(args.out).exists():  # parts measured in separate lock holds
        report = json.loads(Path(args.out).read_text())
    load = os.getloadavg()
    report.update(run_parts(args))
    report.setdefault("load", {})[" ".join(args.parts)] = {"before": load, "after": os.getloadavg()}
    if "task" in report:
        report["targets"] = targets(report["task"], report.get("scale"), report.get("accuracy"))
        report["paired_speedups_vs_pfl"] = {
            part: paired_ratios(report[f"{part}_runs"], "gradcomp-vectorised", "pfl")
            for part in ("task", "scale")
            if f"{part}_runs" in report
        }
    report["ten_x_budget"] = ten_x_budget(report)
    write_json(args.out, report)
    for key in ("task_table", "scale_table"):
        if key in report:
            print(report[key], file=sys.stderr)
    return 0


def run_parts(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "anchors" in args.parts:
        runs, skipped = part_runs(100, 10, args.rounds, list(GRADCOMP_MODES), args.passes, args.anchors)
        task = summarise(runs)
        out.update(task=task, task_runs=runs, skipped=skipped, task_table=table(task))
    if "scale" in args.parts:
        modes = ["gradcomp-sequential", "gradcomp-vectorised"]
        anchors = [a for a in args.anchors if a == "pfl"]
        runs, skipped = part_runs(1000, 100, args.scale_rounds, modes, args.passes, anchors)
        scale = summarise(runs)
        out.update(scale=scale, scale_runs=runs, scale_table=table(scale))
    if "crossover" in args.parts:
        out["crossover"] = crossover(args.crossover_rounds)
    if "accuracy" in args.parts:
        out["accuracy"] = accuracy_seeds(args.rounds, args.accuracy_seeds)
    if "breakdown" in args.parts:
        out["breakdown"] = breakdown(args.rounds, args.scale_rounds)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
