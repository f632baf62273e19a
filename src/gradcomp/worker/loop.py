"""The per-worker training loop. Runs under Ray Train (`ray_train_loop`) or any already
initialised torch.distributed group (`train_worker` with a `Session`, used by benchmarks).

Per step: forward/backward through DDP with the compression hook (or per-example DP
gradients and the same collectives), optimizer and schedule step, bytes sent vs dense
bytes, step time, loss. Per epoch: global train loss, test accuracy on rank 0, epsilon,
a report (and a checkpoint every N epochs/steps) that every rank joins.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gradcomp.config.train import TrainJob
from gradcomp.tasks import Objective, batch_of, dataset_len, load_task
from gradcomp.worker.checkpoint import report_checkpoint, restore_checkpoint
from gradcomp.worker.dp import ExampleDP, linear_aggregation, refuse_unclippable
from gradcomp.worker.hook import CompressionState, StepTraffic, compression_hook
from gradcomp.worker.sampling import PoissonPlan, secret_source
from gradcomp.worker.schedule import lr_schedule
from gradcomp.worker.session import Run, Session


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
    start_epoch, start_step, global_step = (
        (0, 0, 0) if session.restore is None else restore_checkpoint(run, session.restore)
    )
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


def _setup(job: TrainJob, session: Session) -> Run:
    """Task, model (DDP + compression hook, or per-example DP), optimizer and schedule for this rank."""
    torch.manual_seed(job.seed)
    task = load_task(job.task.name, **job.task.args)
    module = task.make_model().to(session.device)
    refuse_unclippable(job.dp, module)
    n_train = dataset_len(task.train_set)
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
    return Run(
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


def _train_epoch(run: Run, epoch: int, first_step: int, global_step: int) -> tuple[dict[str, Any], int]:
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
            raise StopTraining(f"epsilon budget {run.dp.cfg.epsilon_budget} reached")
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
            report_checkpoint(run, {"epoch": epoch, "step": global_step}, epoch, step + 1, global_step)
    entry = _end_epoch(run, epoch, global_step, totals, step_times, time.perf_counter() - t_epoch)
    return entry, global_step


def _epoch_batches(run: Run, epoch: int, first_step: int) -> Iterator[torch.Tensor]:
    """This rank's example indices for steps `first_step..` of `epoch`: Poisson samples under DP
    (sizes vary, may be empty; every rank still yields `steps_per_epoch`), else equal shuffled slices."""
    job, session = run.job, run.session
    if run.poisson is not None and run.inclusions is not None:
        return run.poisson.batches(session.rank, job.seed, epoch, run.inclusions, run.steps_per_epoch - first_step)
    idx = shard_indices(run.n_train, session.rank, session.world, job.seed, epoch)
    return (idx[s * job.batch_size : (s + 1) * job.batch_size] for s in range(first_step, run.steps_per_epoch))


def _step(run: Run, x: torch.Tensor, y: torch.Tensor) -> float:
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


def _precision(run: Run) -> torch.autocast:
    """The forward pass's precision: bf16 autocast under `precision: bf16`. The parameters stay fp32,
    so their gradients, and everything compressed and sent from them, are fp32 either way."""
    return torch.autocast(run.session.device.type, dtype=torch.bfloat16, enabled=run.job.precision == "bf16")


def _log_step(
    run: Run, epoch: int, global_step: int, loss: float, traffic: StepTraffic, seconds: float, examples: int
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


def _reports_unnoised(run: Run) -> bool:
    """Whether losses and batch sizes computed from raw training data may leave the workers: always
    without DP; under DP only with `dp.unprotected_metrics` (they are outside the guarantee)."""
    return run.dp is None or run.dp.cfg.unprotected_metrics


def _end_epoch(
    run: Run, epoch: int, global_step: int, totals: torch.Tensor, step_times: list[float], epoch_seconds: float
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
        report_checkpoint(run, entry, epoch + 1, 0, global_step)
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
