"""How compressed data-parallel SGD scales with the number of ranks: bytes per rank per step
and median step time at P = 2, 4 and 8 gloo ranks, for dense all-reduce, all-gather topk and
rtopk, leader mode (`share=leader`), shared-seed randomk and torch's PowerSGD.

All ranks run inside a network namespace this script creates (as root), its loopback left
unshaped or shaped to 100 Mbit/s with `tc tbf`; every rank's traffic crosses that one
device, so the shaped link is one shared 100 Mbit/s medium. Besides what the hook counts,
each step's bytes are read from the namespace's loopback counter (/proc/net/dev), so the
ring model (collectives.wire_bytes) is checked against what crossed the link. A computed
cost model (labelled as such) extends the per-rank bytes and time out to P = 1024.

    sudo python benchmarks/scaling.py --out runs/bench/scaling.json
Needs root plus `ip` and `tc`; otherwise it says so and exits 0 without numbers.
Targets: leader-mode bytes per rank at P = 8 within 1.1x of P = 2; at P = 8 over 100 Mbit/s
leader-mode rtopk steps at least 2x faster than all-gather rtopk.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, markdown_table, write_json
from _netns import benchmark_parser, driver_args, lo_tx_bytes, namespace, worker_result

SPECS = {
    "dense": "none",
    "topk gather": "topk(ratio=0.01) | ef",
    "rtopk gather": "rtopk(ratio=0.01, r=0.05) | ef",
    "topk leader": "topk(ratio=0.01, share=leader) | ef",
    "rtopk leader": "rtopk(ratio=0.01, r=0.05, share=leader) | ef",
    "randomk": "randomk(ratio=0.01) | ef",
    "powersgd(rank=4)": "powersgd(rank=4, start_iter=2)",
}
LINKS = ("loopback", "100mbit")
MODEL_RANKS = (2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
MODEL_LINK_BPS = 100e6  # the cost model's per-rank link
MODEL_LATENCY_S = 100e-6  # and its per-message latency (one LAN hop)


# --- worker (runs inside the namespace) ---------------------------------------------------------


def _barrier_bytes(dist: Any, rank: int) -> float:
    """Loopback bytes one barrier costs (subtracted from each step's measurement)."""
    dist.barrier()
    before = lo_tx_bytes()
    for _ in range(20):
        dist.barrier()
    return (lo_tx_bytes() - before) / 20


def _timed_steps(args: argparse.Namespace, runs: dict[str, Any], data: tuple[Any, Any]) -> dict[str, Any]:
    """Each spec's step times, loopback bytes and hook traffic over its timed steps."""
    import torch.distributed as dist
    from torch import nn

    x_all, y_all = data
    per_barrier = _barrier_bytes(dist, args.rank)
    seen: dict[str, dict[str, Any]] = {n: {"times": [], "lo": [], "handed": {}, "dense": 0} for n in runs}
    warmup = args.warmup + 2  # PowerSGD's two dense iterations (start_iter=2) stay out of the timed ones
    steps = range(warmup + args.steps)
    order = [(s, n) for s in steps for n in runs] if args.interleave else [(s, n) for n in runs for s in steps]
    for step, name in order:
        model, state, opt = runs[name]
        lo = (step * 8 * args.world + args.rank * 8) % (len(x_all) - 8)
        dist.barrier()
        tx0, t0 = lo_tx_bytes(), time.perf_counter()
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x_all[lo : lo + 8]), y_all[lo : lo + 8]).backward()
        opt.step()
        dt = time.perf_counter() - t0
        dist.barrier()
        tx = lo_tx_bytes() - tx0 - per_barrier
        traffic = state.take_traffic()
        if step < warmup:
            continue
        rec = seen[name]
        rec["times"].append(dt)
        rec["lo"].append(tx)
        rec["dense"] = traffic.dense_bytes
        for kind, nbytes in traffic.by_collective.items():
            rec["handed"][kind] = rec["handed"].get(kind, 0) + nbytes
    return {"per_barrier": per_barrier, "seen": seen}


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist
    from torch import nn

    from gradcomp.tasks import load_task
    from gradcomp.worker.collectives import wire_bytes
    from gradcomp.worker.hook import register
    from gradcomp.worker.local_group import end_rank

    torch.set_num_threads(1)
    init = f"tcp://127.0.0.1:{args.port}"
    dist.init_process_group("gloo", init_method=init, rank=args.rank, world_size=args.world)
    task = load_task("synthetic", num_params=args.params, num_examples=1024)
    runs = {}
    for name in args.specs:
        torch.manual_seed(0)
        model = nn.parallel.DistributedDataParallel(task.make_model())
        runs[name] = (model, register(model, SPECS[name], seed=args.rank), torch.optim.SGD(model.parameters(), lr=0.01))
    timed = _timed_steps(args, runs, task.train_set.tensors)  # type: ignore[attr-defined]
    out: dict[str, Any] = {"parameters": task.info["num_params"], "barrier_bytes": timed["per_barrier"]}
    for name, rec in timed["seen"].items():
        kinds = ("allreduce", "allgather", "broadcast")
        mine = torch.tensor([rec["handed"].get(k, 0) for k in kinds], dtype=torch.float64)
        dist.all_reduce(mine)  # the average over ranks: the leader's broadcast rotates
        handed = {k: float(v) / args.world / args.steps for k, v in zip(kinds, mine.tolist(), strict=True) if v}
        out[name] = {
            "spec": SPECS[name],
            "step_seconds": statistics.median(rec["times"]),
            "all_steps": rec["times"],
            "handed_per_rank": handed,
            "model_bytes_per_rank": wire_bytes(handed, args.world),
            "measured_bytes_per_rank": statistics.median(rec["lo"]) / args.world,
            "dense_bytes": rec["dense"],
        }
    if args.rank == 0:
        Path(args.result).write_text(json.dumps(out))
    end_rank()


# --- driver --------------------------------------------------------------------------------------


def run_cell(link: str, world: int, args: argparse.Namespace, port: int) -> dict[str, Any]:
    steps = args.slow_steps if link == "100mbit" else args.steps
    with namespace(link, "gradcomp-scale") as inside, tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        common = ["--worker", "--world", str(world), "--port", str(port), "--params", str(args.params)]
        common += ["--steps", str(steps), "--warmup", str(args.warmup), "--result", str(result)]
        common += ["--specs", *args.specs, *(["--interleave"] if link == "loopback" else [])]
        procs = [subprocess.Popen([*inside, sys.executable, __file__, *common, "--rank", str(r)]) for r in range(world)]
        return worker_result(f"{link}, P={world}", procs, result, args.timeout)


def _rounds(kind: str, world: int) -> int:
    """Messages in a row one rank waits for: ring all-reduce / all-gather, binomial broadcast."""
    return {"allreduce": 2 * (world - 1), "allgather": world - 1, "broadcast": math.ceil(math.log2(world))}[kind]


def cost_model(measured: dict[str, Any], world0: int) -> dict[str, list[dict[str, float]]]:
    """Per-rank bytes and step communication time out to P = 1024, computed (not measured)
    from the bytes each rank handed to each collective at P = world0. Only the leader's
    broadcast changes with P (one rank in P sends the positions); the rest is P-free."""
    from gradcomp.worker.collectives import wire_bytes

    out: dict[str, list[dict[str, float]]] = {}
    for name in measured:
        if not isinstance(measured[name], dict) or "handed_per_rank" not in measured[name]:
            continue
        handed = dict(measured[name]["handed_per_rank"])
        positions = handed.pop("broadcast", 0.0) * world0  # per step, from one rank
        rows = []
        for world in MODEL_RANKS:
            h = handed | ({"broadcast": positions / world} if positions else {})
            nbytes = wire_bytes(h, world)
            latency = MODEL_LATENCY_S * sum(_rounds(kind, world) for kind in h)
            rows.append({"ranks": world, "bytes_per_rank": nbytes, "seconds": nbytes * 8 / MODEL_LINK_BPS + latency})
        out[name] = rows
    return out


def _targets(results: dict[str, dict[int, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    loop = results.get("loopback", {})
    if 2 in loop and 8 in loop and "rtopk leader" in loop[2]:
        a, b = loop[2]["rtopk leader"], loop[8]["rtopk leader"]
        out["leader_bytes_p8_over_p2"] = {
            "handed_to_collectives": round(sum(b["handed_per_rank"].values()) / sum(a["handed_per_rank"].values()), 3),
            "ring_model_on_the_wire": round(b["model_bytes_per_rank"] / a["model_bytes_per_rank"], 3),
            "measured_on_loopback": round(b["measured_bytes_per_rank"] / a["measured_bytes_per_rank"], 3),
            "target": "<= 1.1",
        }
    shaped = results.get("100mbit", {}).get(8, {})
    if "rtopk leader" in shaped and "rtopk gather" in shaped:
        speedup = shaped["rtopk gather"]["step_seconds"] / shaped["rtopk leader"]["step_seconds"]
        out["leader_speedup_p8_100mbit"] = {"value": round(speedup, 2), "target": ">= 2", "met": speedup >= 2}
    return out


def _tables(results: dict[str, dict[int, Any]], model: dict[str, list[dict[str, float]]], specs: list[str]) -> str:
    worlds = sorted({w for cells in results.values() for w in cells})
    loop = results.get("loopback", {})
    rows = []
    for name in specs:
        row = [name]
        for w in worlds:
            r = loop.get(w, {}).get(name)
            row.append(
                f"{r['model_bytes_per_rank'] / 1024:.0f} / {r['measured_bytes_per_rank'] / 1024:.0f}" if r else ""
            )
        rows.append(row)
    text = "bytes per rank per step, KiB (ring model / measured on the loopback)\n"
    text += markdown_table(["spec", *(f"P={w}" for w in worlds)], rows)
    cells = [(link, w) for link in results for w in sorted(results[link])]
    rows = [[name] + [f"{results[link][w][name]['step_seconds']:.3f}" for link, w in cells] for name in specs]
    heads = [f"{link} P={w}" for link, w in cells]
    text += "\n\nmedian step seconds\n" + markdown_table(["spec", *heads], rows)
    picks = (8, 64, 1024)
    rows = []
    for name, cells in model.items():
        at = {c["ranks"]: c for c in cells}
        rows.append([name] + [f"{at[p]['bytes_per_rank'] / 2**20:.2f} MiB, {at[p]['seconds']:.3f} s" for p in picks])
    text += "\n\nCOMPUTED cost model (100 Mbit/s per rank, 100 us per message; not measured)\n"
    text += markdown_table(["spec", *(f"P={p}" for p in picks)], rows)
    return text


def main() -> None:
    parser = benchmark_parser(
        __doc__.split("\n\n")[0], params=2_000_000, slow_steps=3, links=LINKS, specs=SPECS, port=29612
    )
    parser.add_argument("--ranks", nargs="*", type=int, default=[2, 4, 8])
    args = driver_args(parser, "scaling", worker)
    if args is None:
        return
    start = time.perf_counter()
    results: dict[str, dict[int, Any]] = {}
    for i, link in enumerate(args.links):
        for j, world in enumerate(args.ranks):
            cell = run_cell(link, world, args, 29612 + 10 * i + j)
            results.setdefault(link, {})[world] = cell
            print(
                f"{link} P={world}: " + ", ".join(f"{s} {cell[s]['step_seconds']:.3f}s" for s in args.specs), flush=True
            )
    first = results[args.links[0]][min(args.ranks)]
    model = cost_model(first, min(args.ranks))
    payload = {
        "benchmark": "scaling",
        "settings": {
            "parameters": first["parameters"],
            "batch_per_rank": 8,
            "cost_model": {"link_bits_per_s": MODEL_LINK_BPS, "latency_s": MODEL_LATENCY_S, "computed": True},
            **{k: v for k, v in vars(args).items() if k not in ("worker", "rank", "world", "port", "result")},
        },
        "environment": environment(),
        "results": results,
        "cost_model": model,
        "targets": _targets(results),
        "seconds": round(time.perf_counter() - start, 1),
    }
    write_json(args.out, payload)
    print()
    print(_tables(results, model, args.specs))
    for name, t in payload["targets"].items():
        print(f"{name}: {t}")


if __name__ == "__main__":
    main()
