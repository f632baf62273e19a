"""Compression speed and wire size per stage, as ratios to one pass over memory.

For n in {1M, 25M} float32 values and each spec: median compress time and
compress+decompress time divided by the time of `x.abs().sum()` (one memory pass),
both measured alternately in this process; bytes on the wire against dense.
`torch.topk` (the naive selection) is reported beside the fast selectors.

    python benchmarks/compress.py --out runs/bench/compress.json
Target (2-core CPU, n = 25M): topk(0.01) and rtopk(0.01, 0.05) compress <= 2x the pass.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import environment, markdown_table, ratio_to_baseline, write_json

from gradcomp.compression import build, dense_nbytes

SPECS = [
    "none",
    "topk(ratio=0.01)",
    "rtopk(ratio=0.01, r=0.05)",
    "randomk(ratio=0.01)",
    "topk(ratio=0.01) | ef",
    "rtopk(ratio=0.01, r=0.05) | ef",
    "unit",
    "dp(clip=1.0, sigma=1.0)",
    "fp16",
    "bf16",
    "qsgd(levels=127, bucket=512)",
    "qsgd(levels=7, bucket=512) | ef",
]
TARGETS = {"topk(ratio=0.01)": 2.0, "rtopk(ratio=0.01, r=0.05)": 2.0}


def bench_spec(x: torch.Tensor, spec: str, repeats: int) -> dict:
    """One row: a spec's compress and round-trip time as ratios to a memory pass over `x`."""
    n = x.numel()
    pipe = build(spec, seed=0)
    payload = pipe.compress(x, "bench")
    c_t, base, c_ratio = ratio_to_baseline(lambda: pipe.compress(x, "bench"), lambda: x.abs().sum(), repeats)
    r_t, _, r_ratio = ratio_to_baseline(
        lambda: pipe.decompress(pipe.compress(x, "bench")), lambda: x.abs().sum(), repeats
    )
    target = TARGETS.get(spec) if n >= 25_000_000 else None
    return {
        "n": n, "spec": spec, "compress_ratio": c_ratio, "compress_ms": c_t * 1e3,
        "roundtrip_ratio": r_ratio, "roundtrip_ms": r_t * 1e3, "memory_pass_ms": base * 1e3,
        "wire_bytes": payload.nbytes, "dense_bytes": dense_nbytes(tuple(x.shape), x.dtype),
        "target": target, "meets_target": None if target is None else c_ratio <= target,
    }  # fmt: skip


def bench_naive_topk(x: torch.Tensor, repeats: int) -> dict:
    """The baseline selector: `torch.topk` over all |x| at ratio 0.01."""
    k = max(1, round(0.01 * x.numel()))
    t, base, ratio = ratio_to_baseline(lambda: torch.topk(x.abs(), k, sorted=False), lambda: x.abs().sum(), repeats)
    return {
        "n": x.numel(), "spec": "torch.topk (naive, ratio=0.01)", "compress_ratio": ratio, "compress_ms": t * 1e3,
        "roundtrip_ratio": None, "memory_pass_ms": base * 1e3, "wire_bytes": None,
        "dense_bytes": dense_nbytes(tuple(x.shape), x.dtype), "target": None,
    }  # fmt: skip


def run(sizes: list[int], repeats: int) -> dict:
    results = []
    for n in sizes:
        x = torch.randn(n, generator=torch.Generator().manual_seed(n))
        results.append(bench_naive_topk(x, repeats))
        results.extend(bench_spec(x, spec, repeats) for spec in SPECS)
    return {"benchmark": "compress", "environment": environment(), "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 25_000_000])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=None, help="write the JSON here too")
    args = parser.parse_args()
    report = run(args.sizes, args.repeats)
    write_json(args.out, report)
    rows = [
        (
            f"{r['n']:,}",
            r["spec"].replace("|", "\\|"),
            round(r["compress_ratio"], 2),
            "" if r["roundtrip_ratio"] is None else round(r["roundtrip_ratio"], 2),
            "" if r["wire_bytes"] is None else f"{r['dense_bytes'] / r['wire_bytes']:.1f}x",
            "" if r["target"] is None else ("yes" if r["meets_target"] else "NO") + f" (<= {r['target']}x)",
        )
        for r in report["results"]
    ]
    print(
        markdown_table(["n", "spec", "compress / pass", "round trip / pass", "smaller than dense", "target"], rows),
        file=sys.stderr,
    )


if __name__ == "__main__":
    main()
