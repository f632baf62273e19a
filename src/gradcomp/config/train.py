"""`TrainJob`: the job file of `gradcomp train` (data-parallel training on Ray Train).

Everything a run needs is validated here, before Ray starts, so a typo or an impossible
value fails with the key path and the allowed values instead of a worker traceback.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, field_validator, model_validator

from gradcomp.config.common import RunName, StrictModel, TaskConfig, compression_spec
from gradcomp.privacy import negligible_reach_problem

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
CompressionSpec = Annotated[str, BeforeValidator(compression_spec)]


class OptimizerConfig(StrictModel):
    """sgd (plain), momentum (heavy ball), nesterov, or adam."""

    name: Literal["sgd", "momentum", "nesterov", "adam"] = Field("sgd", description="the optimizer")
    lr: float = Field(0.1, gt=0, description="learning rate (the peak, under a schedule)")
    momentum: float = Field(0.9, ge=0, lt=1, description="momentum and nesterov only")
    weight_decay: float = Field(0.0, ge=0, description="L2 penalty added by the optimizer")
    betas: tuple[float, float] = Field((0.9, 0.999), description="adam only: moment decays, each in [0, 1)")

    @field_validator("betas")
    @classmethod
    def _betas(cls, value: tuple[float, float]) -> tuple[float, float]:
        if not all(0 <= b < 1 for b in value):
            raise ValueError(f"betas must both be in [0, 1), got {list(value)}")
        return value


class ScheduleConfig(StrictModel):
    """Learning-rate schedule, stepped once per optimizer step.

    `warmup_steps` ramps the rate linearly from ~0 to `lr` first (combines with any schedule).
    `step`: multiply by `gamma` every `step_epochs` epochs. `cosine`: decay to `min_lr` at the end.
    `sigmoid`: lr * (1 - sigmoid(steepness * (progress - midpoint))), normalised to start at lr,
    towards `min_lr`; progress runs from 0 after the warm-up to 1 at the last step.
    """

    name: Literal["none", "step", "cosine", "sigmoid"] = Field("none", description="the schedule after warm-up")
    warmup_steps: int = Field(0, ge=0, description="linear warm-up from ~0 to lr over this many steps first")
    step_epochs: int = Field(1, ge=1, description="step: multiply by gamma every this many epochs")
    gamma: float = Field(0.1, gt=0, le=1, description="step: the factor")
    min_lr: float = Field(0.0, ge=0, description="cosine, sigmoid: the rate decayed towards")
    midpoint: float = Field(0.5, gt=0, lt=1, description="sigmoid: where the decay is steepest (0..1 of the steps)")
    steepness: float = Field(10.0, gt=0, description="sigmoid: how sharp the decay is around the midpoint")


class DPConfig(StrictModel):
    """Example-level differential privacy (DP-SGD): per-example clipping, Gaussian noise, accountant."""

    clip: float = Field(1.0, gt=0, description="L2 bound on each example's gradient")
    noise_multiplier: float = Field(1.0, ge=0, description="noise std / clip of the summed gradient")
    delta: float = Field(1e-5, gt=0, lt=1, description="the delta every reported epsilon is at")
    accountant: Literal["rdp", "prv", "gdp"] = Field("rdp", description="Opacus accountant that composes the steps")
    epsilon_budget: float | None = Field(None, gt=0, description="stop before spending more than this")
    unprotected_metrics: bool = Field(
        False,
        description="also report each step's un-noised batch loss and drawn batch size and the epoch's "
        "train loss (computed from raw training data: outside the guarantee)",
    )

    @model_validator(mode="after")
    def _sampler_reaches(self) -> DPConfig:
        if (problem := negligible_reach_problem(self.noise_multiplier, self.delta)) is not None:
            raise ValueError(problem)
        return self


class ScalingSection(StrictModel):
    """Ray Train workers (`--workers N` overrides num_workers)."""

    num_workers: int = Field(2, ge=1, le=1024, description="data-parallel ranks")
    use_gpu: bool = Field(False, description="one GPU per worker, NCCL instead of gloo")
    cpus_per_worker: float = Field(1.0, gt=0, description="CPUs Ray reserves for each worker")


class CheckpointConfig(StrictModel):
    """Checkpoint every N epochs and/or every N steps (0 = off); keep the newest `keep`."""

    every_epochs: int = Field(1, ge=0, description="checkpoint at the end of every N-th epoch (0 = off)")
    every_steps: int = Field(
        0, ge=0, description="checkpoint every N steps (0 = off); under DP it bounds what a resume charges"
    )
    keep: int = Field(2, ge=1, description="newest checkpoints kept")


class EvalConfig(StrictModel):
    """Test-set evaluation on rank 0."""

    every_epochs: int = Field(1, ge=1, description="evaluate after every N-th epoch (and the last)")
    batch_size: int = Field(512, ge=1, description="evaluation batch size")


class TrainJob(StrictModel):
    """A `gradcomp train` job file."""

    name: RunName = Field(description="run name: runs/<name>/ holds results and checkpoints")
    task: TaskConfig = Field(default_factory=TaskConfig)
    seed: int = Field(
        0, description="one seed for everything public (initialisation, shuffling, randomk); never DP noise"
    )
    epochs: int = Field(5, ge=1, le=100_000, description="passes over the training set")
    batch_size: int = Field(32, ge=1, description="examples per worker per step")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    compression: CompressionSpec = Field("none", description="e.g. `rtopk(ratio=0.01, r=0.02) | ef` (docs/jobs.md)")
    warmup_dense_steps: int = Field(0, ge=0, description="uncompressed all-reduce for the first N steps")
    bucket_cap_mb: float = Field(25.0, gt=0, description="DDP gradient bucket size")
    dp: DPConfig | None = Field(None, description="example-level DP-SGD; off when absent (docs/privacy.md)")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32",
        description="bf16: forward pass and loss under torch.autocast (bfloat16); parameters, gradients, "
        "compression and the bytes counted stay fp32",
    )
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    max_failures: int = Field(1, ge=-1, description="worker-group restarts from the last checkpoint; -1 = no limit")
    eval: EvalConfig = Field(default_factory=EvalConfig)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not NAME_RE.match(value):
            raise ValueError(
                "must be 1-100 characters of letters, digits, '.', '_' or '-', starting with a letter/digit"
            )
        return value

    @model_validator(mode="after")
    def _no_dp_stage(self) -> TrainJob:
        from gradcomp.compression import build

        if build(self.compression).dp is not None:
            raise ValueError(
                "a dp stage in 'compression' is refused in data-parallel training: it would clip each DDP bucket "
                "of the minibatch mean (not each example), draw its noise from the job's public seed and report no "
                "epsilon; use the job's 'dp' section instead (example-level DP-SGD: dp: {clip, noise_multiplier, "
                "delta}) and drop the dp stage from the spec"
            )
        return self

    @model_validator(mode="after")
    def _powersgd_fits(self) -> TrainJob:
        from gradcomp.compression import build

        stage = build(self.compression).lowrank
        if stage is None:
            return self
        if self.dp is not None:
            raise ValueError(
                "'powersgd' compresses DDP gradient buckets, but a 'dp' section trains without DDP "
                "(per-example gradients, one flat all-reduce); use a sparsifier such as randomk with dp"
            )
        if self.warmup_dense_steps:
            raise ValueError(
                f"'powersgd' has its own dense warm-up: set powersgd(start_iter="
                f"{stage.start_iter + self.warmup_dense_steps}) instead of warmup_dense_steps"
            )
        return self

    @model_validator(mode="after")
    def _schedule_decays(self) -> TrainJob:
        if self.schedule.name in ("cosine", "sigmoid") and self.schedule.min_lr > self.optimizer.lr:
            raise ValueError(
                f"schedule.min_lr ({self.schedule.min_lr}) is above optimizer.lr ({self.optimizer.lr}): "
                f"a {self.schedule.name} schedule would raise the learning rate instead of decaying it"
            )
        return self

    def resume_key(self) -> dict[str, Any]:
        """The parts of the job a resumed run must share with the run it continues."""
        data = self.model_dump(mode="json")
        for key in ("epochs", "scaling", "max_failures", "eval", "checkpoint"):
            data.pop(key, None)
        return data
