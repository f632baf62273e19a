"""A throw-away network namespace whose loopback is optionally shaped with `tc tbf`: every
rank of a benchmark runs inside it, so all their traffic crosses that one device."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
from argparse import SUPPRESS
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from _common import write_json

# link name -> tbf rate and burst (burst must exceed the loopback MTU of 64 KiB)
SHAPES: dict[str, tuple[str, str] | None] = {
    "loopback": None,
    "1gbit": ("1gbit", "2mb"),
    "100mbit": ("100mbit", "512kb"),
}


def skip_reason() -> str | None:
    """Why namespaces cannot be made here (None when they can)."""
    if os.name != "posix" or os.geteuid() != 0:
        return "needs root (creates a network namespace and shapes it with tc)"
    missing = [tool for tool in ("ip", "tc") if shutil.which(tool) is None]
    if missing:
        return f"needs {' and '.join(missing)} (iproute2) on PATH"
    return None


def sh(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True, text=True)


@contextlib.contextmanager
def namespace(link: str, tag: str = "gradcomp") -> Iterator[list[str]]:
    """Create the namespace, shape its loopback for `link`; yields the command prefix that
    runs a program inside it; deletes the namespace on exit."""
    ns = f"{tag}-{os.getpid()}"
    sh("ip", "netns", "add", ns)
    try:
        sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        shape = SHAPES[link]
        if shape is not None:
            rate, burst = shape
            tbf = ["tbf", "rate", rate, "burst", burst, "latency", "100ms"]
            sh("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", "lo", "root", *tbf)
        yield ["ip", "netns", "exec", ns]
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)


def lo_tx_bytes() -> int:
    """Bytes the loopback of this process's namespace has transmitted (headers included)."""
    with open("/proc/net/dev") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name.strip() == "lo":
                return int(rest.split()[8])
    raise RuntimeError("no lo in /proc/net/dev")


def worker_result(what: str, procs: Sequence[subprocess.Popen], result: Path, timeout: float) -> Any:
    """Wait for the rank processes of one measurement; their JSON result (RuntimeError naming `what` if any failed)."""
    codes = [p.wait(timeout=timeout) for p in procs]
    if any(codes):
        raise RuntimeError(f"{what}: workers exited with {codes}")
    return json.loads(result.read_text())


def benchmark_parser(
    description: str, *, params: int, slow_steps: int, links: Sequence[str], specs: Sequence[str], port: int
) -> argparse.ArgumentParser:
    """The options the namespace benchmarks share, with the hidden ones their workers get."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--params", type=int, default=params)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per spec on the faster links")
    parser.add_argument("--slow-steps", type=int, default=slow_steps, help="timed steps per spec at 100 Mbit/s")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--links", nargs="*", default=list(links), choices=list(links))
    parser.add_argument("--specs", nargs="*", default=list(specs), choices=list(specs))
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--out", default=None)
    for hidden, kind in (("rank", int), ("world", int), ("port", int), ("result", str)):
        parser.add_argument(f"--{hidden}", type=kind, default={"port": port, "world": 2}.get(hidden), help=SUPPRESS)
    parser.add_argument("--worker", action="store_true", help=SUPPRESS)
    parser.add_argument("--interleave", action="store_true", help=SUPPRESS)
    return parser


def driver_args(parser: argparse.ArgumentParser, name: str, worker: Callable[[Any], None]) -> Any | None:
    """Parse the command line; run the worker, or report why the benchmark cannot run here.
    Returns the arguments only when this process is the driver and can go on."""
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return None
    reason = skip_reason()
    if reason:
        print(f"{name} benchmark skipped: {reason}")
        write_json(args.out, {"benchmark": name, "skipped": reason})
        return None
    return args
