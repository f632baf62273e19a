"""Cost of secret DP noise: Gaussian draws from gradcomp's keyed AES-256-CTR stream against torch.randn.

Every DP release (a local-DP client update, a DP-SGD step) draws its noise from
`keyed_random.KeyedStream` under a key the adversary does not hold, instead of a torch generator
(whose CPU seed keeps only 32 bits). This measures what that costs, as a ratio to `torch.randn`
with a seeded generator, both timed alternately in this process (medians), at sizes from a small
model to a large one; and the exact discrete Gaussian sampler (`KeyedStream.discrete_gaussian`, the
noise distributed DP draws) in draws per second at several sigma^2.

    python benchmarks/noise.py --out runs/bench/noise.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, markdown_table, ratio_to_baseline, timed, write_json

from gradcomp.keyed_random import KeyedStream, new_key

SIZES = [10_000, 1_000_000, 25_000_000]
SIGMA_SQ = [1, 100, 10_000, 1_000_000, 10**8, 10**10]  # sigma 1 .. 1e5 (above ~3e3: Python-integer path)


def bench_size(n: int, repeats: int) -> dict[str, float]:
    stream, gen = KeyedStream(new_key()), torch.Generator().manual_seed(0)
    keyed = lambda: stream.normal((n,), torch.float32, "cpu")  # noqa: E731
    plain = lambda: torch.randn(n, generator=gen)  # noqa: E731
    ours, base, ratio = ratio_to_baseline(keyed, plain, repeats)
    return {"n": n, "keyed_ms": round(ours * 1e3, 3), "torch_randn_ms": round(base * 1e3, 3), "ratio": round(ratio, 2)}


def bench_discrete(sigma_sq: int, n: int, repeats: int) -> dict[str, float]:
    stream = KeyedStream(new_key())
    seconds = statistics.median(timed(lambda: stream.discrete_gaussian(n, sigma_sq)) for _ in range(repeats))
    return {"sigma_sq": sigma_sq, "n": n, "seconds": round(seconds, 4), "draws_per_s": round(n / seconds)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=SIZES)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--discrete-n", type=int, default=100_000, help="discrete Gaussian draws per timing")
    parser.add_argument("--sigma-sq", type=int, nargs="*", default=SIGMA_SQ)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one thread for both: the stream is single-threaded
    rows = [bench_size(n, args.repeats) for n in args.sizes]
    print(markdown_table(["values", "keyed stream (ms)", "torch.randn (ms)", "ratio"],
                         [[r["n"], r["keyed_ms"], r["torch_randn_ms"], r["ratio"]] for r in rows]))  # fmt: skip
    discrete = [bench_discrete(s, args.discrete_n, max(1, args.repeats // 2)) for s in args.sigma_sq]
    print(markdown_table(["sigma^2", "draws", "seconds", "draws/s"],
                         [[d["sigma_sq"], d["n"], d["seconds"], d["draws_per_s"]] for d in discrete]))  # fmt: skip
    write_json(args.out, {"environment": environment(), "threads": 1, "rows": rows, "discrete_gaussian": discrete})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
