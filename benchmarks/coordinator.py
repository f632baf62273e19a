"""Coordinator throughput: updates/second accepted and aggregated from many concurrent clients.

A real gRPC coordinator on 127.0.0.1 (in this process) and `--clients` threads, each with its
own channel, submitting a precomputed update for a `--params`-parameter model every round
(no local training: this measures the coordinator). Dense vs rtopk(0.01) updates. Reports
updates/s (accepted and aggregated over the whole run), p50/p99 SubmitUpdate latency and
peak RSS. Prints JSON (and writes --out) plus a short table; ratios are against dense in
the same run.

    python benchmarks/coordinator.py --clients 50 --params 1000000 --rounds 3 --out runs/bench/coordinator.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import torch

from gradcomp import metrics
from gradcomp._proto import fed_pb2, fed_pb2_grpc
from gradcomp.compression import build, to_fields
from gradcomp.config.fed import FedJob
from gradcomp.protocol.channel import message_options
from gradcomp.protocol.codec import fields_to_pb
from gradcomp.protocol.messages import PROTOCOL_VERSION
from gradcomp.server.app import round_loop, start


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_case(spec: str, clients: int, num_params: int, rounds: int, tmp: Path) -> dict:
    tokens = {f"c{i}": f"token-{i:08d}" for i in range(clients)}
    os.environ["GRADCOMP_BENCH_TOKENS"] = ",".join(f"{n}={t}" for n, t in tokens.items())
    job = FedJob.model_validate(
        {
            "name": f"bench-{spec.split('(')[0]}",
            "task": {"name": "synthetic", "args": {"num_params": num_params, "num_examples": 64}},
            "rounds": rounds,
            "clients": {"expected": clients, "min": clients},
            "round": {"min_clients": clients, "deadline_seconds": 300},
            "compression": spec,
            "limits": {"max_message_bytes": 64 << 20, "max_update_bytes": 32 << 20, "chunk_bytes": 4 << 20},
            "server": {"port": 0, "tokens_env": "GRADCOMP_BENCH_TOKENS", "heartbeat_seconds": 60, "linger_seconds": 0},
        }
    )
    run = start(job, tmp / job.name)
    stop = threading.Event()
    loop = threading.Thread(target=round_loop, args=(run, stop, False), daemon=True)
    loop.start()
    # One precomputed compressed update per client (different EF state per client is irrelevant here).
    pipe = build(spec, seed=0)
    gen = torch.Generator().manual_seed(0)
    template = fed_pb2.SubmitUpdateRequest(num_examples=100)
    for name, p in run.coord.params.items():
        nt = template.update.add(name=name)
        fields_to_pb(to_fields(pipe.compress(torch.randn(p.shape, generator=gen) * 1e-3, key=name)), nt.tensor)
    update_bytes = template.ByteSize()
    latencies: list[float] = []
    lock = threading.Lock()
    barrier = threading.Barrier(clients + 1)
    errors: list[str] = []

    def client(name: str, token: str) -> None:
        md = (("authorization", f"Bearer {token}"),)
        ch = grpc.insecure_channel(f"127.0.0.1:{run.port}", options=message_options(job.limits.max_message_bytes))
        stub = fed_pb2_grpc.CoordinatorStub(ch)
        try:
            stub.Join(fed_pb2.JoinRequest(protocol_version=PROTOCOL_VERSION), metadata=md, timeout=60)
        except grpc.RpcError as err:
            errors.append(f"{name}: join: {err.code().name} {err.details()}")
            barrier.abort()  # else the driver waits for this client forever
            return
        barrier.wait()
        req = fed_pb2.SubmitUpdateRequest()
        req.CopyFrom(template)
        done_rounds = 0
        while done_rounds < rounds:
            task = stub.PullTask(fed_pb2.PullTaskRequest(), metadata=md, timeout=60)
            if task.action == fed_pb2.PullTaskResponse.DONE:
                break
            if task.action != fed_pb2.PullTaskResponse.TRAIN:
                time.sleep(0.01)
                continue
            req.round = task.round
            t0 = time.perf_counter()
            try:
                stub.SubmitUpdate(req, metadata=md, timeout=120)
            except grpc.RpcError as err:
                errors.append(f"{name}: {err.code().name} {err.details()}")
                break
            with lock:
                latencies.append(time.perf_counter() - t0)
            done_rounds += 1
        ch.close()

    threads = [threading.Thread(target=client, args=item, daemon=True) for item in tokens.items()]
    for t in threads:
        t.start()
    accepted0 = metrics.value("gradcomp_fed_updates_accepted_total")
    agg0 = metrics.value("gradcomp_fed_aggregate_duration_seconds_sum")
    try:
        barrier.wait()
    except threading.BrokenBarrierError:
        stop.set()
        run.stop(0)
        raise SystemExit(f"a client could not join: {errors[0]}") from None
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    while not run.coord.done and time.perf_counter() - t0 < 600:
        time.sleep(0.01)
    wall = time.perf_counter() - t0
    stop.set()
    loop.join(5)
    run.stop(0)
    accepted = metrics.value("gradcomp_fed_updates_accepted_total") - accepted0
    lat = sorted(latencies)
    return {
        "spec": spec,
        "clients": clients,
        "params": sum(p.numel() for p in run.coord.params.values()),
        "rounds": run.coord.version,
        "update_message_bytes": update_bytes,
        "updates_accepted": int(accepted),
        "wall_seconds": round(wall, 3),
        "updates_per_second": round(accepted / wall, 2),
        "submit_p50_ms": round(1000 * statistics.median(lat), 2) if lat else None,
        "submit_p99_ms": round(1000 * lat[min(len(lat) - 1, int(0.99 * len(lat)))], 2) if lat else None,
        "aggregate_seconds_total": round(metrics.value("gradcomp_fed_aggregate_duration_seconds_sum") - agg0, 4),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "errors": errors[:5],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--params", type=int, default=1_000_000)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--specs", nargs="+", default=["none", "rtopk(ratio=0.01, r=0.05)"])
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.specs:
            results.append(run_case(spec, args.clients, args.params, args.rounds, Path(tmp)))
    base = results[0]["updates_per_second"] or 1.0
    for r in results:
        r["speedup_vs_first"] = round(r["updates_per_second"] / base, 2)
    report = {"benchmark": "coordinator", "cpu_count": os.cpu_count(), "results": results}
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"\n{'spec':<28}{'upd/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'msg KiB':>10}{'RSS MiB':>9}")
    for r in results:
        print(
            f"{r['spec']:<28}{r['updates_per_second']:>9}{r['submit_p50_ms']:>9}{r['submit_p99_ms']:>9}"
            f"{r['update_message_bytes'] / 1024:>10.1f}{r['peak_rss_mib']:>9}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
