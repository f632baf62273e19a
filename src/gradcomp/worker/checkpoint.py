"""A training run's checkpoints: what each rank writes at a report (rank 0 the shared state, every rank
its own error-feedback memory and DP ledgers), how a restart reads them back, and, under DP-SGD, the
charge for the steps a failed run may have released after its last checkpoint."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch

from gradcomp.worker.session import STATE_FILE, Run, rank_file


def report_checkpoint(run: Run, metrics: dict[str, Any], epoch: int, step_in_epoch: int, global_step: int) -> None:
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
                    "release_bound": release_bound(run, epoch, step_in_epoch, global_step),
                },
                d / STATE_FILE,
            )
        torch.save(
            {"hook": run.hook_state.state_dict(), "dp": dp.state_dict() if dp is not None else None},
            d / rank_file(session.rank),
        )
        session.report(metrics, d)


def release_bound(run: Run, epoch: int, step_in_epoch: int, global_step: int) -> int:
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


def restore_checkpoint(run: Run, where: Path) -> tuple[int, int, int]:
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
        _charge_lost_releases(run, release_bound(run, *at) if lost is None else int(lost), *at)
    return at


def _charge_lost_releases(run: Run, lost: int, epoch: int, step_in_epoch: int, global_step: int) -> None:
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
    report_checkpoint(
        run, {"epoch": epoch, "step": global_step, "charged_lost_steps": lost}, epoch, step_in_epoch, global_step
    )
