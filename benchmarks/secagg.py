"""Cost of SecAgg+ against the plaintext upload: bytes per client and CPU per round.

One in-process round per (n, d, dropout) with the real client and coordinator state machines
(`gradcomp.secagg.simulate.run_round`): X25519, AES-GCM, Shamir, AES-CTR masks, every message
through its byte encoding. Dropped clients leave after sending their shares, the costliest point
for the coordinator (it rebuilds their mask keys and regenerates their pairwise masks).

- Bytes: every secure-aggregation message a client sends and receives (advertise, shares relayed both
  ways, masked input, unmasking), exact encoded sizes, before gRPC framing; against the plaintext
  update, gradcomp's dense float32 payload of d values (`dense_nbytes`). The global model's download is
  the same in both and left out of both.
- CPU (process time, one thread): a client's whole round, quantisation included (also timed alone),
  against encoding its float32 update for the wire; the coordinator's round against decoding n
  plaintext updates and summing them.

    python benchmarks/secagg.py --out runs/bench/secagg.json
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, markdown_table, write_json

from gradcomp.compression import wire
from gradcomp.compression.kinds import Dense
from gradcomp.keyed_random import KeyedStream, new_key
from gradcomp.secagg.params import settings_for
from gradcomp.secagg.quantise import Quantiser, check_no_wrap
from gradcomp.secagg.simulate import RoundReport, run_round

CLIP = 1.0


class _Updates(Mapping[int, np.ndarray]):
    """Each client's quantised update, made when the protocol reads it (inside the client's timed call)."""

    def __init__(self, n: int, base: np.ndarray, quantiser: Quantiser):
        self.n, self.base, self.q = n, base, quantiser

    def __getitem__(self, cid: int) -> np.ndarray:
        return self.q.encode(self.base, KeyedStream(new_key()))

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.n))

    def __len__(self) -> int:
        return self.n


def _scale_for(n: int, bits: int) -> float:
    """The largest power-of-two gamma at which n clients' sum cannot wrap."""
    gamma = 2.0 ** math.floor(math.log2((2.0 ** (bits - 1) / n - 1) / CLIP))
    check_no_wrap(n, CLIP, gamma, bits)
    return gamma


def _plaintext(n: int, base: np.ndarray) -> tuple[int, float, float]:
    """(upload bytes, one client's CPU to encode, the coordinator's CPU to decode n and sum)."""
    values = torch.from_numpy(base.astype(np.float32))
    payload = Dense(values=values, shape=(len(base),), dtype=torch.float32)
    start = time.process_time()
    data = wire.encode(payload)
    client = time.process_time() - start
    start = time.process_time()
    total = torch.zeros(len(base))
    for _ in range(n):
        total += wire.decode(data).values
    return len(data), client, time.process_time() - start


def _per_client(report: RoundReport, finished: list[int]) -> dict[str, float]:
    """Mean bytes per finishing client, by phase and direction."""
    row = {}
    for way, table in (("up", report.up), ("down", report.down)):
        for phase, sizes in table.items():
            row[f"{phase}_{way}"] = statistics.fmean(sizes[c] for c in finished if c in sizes)
    return row


def bench(n: int, d: int, dropout: float, bits: int) -> dict:
    params = settings_for(n, bits, dropout)
    quantiser = Quantiser(CLIP, _scale_for(n, bits), bits)
    base = np.random.default_rng(0).normal(size=d) / math.sqrt(d)
    dropped = round(dropout * n)
    completes = {c: 2 for c in range(dropped)}
    report = run_round(_Updates(n, base, quantiser), params, completes, dim=d)
    if report.aborted:
        return {"n": n, "d": d, "dropout": dropout, "aborted": report.aborted}
    finished = [c for c in range(n) if c >= dropped]
    plain_bytes, plain_client, plain_server = _plaintext(n, base)
    start = time.process_time()
    quantiser.encode(base, KeyedStream(new_key()))
    quantise_cpu = time.process_time() - start
    row = _per_client(report, finished)
    secagg_bytes = sum(row.values())
    client_cpu = statistics.fmean(report.client_seconds[c] for c in finished)
    server_cpu = sum(report.server_seconds.values())
    return {
        "n": n, "d": d, "dropout": dropout, "dropped": dropped, "bits": bits,
        "degree": params.degree, "threshold": params.threshold, "scale": quantiser.scale,
        "bytes": {k: round(v, 1) for k, v in row.items()},
        "secagg_bytes_per_client": round(secagg_bytes, 1), "plaintext_bytes_per_client": plain_bytes,
        "bytes_ratio": round(secagg_bytes / plain_bytes, 4),
        "client_cpu_s": round(client_cpu, 5), "of_which_quantise_s": round(quantise_cpu, 5),
        "plaintext_client_cpu_s": round(plain_client, 6),
        "server_cpu_s": round(server_cpu, 4), "plaintext_server_cpu_s": round(plain_server, 5),
        "server_cpu_by_phase_s": {k: round(v, 5) for k, v in report.server_seconds.items()},
        "server_us_per_n_log2n_d": round(1e6 * server_cpu / (n * math.log2(n) * d), 5),
    }  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--d", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--dropout", type=float, nargs="+", default=[0.0, 0.1, 0.3])
    parser.add_argument("--bits", type=int, default=32)
    parser.add_argument("--max-work", type=float, default=1e8, help="skip cells with n * d above this")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cells = [(n, d, p) for n in args.n for d in args.d for p in args.dropout if n * d <= args.max_work]
    rows = []
    for n, d, p in cells:
        rows.append(bench(n, d, p, args.bits))
        print(rows[-1], file=sys.stderr, flush=True)
    done = [r for r in rows if "aborted" not in r]
    print(markdown_table(
        ["n", "d", "dropout", "k", "t", "bytes/client", "x plaintext", "client CPU s", "plain client s",
         "server CPU s", "plain server s"],
        [[r["n"], r["d"], r["dropout"], r["degree"], r["threshold"], r["secagg_bytes_per_client"], r["bytes_ratio"],
          r["client_cpu_s"], r["plaintext_client_cpu_s"], r["server_cpu_s"], r["plaintext_server_cpu_s"]]
         for r in done]), file=sys.stderr)  # fmt: skip
    write_json(args.out, {"environment": environment(), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
