"""The per-worker training loop. Runs under Ray Train (`ray_train_loop`) or any already
initialised torch.distributed group (`train_worker` with a `Session`, used by benchmarks).

Per step: forward/backward through DDP with the compression hook (or per-example DP
gradients and the same collectives), optimizer and schedule step, bytes sent vs dense
bytes, step time, loss. Per epoch: global train loss, test accuracy on rank 0, epsilon,
a report (and a checkpoint every N epochs/steps) that every rank joins.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gradcomp.config.train import TrainJob
from gradcomp.tasks import Objective, Task, batch_of, load_task
from gradcomp.worker.dp import ExampleDP, linear_aggregation, refuse_unclippable
from gradcomp.worker.hook import CompressionState, StepTraffic, compression_hook
from gradcomp.worker.sampling import PoissonPlan, RandomSource, secret_source
from gradcomp.worker.schedule import lr_schedule

STATE_FILE = "state.pt"


def rank_file(rank: int) -> str:
    """Name of one rank's own checkpoint file (EF memory, the DP ledgers): EF memory differs per rank."""
    return f"rank-{rank}.pt"


@dataclass
class Session:
    """How the loop talks to whatever launched it.

    `report(metrics, checkpoint_dir)` must be called by every rank the same number of times
    (Ray Train's report is a barrier); `restore` is a directory holding the last checkpoint.
    `before_step(global_step, rank)`, if given, runs before every step: tests inject worker
    faults with it; `gradcomp train` never sets it.
    """

    rank: int
    world: int
    device: torch.device
    report: Callable[[dict[str, Any], Path | None], None]
    restore: Path | None = None
    progress: Callable[[dict[str, Any]], None] | None = None
    before_step: Callable[[int, int], None] | None = None
    events: list[dict[str, Any]] = field(default_factory=list)
    last_flush: float = field(default=0.0, repr=False)  # time.monotonic() of the last progress hand-off


@dataclass
class _Run:
    """The per-run training objects, passed as one: reports, checkpoints and restores need all of them."""

    job: TrainJob
    session: Session
    task: Task
    module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    hook_state: CompressionState
    dp: ExampleDP | None
    model: nn.Module  # what the step calls: DDP around `module`, or `module` itself under DP
    n_train: int
    steps_per_epoch: int
    poisson: PoissonPlan | None  # DP-SGD's batch sampling (None: shuffled fixed-size batches)
    inclusions: RandomSource | None  # DP-SGD: the rank's secret source of Poisson inclusions


class StopTraining(Exception):
    """Raised inside the loop to end early (epsilon budget reached)."""


def make_optimizer(job: TrainJob, params: Any) -> torch.optim.Optimizer:
    """The job's optimizer over `params` (momentum/nesterov are SGD variants)."""
    o = job.optimizer
    if o.name == "adam":
        return torch.optim.Adam(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    momentum = 0.0 if o.name == "sgd" else o.momentum
    return torch.optim.SGD(
        params, lr=o.lr, momentum=momentum, nesterov=o.name == "nesterov", weight_decay=o.weight_decay
    )


def shard_indices(n: int, rank: int, world: int, seed: int, epoch: int) -> torch.Tensor:
    """This rank's equal share of a fresh permutation: every rank gets exactly n // world."""
    per = n // world
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=gen)[rank * per : (rank + 1) * per]


def train_worker(job: TrainJob, session: Session) -> dict[str, Any]:
    """Train `job` on this rank; returns rank 0's last epoch entry (empty on other ranks)."""
    run = _setup(job, session)
    start_epoch, start_step, global_step = (0, 0, 0) if session.restore is None else _restore(run, session.restore)
    last: dict[str, Any] = {}
    try:
        for epoch in range(start_epoch, job.epochs):
            first_step = start_step if epoch == start_epoch else 0
            last, global_step = _train_epoch(run, epoch, first_step, global_step)
    except StopTraining as stop:
        last = {**last, "stopped": str(stop)}
        if session.rank == 0 and session.progress is not None:
            session.events.append({"type": "stopped", "reason": str(stop)})
            _flush(session, force=True)
        session.report({"stopped": str(stop)}, None)
    return last if session.rank == 0 else {}


def _setup(job: TrainJob, session: Session) -> _Run:
    """Task, model (DDP + compression hook, or per-example DP), optimizer and schedule for this rank."""
    torch.manual_seed(job.seed)
    task = load_task(job.task.name, **job.task.args)
    module = task.make_model().to(session.device)
    refuse_unclippable(job.dp, module)
    n_train = len(task.train_set)  # type: ignore[arg-type]
    steps_per_epoch = (n_train // session.world) // job.batch_size
    if steps_per_epoch < 1:
        raise ValueError(
            f"batch_size {job.batch_size} x {session.world} workers needs at least "
            f"{job.batch_size * session.world} training examples; task {job.task.name!r} has {n_train}"
        )
    poisson = PoissonPlan.for_job(n_train, job.batch_size, session.world) if job.dp is not None else None
    if poisson is not None:
        steps_per_epoch = poisson.steps_per_epoch
    hook_state = CompressionState.for_model(module, job.compression, seed=job.seed, warmup_steps=job.warmup_dense_steps)
    model, dp = _wrap_model(job, session, module, hook_state, poisson, task.objective)
    optimizer = make_optimizer(job, module.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(job, steps_per_epoch))
    inclusions = secret_source() if poisson is not None else None
    return _Run(
        job,
        session,
        task,
        module,
        optimizer,
        scheduler,
        hook_state,
        dp,
        model,
        n_train,
        steps_per_epoch,
        poisson,
        inclusions,
    )


def _wrap_model(
    job: TrainJob,
    session: Session,
    module: nn.Module,
    hook_state: CompressionState,
    poisson: PoissonPlan | None,
    objective: Objective,
) -> tuple[nn.Module, ExampleDP | None]:
    """DDP with the compression hook; or, with example-level DP, the bare module and its DP engine
    (per-example gradients go through the same collectives, without DDP)."""
    if job.dp is None or poisson is None:
        ddp_args: dict[str, Any] = {"bucket_cap_mb": job.bucket_cap_mb}
        if session.device.type == "cuda":
            ddp_args["device_ids"] = [session.device.index]
        model = nn.parallel.DistributedDataParallel(module, **ddp_args)
        model.register_comm_hook(hook_state, compression_hook)
        return model, None
    for p in module.parameters():  # same start everywhere without DDP's broadcast
        dist.broadcast(p.data, src=0)
    dp = ExampleDP(
        module,
        job.dp,
        world=session.world,
        split_noise=linear_aggregation(hook_state.pipeline),
        sample_rate=poisson.sample_rate,  # the accountant is charged exactly the sampler's q
        expected_batch=poisson.expected_local_batch,
        objective=objective,
        autocast=torch.bfloat16 if job.precision == "bf16" else None,
    )
    return module, dp


def _train_epoch(run: _Run, epoch: int, first_step: int, global_step: int) -> tuple[dict[str, Any], int]:
    """Steps `first_step..` of one epoch, then its report; returns the epoch entry and the global step."""
    job, session = run.job, run.session
    batches = _epoch_batches(run, epoch, first_step)
    totals = torch.zeros(5, dtype=torch.float64)  # loss sum, bytes, dense bytes, steps, examples
    step_times: list[float] = []
    every_steps = job.checkpoint.every_steps
    t_epoch = time.perf_counter()
    for step in range(first_step, run.steps_per_epoch):
        if session.before_step is not None:
            session.before_step(global_step, session.rank)
        if run.dp is not None and run.dp.would_exceed_budget():
            raise StopTraining(f"epsilon budget {job.dp.epsilon_budget} reached")  # type: ignore[union-attr]
        x, y = batch_of(run.task.train_set, next(batches), session.device)
        t0 = time.perf_counter()
        loss = _step(run, x, y)
        traffic = run.hook_state.take_traffic()
        dt = time.perf_counter() - t0
        global_step += 1
        step_times.append(dt)
        seen = len(y)
        loss_sum = loss * seen if seen else 0.0
        totals += torch.tensor([loss_sum, traffic.bytes_sent, traffic.dense_bytes, 1.0, seen], dtype=torch.float64)
        _log_step(run, epoch, global_step, loss, traffic, dt, seen)
        # the epoch's last step is checkpointed by `_end_epoch` (if at all)
        if every_steps and global_step % every_steps == 0 and step + 1 < run.steps_per_epoch:
            _report(run, {"epoch": epoch, "step": global_step}, epoch, step + 1, global_step)
    entry = _end_epoch(run, epoch, global_step, totals, step_times, time.perf_counter() - t_epoch)
    return entry, global_step


def _epoch_batches(run: _Run, epoch: int, first_step: int) -> Iterator[torch.Tensor]:
    """This rank's example indices for steps `first_step..` of `epoch`: Poisson samples under DP
    (sizes vary, may be empty; every rank still yields `steps_per_epoch`), else equal shuffled slices."""
    job, session = run.job, run.session
    if run.poisson is not None and run.inclusions is not None:
        return run.poisson.batches(session.rank, job.seed, epoch, run.inclusions, run.steps_per_epoch - first_step)
    idx = shard_indices(run.n_train, session.rank, session.world, job.seed, epoch)
    return (idx[s * job.batch_size : (s + 1) * job.batch_size] for s in range(first_step, run.steps_per_epoch))


def _step(run: _Run, x: torch.Tensor, y: torch.Tensor) -> float:
    """One optimisation step (gradient exchange included); returns this rank's mean batch loss
    (NaN for an empty Poisson batch, which still takes part in the exchange)."""
    run.optimizer.zero_grad(set_to_none=True)
    if run.dp is None:
        with _precision(run):
            loss_t = run.task.objective.mean(run.model(x), y)
        loss_t.backward()  # DDP's comm hook compresses and exchanges the buckets here
        loss = float(loss_t.detach())
    else:  # under precision: bf16 the DP engine autocasts its forward passes only, never the clipping
        flat, loss_sum = run.dp.gradient(x, y)
        loss = loss_sum / len(y) if len(y) else math.nan
        mean = run.hook_state.reduce(flat, "dp-all").wait()
        run.hook_state.end_step()
        run.dp.write_grads(mean)
        run.dp.account()
    run.optimizer.step()
    run.scheduler.step()
    return loss


def _precision(run: _Run) -> torch.autocast:
    """The forward pass's precision: bf16 autocast under `precision: bf16`. The parameters stay fp32,
    so their gradients, and everything compressed and sent from them, are fp32 either way."""
    return torch.autocast(run.session.device.type, dtype=torch.bfloat16, enabled=run.job.precision == "bf16")


def _log_step(
    run: _Run, epoch: int, global_step: int, loss: float, traffic: StepTraffic, seconds: float, examples: int
) -> None:
    """Queue this rank's step event (loss, examples, bytes, ratio, time, lr) for the launcher: rank 0's
    drive the display and steps.jsonl, every rank's feed the per-rank training metrics. Under DP the
    un-noised loss and drawn batch size stay out unless `dp.unprotected_metrics` lets them out."""
    unnoised = {"loss": loss, "examples": examples} if _reports_unnoised(run) else {}
    run.session.events.append(
        {
            "type": "step",
            "rank": run.session.rank,
            "epoch": epoch,
            "step": global_step,
            **unnoised,
            "bytes_sent": traffic.bytes_sent,
            "dense_bytes": traffic.dense_bytes,
            "compression_ratio": round(traffic.ratio, 3),
            "step_seconds": round(seconds, 6),
            "lr": run.scheduler.get_last_lr()[0],
        }
    )
    _flush(run.session)


def _reports_unnoised(run: _Run) -> bool:
    """Whether losses and batch sizes computed from raw training data may leave the workers: always
    without DP; under DP only with `dp.unprotected_metrics` (they are outside the guarantee)."""
    return run.dp is None or run.dp.cfg.unprotected_metrics


def _end_epoch(
    run: _Run, epoch: int, global_step: int, totals: torch.Tensor, step_times: list[float], epoch_seconds: float
) -> dict[str, Any]:
    """Sum the epoch's bytes and steps (and loss and examples, where they may leave) over ranks,
    evaluate on rank 0, report (+ checkpoint)."""
    job, session, task, dp = run.job, run.session, run.task, run.dp
    # Under DP without unprotected_metrics the rank's loss sum and drawn examples are computed from its
    # raw batches without noise: an observer of its interconnect messages must not see them.
    dist.all_reduce(totals if _reports_unnoised(run) else totals[1:4])
    entry: dict[str, Any] = {
        "epoch": epoch + 1,
        "step": global_step,
        "bytes_sent": int(totals[1]),
        "dense_bytes": int(totals[2]),
        "compression_ratio": float(totals[2] / totals[1]) if totals[1] else 1.0,
        "step_seconds": sum(step_times) / max(len(step_times), 1),
        "epoch_seconds": epoch_seconds,
        "lr": run.scheduler.get_last_lr()[0],
    }
    if _reports_unnoised(run):
        entry["train_loss"] = float(totals[0]) / max(float(totals[4]), 1.0)
    if (
        session.rank == 0
        and task.test_set is not None
        and ((epoch + 1) % job.eval.every_epochs == 0 or epoch + 1 == job.epochs)
    ):
        metrics = task.evaluate(run.module, batch_size=job.eval.batch_size, device=session.device)
        entry.update({f"test_{name}": value for name, value in metrics.items()})
    if dp is not None:
        entry["epsilon"] = dp.epsilon()
        entry["epsilon_rank_message"] = dp.rank_epsilon()
        entry["delta"] = dp.cfg.delta
    if session.rank == 0:
        session.events.append({"type": "epoch", **entry})
    _flush(session, force=True)  # every rank: its last steps reach the launcher before the run can end
    every = job.checkpoint.every_epochs
    save = bool(every) and ((epoch + 1) % every == 0 or epoch + 1 == job.epochs)
    if save:
        _report(run, entry, epoch + 1, 0, global_step)
    # Without a checkpoint, metrics travel through `session.progress` only: a Ray Train
    # report is a barrier through the controller, too slow to pay every epoch.
    return entry


def _flush(session: Session, force: bool = False) -> None:
    """Hand buffered events to the launcher at most ~2 times a second (or now, if forced)."""
    if session.progress is None:
        session.events.clear()
        return
    now = time.monotonic()
    if force or now - session.last_flush >= 0.5:
        events, session.events = session.events, []
        session.progress({"events": events})
        session.last_flush = now


def _report(run: _Run, metrics: dict[str, Any], epoch: int, step_in_epoch: int, global_step: int) -> None:
    """Write this rank's part of a checkpoint and report it (every rank, one barrier).

    `epoch`/`step_in_epoch` say where a restored run resumes: the next step to take.
    """
    session, dp = run.session, run.dp
    with tempfile.TemporaryDirectory(prefix="gradcomp-ckpt-") as tmp:
        d = Path(tmp)
        if session.rank == 0:
            torch.save(
                {
                    "model": run.module.state_dict(),
                    "optimizer": run.optimizer.state_dict(),
                    "scheduler": run.scheduler.state_dict(),
                    "epoch": epoch,
                    "step_in_epoch": step_in_epoch,
                    "global_step": global_step,
                    "world": session.world,
                    "job": run.job.resume_key(),
                    "release_bound": _release_bound(run, epoch, step_in_epoch, global_step),
                },
                d / STATE_FILE,
            )
        torch.save(
            {"hook": run.hook_state.state_dict(), "dp": dp.state_dict() if dp is not None else None},
            d / rank_file(session.rank),
        )
        session.report(metrics, d)


def _release_bound(run: _Run, epoch: int, step_in_epoch: int, global_step: int) -> int:
    """Steps this run may still release after a checkpoint at (epoch, step_in_epoch, global_step)
    before it writes its next one or ends: an upper bound on the releases a resume from it loses."""
    job, spe, every = run.job, run.steps_per_epoch, run.job.checkpoint
    if epoch >= job.epochs:
        return 0
    epoch_end = global_step + spe - step_in_epoch  # the global step that ends the current epoch
    end = epoch_end + (job.epochs - epoch - 1) * spe
    nxt = end
    if every.every_epochs:
        e, at = epoch, epoch_end
        while at < end and (e + 1) % every.every_epochs:
            e, at = e + 1, at + spe
        nxt = min(nxt, at)
    if every.every_steps:
        m = (global_step // every.every_steps + 1) * every.every_steps
        while m < end and (m - epoch_end) % spe == 0:  # an epoch's last step is left to `_end_epoch`
            m += every.every_steps
        nxt = min(nxt, m)
    return nxt - global_step


def _restore(run: _Run, where: Path) -> tuple[int, int, int]:
    """Load a checkpoint: shared state (and the DP ledgers) from rank 0's files, EF memory from ours.

    With a different worker count than the checkpoint's, ranks without a file of their own
    start with empty error-feedback memory (the model, optimizer and ledger still resume).
    Under DP the steps released after the checkpoint are charged (see `_charge_lost_releases`).
    Returns (epoch, step in epoch, global step) to resume from.
    """
    rank, dp = run.session.rank, run.dp
    state = torch.load(where / STATE_FILE, map_location="cpu", weights_only=False)
    run.module.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    own = where / rank_file(rank)
    mine = torch.load(own, map_location="cpu", weights_only=False) if own.is_file() else None
    if mine is not None and state.get("world") is not None:
        run.hook_state.load_state_dict(mine["hook"])
    at = int(state["epoch"]), int(state["step_in_epoch"]), int(state["global_step"])
    if dp is not None:
        # every rank's ledgers are the same; rank 0's file is always there, whatever the old world size
        shared = (
            mine
            if rank == 0 and mine is not None
            else torch.load(where / rank_file(0), map_location="cpu", weights_only=False)
        )
        dp.load_state_dict(shared["dp"])
        lost = state.get("release_bound")
        _charge_lost_releases(run, _release_bound(run, *at) if lost is None else int(lost), *at)
    return at


def _charge_lost_releases(run: _Run, lost: int, epoch: int, step_in_epoch: int, global_step: int) -> None:
    """Charge the `lost` steps a run may have released after this checkpoint, then checkpoint at once.

    Their noisy gradients left the workers before the failure, and their noise was secret and is gone
    (never checkpointed: the resumed run draws new noise for the steps it redoes, which are charged
    again as they happen). Checkpointing the charge right away keeps it when the run fails again
    before its next scheduled checkpoint; it may carry the ledger past the budget, which then stops the run.
    """
    assert run.dp is not None
    if lost <= 0:
        return
    run.dp.account(lost, force=True)
    _report(run, {"epoch": epoch, "step": global_step, "charged_lost_steps": lost}, epoch, step_in_epoch, global_step)


# --- Ray Train entry point -------------------------------------------------------------------


def ray_train_loop(config: dict[str, Any]) -> None:
    """`train_loop_per_worker` for Ray Train's TorchTrainer.

    config = {"job": dict, "progress": queue, "before_step": optional callable (see `Session`)}.
    """
    import ray.train
    import ray.train.torch

    job = TrainJob.model_validate(config["job"])
    torch.set_num_threads(max(1, int(job.scaling.cpus_per_worker)))
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    queue = config.get("progress")
    before_step = config.get("before_step")

    def report(metrics: dict[str, Any], checkpoint_dir: Path | None) -> None:
        ckpt = ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir is not None else None
        ray.train.report(dict(metrics), checkpoint=ckpt)

    def progress(event: dict[str, Any]) -> None:
        if queue is not None:
            queue.put(event)

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        train_worker(job, Session(rank, world, ray.train.torch.get_device(), report, None, progress, before_step))
        return
    with checkpoint.as_directory() as restore:
        session = Session(rank, world, ray.train.torch.get_device(), report, Path(restore), progress, before_step)
        if rank == 0:
            session.events.append({"type": "restored", "path": checkpoint.path})
        train_worker(job, session)
