"""How the sweep checks and runs one cell: straight through the library functions that
`gradcomp train` and `gradcomp fedsim` call, with the cell's job data (no job file, no CLI).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from gradcomp.config.common import validate
from gradcomp.config.train import TrainJob
from gradcomp.errors import GradcompError
from gradcomp.sim.run import simulate
from gradcomp.sim.setup import fedsim_job
from gradcomp.worker.launch import describe, train


class CellRunner(Protocol):
    """One sweep runner. `check` raises ValueError (ConfigError, TaskError) for a job that cannot run;
    `run` trains the job into runs_dir/<job name>/ and raises when the run did not finish."""

    def check(self, job: dict[str, Any], source: str) -> None: ...

    def run(self, job: dict[str, Any], source: str, runs_dir: Path, address: str | None) -> None: ...


class CellFailed(GradcompError, RuntimeError):
    """The cell's run ended, but not as finished (its results.json says why)."""


@dataclass(frozen=True)
class TrainRunner:
    """Data-parallel training on Ray Train, as `gradcomp train` (the task is loaded by the check too)."""

    def _job(self, job: dict[str, Any], source: str) -> tuple[TrainJob, dict[str, Any]]:
        train_job = validate(TrainJob, job, source=source)
        return train_job, describe(train_job)

    def check(self, job: dict[str, Any], source: str) -> None:
        self._job(job, source)

    def run(self, job: dict[str, Any], source: str, runs_dir: Path, address: str | None) -> None:
        train_job, info = self._job(job, source)
        results = train(train_job, runs_dir / train_job.name, info, address=address)
        final = results["final"]
        if final.get("status") != "finished":
            raise CellFailed(f"train run {train_job.name!r} {final.get('status')}: {final.get('error', '')}")


@dataclass(frozen=True)
class FedsimRunner:
    """A federated simulation, as `gradcomp fedsim` without its progress output."""

    def check(self, job: dict[str, Any], source: str) -> None:
        fedsim_job(job, source)

    def run(self, job: dict[str, Any], source: str, runs_dir: Path, address: str | None) -> None:
        fed_job = fedsim_job(job, source)
        if simulate(fed_job, runs_dir, address=address, show=False):
            raise CellFailed(f"simulation {fed_job.name!r} failed (see its results.json)")


RUNNERS: dict[str, CellRunner] = {"train": TrainRunner(), "fedsim": FedsimRunner()}
