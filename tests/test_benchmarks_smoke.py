"""Every benchmark script runs its smallest setting and writes JSON that parses.

Benchmarks are run rarely and by hand, so an import moved or a protocol bump in the package breaks
them silently; this runs each `benchmarks/*.py` (not the `_` helpers) as its own process, the way
a person would, with the smallest arguments its command line takes. The namespace benchmarks
(bandwidth, scaling, workloads image) need root and iproute2; elsewhere they are skipped with their own reason.
fl_anchors runs a gradcomp-only part with no anchors, so nothing is installed (2 rounds: its
throughput is measured after the first).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
NETNS = "--params 1000 --steps 1 --slow-steps 1 --warmup 0 --links loopback --specs dense"

# script (and sub-command) -> (arguments before --out, pytest marks)
SMALLEST: dict[str, tuple[str, list[pytest.MarkDecorator]]] = {
    "compress.py": ("--sizes 1000 --repeats 1", []),
    "noise.py": ("--sizes 1000 --repeats 1 --discrete-n 100 --sigma-sq 4", []),
    "client_timing.py": ("--sizes 64 --steps 1 --repeats 1", []),
    "secagg.py": ("--n 3 --d 10 --dropout 0.0", []),
    "coordinator.py": ("--clients 2 --params 1000 --rounds 1 --specs none", [pytest.mark.server]),
    "onerun_audit.py": ("--epochs 1 --canaries 10 --runs 1", []),
    "robustness.py": ("--clients 3 --seeds 0 --rounds 1 --aggregators fedavg", []),
    "train_digits.py": ("--epochs 1 --only dense --batch-size 64", []),
    "workloads.py dp": ("dp --size tiny --max-bytes 20000 --seeds 0 --world 2 --warmup 1 --only dense", []),
    "workloads.py fed": (
        "fed --size tiny --max-bytes 20000 --seeds 0 --clients 4 --per-round 2 --rounds 1 --only 'fedavg dense'",
        [],
    ),
    "workloads.py image": (f"image {NETNS} --repeats 1 --depth 8 --width 4", []),
    "bandwidth.py": (NETNS, []),
    "scaling.py": (f"{NETNS} --ranks 2", []),
    "fl_anchors.py": ("--parts accuracy --accuracy-seeds 1 --rounds 2 --anchors", []),
    "fedsim.py": ("--clients 10 --updates 1 --actors 1", [pytest.mark.ray]),
}
# scripts whose smallest setting another test already runs (and checks more closely)
COVERED_ELSEWHERE = {"ddp_utility.py": "tests/test_bench_ddp_utility.py"}


def _netns_skip_reason() -> str | None:
    sys.path.insert(0, str(BENCH))
    try:
        from _netns import skip_reason
    finally:
        sys.path.remove(str(BENCH))
    return skip_reason()


def test_every_benchmark_has_a_smallest_setting() -> None:
    scripts = {p.name for p in BENCH.glob("*.py") if not p.name.startswith("_")}
    assert all((ROOT / test).exists() for test in COVERED_ELSEWHERE.values())
    covered = {key.split()[0] for key in SMALLEST} | set(COVERED_ELSEWHERE)
    assert scripts == covered, "give a new benchmark its smallest setting here"


@pytest.mark.slow
@pytest.mark.parametrize(
    "key", [pytest.param(key, marks=marks, id=key.replace(" ", "-")) for key, (_, marks) in SMALLEST.items()]
)
def test_benchmark_runs_its_smallest_setting(key: str, tmp_path: Path) -> None:
    script, (args, _) = key.split()[0], SMALLEST[key]
    if (script in ("bandwidth.py", "scaling.py") or key == "workloads.py image") and (
        reason := _netns_skip_reason()
    ) is not None:
        pytest.skip(f"{script}: {reason}")
    out = tmp_path / "out.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run(
        [sys.executable, str(BENCH / script), *shlex.split(args), "--out", str(out)],
        cwd=tmp_path,  # anything a benchmark writes next to it (runs/bench/...) stays in tmp_path
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, f"{key} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    report = json.loads(out.read_text())
    assert isinstance(report, dict) and report
    assert "skipped" not in report, report.get("skipped")  # a skip is reported above, not passed off as a run
