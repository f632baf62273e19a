"""Anchor benchmark (issue 16): gradcomp's federated simulator against pfl-research and Flower.

python benchmarks/fl_anchors.py --install-only
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import venv
from pathlib import Path

BENCH_DIR = Path("runs/bench")
TORCH_PIN = "torch==2.13.0"
ANCHORS = {
    "pfl": {"requirements": ["pfl[pytorch]", TORCH_PIN, "scikit-learn"], "import": "pfl"},
    "flower": {"requirements": ["flwr[simulation]", TORCH_PIN, "scikit-learn"], "import": "flwr"},
}


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--install-only", action="store_true")
    parser.parse_args(argv)
    for name in ANCHORS:
        _, message = ensure_anchor(name)
        print(f"{name}: {message}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
