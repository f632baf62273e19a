"""Cost of secret DP noise: Gaussian draws from gradcomp's keyed AES-256-CTR stream against torch.randn.

Every DP release (a local-DP client update, a DP-SGD step) draws its noise from
`keyed_random.KeyedStream` under a key the adversary does not hold, instead of a torch generator
(whose CPU seed keeps only 32 bits). This measures what that costs, as a ratio to `torch.randn`
with a seeded generator, both timed alternately in this process (medians), at sizes from a small
model to a large one.

    python benchmarks/noise.py --out runs/bench/noise.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, markdown_table, ratio_to_baseline, write_json

from gradcomp.keyed_random import KeyedStream, new_key

SIZES = [10_000, 1_000_000, 25_000_000]


def bench_size(n: int, repeats: int) -> dict[str, float]:
    stream, gen = KeyedStream(new_key()), torch.Generator().manual_seed(0)
    keyed = lambda: stream.normal((n,), torch.float32, "cpu")  # noqa: E731
    plain = lambda: torch.randn(n, generator=gen)  # noqa: E731
    ours, base, ratio = ratio_to_baseline(keyed, plain, repeats)
    return {"n": n, "keyed_ms": round(ours * 1e3, 3), "torch_randn_ms": round(base * 1e3, 3), "ratio": round(ratio, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=SIZES)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # one thread for both: the stream is single-threaded
    rows = [bench_size(n, args.repeats) for n in args.sizes]
    print(markdown_table(["values", "keyed stream (ms)", "torch.randn (ms)", "ratio"],
                         [[r["n"], r["keyed_ms"], r["torch_randn_ms"], r["ratio"]] for r in rows]))  # fmt: skip
    write_json(args.out, {"environment": environment(), "threads": 1, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
