"""`gradcomp train JOB.yaml`: validate the job, start (or join) Ray, run a TorchTrainer, show
progress, and write runs/<name>/results.json.

Ray Train keeps its checkpoints under runs/<name>/ too (RunConfig(storage_path=runs dir,
name=job name)), so running the same job name again continues from the newest checkpoint:
after a crash, after Ctrl-C, or with more epochs. `--fresh` starts over instead.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import threading
import time
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gradcomp.config.common import ConfigError, load_job
from gradcomp.config.train import TrainJob
from gradcomp.raycluster import cluster_address, connect
from gradcomp.results import RunRecord, human_bytes, print_summary, strict_json
from gradcomp.worker.train_metrics import exported


def load_train_job(path: str, overrides: list[str] | None = None, workers: int | None = None) -> TrainJob:
    """Load and validate a job file (plus `--set` and `--workers`), failing before any work."""
    job = load_job(TrainJob, path, overrides)
    if workers is not None:
        try:
            job.scaling.num_workers = workers
        except ValueError as err:
            raise ConfigError(f"--workers {workers}: {err}") from None
    return job


def describe(job: TrainJob) -> dict[str, Any]:
    """Load the task once on the driver: catches bad task arguments before Ray starts."""
    from gradcomp.tasks import dataset_len, load_task
    from gradcomp.worker.dp import refuse_unclippable

    task = load_task(job.task.name, **job.task.args)
    n_train = dataset_len(task.train_set)
    world = job.scaling.num_workers
    steps = (n_train // world) // job.batch_size
    if steps < 1:
        raise ConfigError(
            f"batch_size {job.batch_size} x {world} workers needs at least {job.batch_size * world} "
            f"training examples; task {job.task.name!r} has {n_train}"
        )
    model = task.make_model()
    refuse_unclippable(job.dp, model)
    params = sum(p.numel() for p in model.parameters())
    return {
        "train_examples": n_train,
        "parameters": params,
        "steps_per_epoch": steps,
        "total_steps": steps * job.epochs,
        "task": task.info,
    }


def _check_resumable(run_dir: Path, job: TrainJob) -> None:
    """Refuse to continue a run directory that holds a different job (model, data, compression...)."""
    path = run_dir / "results.json"
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text()).get("config", {})
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as err:
        raise ConfigError(f"{path} is not a results file ({err}); use --fresh to discard the old run") from None
    key = job.resume_key()
    old_key = {k: v for k, v in old.items() if k in key}
    if old_key and old_key != key:
        changed = sorted(k for k in key if old_key.get(k) != key[k])
        raise ConfigError(
            f"{run_dir} holds run {job.name!r} with a different job (changed: {', '.join(changed)}); "
            f"use another name, or --fresh to discard the old run"
        )


def _init_ray(address: str | None, job: TrainJob) -> None:
    needed = job.scaling.num_workers * job.scaling.cpus_per_worker
    # Progress and results come through our own queue; worker errors still reach the driver
    # inside Ray Train's exception. GRADCOMP_RAY_LOGS=1 shows the raw worker logs.
    quiet = os.environ.get("GRADCOMP_RAY_LOGS", "0") != "1"
    if cluster_address(address):
        connect(address)
    else:
        connect(num_cpus=max(math.ceil(needed), os.cpu_count() or 1), log_to_driver=not quiet)


class Recorder:
    """results.json for a run that may replay epochs after a restart: an epoch reported again
    (from a checkpoint taken before it) replaces the old entry and everything after it."""

    def __init__(self, run_dir: Path, job: TrainJob, info: dict[str, Any]):
        config = {**job.model_dump(mode="json"), "info": info}
        existing = (run_dir / "results.json").is_file()
        self.rec = (RunRecord.resume if existing else RunRecord)(run_dir, job.name, "train", config)
        self.rec.set_task(info.get("task", {}))
        self.steps_path = run_dir / "steps.jsonl"
        self.job = job

    @property
    def last_epoch(self) -> int:
        hist = self.rec.history
        return int(hist[-1]["epoch"]) if hist else 0

    def epoch(self, entry: dict[str, Any]) -> None:
        kept = [h for h in self.rec.history if h.get("epoch", 0) < entry["epoch"]]
        self.rec.replace_history(
            kept,
            bytes_sent=sum(int(h.get("bytes_sent", 0)) for h in kept),
            dense_bytes=sum(int(h.get("dense_bytes", 0)) for h in kept),
        )
        if "epsilon" in entry:
            self.rec.set_privacy(entry["epsilon"], entry.get("delta"))
        self.rec.log(entry, bytes_sent=entry["bytes_sent"], dense_bytes=entry["dense_bytes"])

    def steps(self, events: list[dict[str, Any]]) -> None:
        if events:
            with self.steps_path.open("a") as f:
                for e in events:
                    f.write(strict_json(e) + "\n")


class Display:
    """A progress bar on a terminal; one line per epoch otherwise (logs, CI)."""

    def __init__(self, total_steps: int, title: str):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = Console()
        self.live = self.console.is_terminal
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[info]}"),
            console=self.console,
            disable=not self.live,
            redirect_stdout=True,
            redirect_stderr=True,
        )
        self.task = self.progress.add_task(title, total=total_steps, info="starting workers")

    def __enter__(self) -> Display:
        self.progress.__enter__()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, err: BaseException | None, tb: types.TracebackType | None
    ) -> None:
        self.progress.__exit__(kind, err, tb)

    def step(self, e: dict[str, Any]) -> None:
        loss = f"loss {e['loss']:.3f}  " if "loss" in e else ""  # DP keeps it in unless told otherwise
        info = f"{loss}{e['compression_ratio']:.0f}x  {1000 * e['step_seconds']:.1f} ms/step"
        self.progress.update(self.task, completed=e["step"], info=info)

    def line(self, text: str) -> None:
        self.console.print(text, highlight=False, soft_wrap=True)

    def epoch(self, e: dict[str, Any]) -> None:
        parts = [f"epoch {e['epoch']}"] + ([f"loss {e['train_loss']:.4f}"] if "train_loss" in e else [])
        if "test_accuracy" in e:
            parts.append(f"test acc {e['test_accuracy']:.4f}")
        parts.append(f"sent {human_bytes(e['bytes_sent'])} ({e['compression_ratio']:.1f}x less)")
        parts.append(f"{1000 * e['step_seconds']:.1f} ms/step")
        if "epsilon" in e:
            parts.append(f"eps {e['epsilon']:.3f}")
        self.line("  ".join(parts))


def run_train(args: argparse.Namespace) -> int:
    """CLI handler of `gradcomp train`."""
    job = load_train_job(args.job, getattr(args, "overrides", None), getattr(args, "workers", None))
    info = describe(job)
    runs_dir = Path(getattr(args, "runs_dir", "runs")).resolve()
    run_dir = runs_dir / job.name
    if getattr(args, "check", False):
        print(
            f"{args.job}: ok: run {job.name!r}, task {job.task.name} ({info['parameters']:,} parameters, "
            f"{info['train_examples']} examples), {job.scaling.num_workers} workers x {job.epochs} epochs x "
            f"{info['steps_per_epoch']} steps, compression {job.compression!r}"
            + (f", DP clip={job.dp.clip} sigma={job.dp.noise_multiplier} delta={job.dp.delta:g}" if job.dp else "")
        )
        return 0
    if getattr(args, "fresh", False) and run_dir.exists():
        shutil.rmtree(run_dir)
    _check_resumable(run_dir, job)
    port, host = getattr(args, "metrics_port", None), getattr(args, "metrics_host", "127.0.0.1")
    world, linger = job.scaling.num_workers, getattr(args, "metrics_linger", 0.0)
    with exported(job.name, world, job.batch_size, port, host, linger) as observe:
        results = train(job, run_dir, info, address=getattr(args, "address", None), observe=observe)
        print_summary(results)
    return 0 if results["final"].get("status") == "finished" else 1


def train(
    job: TrainJob,
    run_dir: Path,
    info: dict[str, Any],
    address: str | None = None,
    before_step: Callable[[int, int], None] | None = None,
    observe: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Run the job on Ray Train and return the results dict (also written to results.json).

    `before_step(global_step, rank)` runs on every worker before each step (see `loop.Session`):
    tests inject worker faults with it; `gradcomp train` never passes one. `observe` sees every
    rank's progress events (the training metrics, see worker/train_metrics.py).
    """
    from ray.util.queue import Queue

    _init_ray(address, job)
    run_dir.mkdir(parents=True, exist_ok=True)
    recorder = Recorder(run_dir, job, info)
    queue = Queue(actor_options={"num_cpus": 0})
    started = time.time()
    try:
        fit = _Fit(_make_trainer(job, run_dir, queue, before_step))
        with Display(info["total_steps"], f"train {job.name}") as display:
            _announce(job, recorder, display)
            fit.thread.start()
            progress = _follow(queue, fit.thread, recorder, display, observe)
            fit.thread.join()
    finally:  # also on Ctrl-C: the queue is an actor that would outlive the run on a shared cluster
        queue.shutdown()
    return _finish(job, recorder, fit, progress, time.time() - started)


def _make_trainer(job: TrainJob, run_dir: Path, queue: Any, before_step: Callable[[int, int], None] | None) -> Any:
    """A TorchTrainer for the job whose checkpoints live in runs/<name>/ (so a rerun resumes)."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from gradcomp.worker.loop import ray_train_loop

    config: dict[str, Any] = {"job": job.model_dump(mode="json"), "progress": queue}
    if before_step is not None:
        config["before_step"] = before_step
    resources = {"CPU": job.scaling.cpus_per_worker}
    return TorchTrainer(
        ray_train_loop,
        train_loop_config=config,
        scaling_config=ScalingConfig(
            num_workers=job.scaling.num_workers, use_gpu=job.scaling.use_gpu, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=job.name,
            storage_path=str(run_dir.parent),
            failure_config=FailureConfig(max_failures=job.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=job.checkpoint.keep),
            # ray.train exports Train v2's RunConfig (which has logging_config) when v2 is enabled; mypy reads v1's
            logging_config=LoggingConfig(log_level="WARNING"),  # type: ignore[call-arg]
        ),
    )


class _Fit:
    """`trainer.fit()` on a thread, so the main thread can show progress; keeps its result or error."""

    def __init__(self, trainer: Any):
        self.trainer = trainer
        self.result: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="gradcomp-fit", daemon=True)

    def _run(self) -> None:
        try:
            self.result = self.trainer.fit()
        except BaseException as err:  # reported by `_finish`, on the main thread
            self.error = err


@dataclass
class _Progress:
    """What the event stream said besides epochs: restarts from a checkpoint, an early stop."""

    restores: int = 0
    stopped: str | None = None


def _announce(job: TrainJob, recorder: Recorder, display: Display) -> None:
    """Say whether this run starts, resumes, or only shows an already finished run."""
    if recorder.last_epoch >= job.epochs:
        display.line(
            f"run {job.name!r} already finished its {job.epochs} epochs: showing its results "
            f"(--set epochs=N continues it, --fresh starts over)"
        )
    elif recorder.last_epoch:
        display.line(f"resuming run {job.name!r}: {recorder.last_epoch} epoch(s) already recorded")


def _follow(
    queue: Any,
    thread: threading.Thread,
    recorder: Recorder,
    display: Display,
    observe: Callable[[dict[str, Any]], None] | None = None,
) -> _Progress:
    """Drain the workers' event queue into the display and results files (rank 0's events) and
    `observe` (every rank's) until the fit ends."""
    from ray.util.queue import Empty

    progress = _Progress()
    while True:
        alive = thread.is_alive()
        try:
            message = queue.get(block=True, timeout=0.5)
        except Empty:
            if not alive:
                return progress
            continue
        events = message.get("events", [])
        if observe is not None:
            for e in events:
                observe(e)
        events = [e for e in events if e.get("rank", 0) == 0]
        for e in events:
            _on_event(e, recorder, display, progress)
        recorder.steps([e for e in events if e.get("type") == "step"])


def _on_event(e: dict[str, Any], recorder: Recorder, display: Display, progress: _Progress) -> None:
    kind = e.get("type")
    if kind == "step":
        display.step(e)
    elif kind == "epoch":
        recorder.epoch({k: v for k, v in e.items() if k != "type"})
        display.epoch(e)
    elif kind == "restored":
        progress.restores += 1
        display.line(f"restored from checkpoint {e['path']}")
    elif kind == "stopped":
        progress.stopped = e["reason"]
        display.line(f"stopped early: {progress.stopped}")


def _finish(job: TrainJob, recorder: Recorder, fit: _Fit, progress: _Progress, seconds: float) -> dict[str, Any]:
    """Close results.json with the run's outcome: finished (with its checkpoint) or failed."""
    final: dict[str, Any] = {
        "workers": job.scaling.num_workers,
        "run_seconds": round(seconds, 3),
        "restores": progress.restores,
    }
    if progress.stopped:
        final["stopped"] = progress.stopped
    if fit.error is not None:
        err = fit.error
        print(f"gradcomp train: run {job.name!r} failed: {err}", file=sys.stderr)
        message = str(err).splitlines()[0][:500] if str(err) else repr(err)
        return recorder.rec.finish(**final, status="failed", error=message)
    result = fit.result
    if result.error is not None:
        return recorder.rec.finish(**final, status="failed", error=str(result.error)[:500])
    final["checkpoint"] = result.checkpoint.path if result.checkpoint is not None else None
    final["status"] = "finished"
    return recorder.rec.finish(**final)
