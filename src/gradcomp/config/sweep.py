"""`SWEEP.yaml`: a base job and a grid (compression specs x DP settings x seeds x other keys).

Example:

    name: fed-digits-study
    base: fedsim-digits.yaml          # a federated (fedsim) or data-parallel (train) job file
    runner: fedsim                    # fedsim | train
    set: {rounds: 200}                # fixed overrides for every cell (dotted keys)
    specs:                            # names are the labels in tables and plots
      - none
      - {name: rtopk+ef, spec: "rtopk(ratio=0.01, r=0.05) | ef"}
    privacy:
      - {name: non-private}
      - {name: dp, stage: "dp(clip=1.0, sigma=0.8)"}   # prepended to every spec (local DP)
    seeds: [0, 1]
    grid: {simulation.partition: ["dirichlet(alpha=0.5)", iid]}
    target_accuracy: 0.92
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, field_validator, model_validator

from gradcomp.config.common import StrictModel, compression_spec

# Where each runner's job file keeps the compression spec and the seed (overridable per sweep).
DEFAULT_SPEC_KEY = {"fedsim": "compression", "train": "compression"}
DEFAULT_SEED_KEY = {"fedsim": "seed", "train": "seed"}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+=-]*$")

Spec = Annotated[str, BeforeValidator(compression_spec)]


def _name(value: str) -> str:
    if not _NAME.match(value):
        raise ValueError(f"name {value!r} may use letters, digits and _ . + = - only (it names a directory)")
    return value


# Spec, privacy and sweep names become directory and cell-id parts, so all three share one check.
Name = Annotated[str, AfterValidator(_name)]


class SpecEntry(StrictModel):
    """One compression setting. A bare string in the YAML becomes {name: <string>, spec: <string>}."""

    name: Name = Field(description="label in tables and plots")
    spec: Spec = Field(description="the compression spec")

    @model_validator(mode="before")
    @classmethod
    def _from_string(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"name": _short(value), "spec": value}
        return value


def _short(spec: str) -> str:
    """A directory-safe label for a spec string: 'rtopk(ratio=0.01, r=0.05) | ef' -> 'rtopk0.01+ef'."""
    parts = []
    for stage in spec.split("|"):
        stage = stage.strip()
        head = stage.split("(")[0].strip()
        nums = re.findall(r"=\s*([0-9.eE-]+)", stage)
        parts.append(head + (nums[0] if nums else ""))
    return "+".join(parts)


class PrivacyEntry(StrictModel):
    """One DP setting: a `dp(...)` stage put in front of each spec (local DP), and/or key overrides
    (e.g. central DP keys of the federated job). `name: non-private` with neither is plain training."""

    name: Name = Field("non-private", description="label in tables and plots")
    stage: Spec | None = Field(None, description="a single `dp(...)` stage put in front of each spec")
    set: dict[str, Any] = Field(default_factory=dict, description="dotted-key overrides, e.g. central DP keys")

    @field_validator("stage")
    @classmethod
    def _one_dp_stage(cls, value: str | None) -> str | None:
        if value is not None and (not value.startswith("dp(") or "|" in value):
            raise ValueError(f"privacy stage must be a single dp(...) stage, got {value!r}")
        return value

    @property
    def private(self) -> bool:
        return self.stage is not None or bool(self.set)


AuditSetting = Literal["init", "trained", "federated", "secagg"]
DEFAULT_AUDIT_SETTINGS: tuple[AuditSetting, ...] = ("init", "trained", "federated")


class LeakageConfig(StrictModel):
    """The optional leakage column: `gradcomp audit` on each distinct spec (see docs/privacy.md, Leakage audit)."""

    victims: int = Field(8, ge=1, le=256, description="test images attacked")
    batch_sizes: list[int] = Field(
        default_factory=lambda: [1, 4], min_length=1, description="images per sent gradient, each <= victims"
    )
    iterations: int = Field(200, ge=1, le=10_000, description="optimisation steps of each attack")
    settings: list[AuditSetting] = Field(
        default_factory=lambda: list(DEFAULT_AUDIT_SETTINGS),
        min_length=1,
        description="settings each spec is attacked in (model at init, trained model, federated update); worst counts",
    )

    @model_validator(mode="after")
    def _batches_fit(self) -> LeakageConfig:
        bad = [b for b in self.batch_sizes if not 1 <= b <= self.victims]
        if bad:
            raise ValueError(f"batch_sizes {bad} must be between 1 and victims ({self.victims})")
        return self


def _leakage_flag(value: Any) -> Any:
    """`leakage: true` means the default audit, `false` none."""
    if value is True:
        return {}
    return None if value is False else value


class SweepJob(StrictModel):
    """A `gradcomp sweep` file: a grid of cells over a base job."""

    name: Name = Field(description="study name: runs/<name>/")
    base: str = Field(description="base job file, relative to the sweep file")
    runner: Literal["fedsim", "train"] = Field("fedsim", description="what runs each cell")
    spec_key: str | None = Field(None, description="dotted key the spec goes to (default: compression)")
    seed_key: str | None = Field(None, description="dotted key the seed goes to (default: seed)")
    set: dict[str, Any] = Field(default_factory=dict, description="dotted-key overrides for every cell")
    specs: list[SpecEntry] = Field(min_length=1, description="compression settings; a bare string is its own name")
    privacy: list[PrivacyEntry] = Field(
        default_factory=lambda: [PrivacyEntry()], min_length=1, description="privacy settings crossed with specs"
    )
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1, description="one cell per seed")
    grid: dict[str, list[Any]] = Field(default_factory=dict, description="dotted key -> values")
    target_accuracy: float | None = Field(
        default=None, gt=0, le=1, description="report rounds and bytes to reach this test accuracy"
    )
    baseline: str | None = Field(default=None, description="spec name of the dense baseline (default: spec 'none')")
    leakage: Annotated[LeakageConfig | None, BeforeValidator(_leakage_flag)] = Field(
        default=None,
        description="audit each distinct spec once (true, or {victims, batch_sizes, iterations, settings})",
    )

    @field_validator("grid")
    @classmethod
    def _non_empty_axes(cls, value: dict[str, list[Any]]) -> dict[str, list[Any]]:
        for key, values in value.items():
            if not values:
                raise ValueError(f"grid axis {key!r} has no values")
        return value

    @model_validator(mode="after")
    def _unique_and_baseline(self) -> SweepJob:
        for what, names in (("specs", [s.name for s in self.specs]), ("privacy", [p.name for p in self.privacy])):
            dup = sorted({n for n in names if names.count(n) > 1})
            if dup:
                raise ValueError(f"{what}: duplicate names {dup}; give each entry a distinct name")
        if self.baseline is not None and self.baseline not in [s.name for s in self.specs]:
            raise ValueError(f"baseline {self.baseline!r} is not one of the spec names {[s.name for s in self.specs]}")
        for key in (self.spec_key_or_default, self.seed_key_or_default):
            if key in self.grid:
                raise ValueError(f"grid key {key!r} is set by specs/seeds; do not put it in the grid")
        staged = [p.name for p in self.privacy if p.stage is not None]
        if self.runner == "train" and staged:
            raise ValueError(
                f"privacy {staged}: a dp stage is refused in data-parallel training specs; with runner: train "
                "give DP-SGD as keys instead, e.g. {name: dp, set: {dp: {clip: 1.0, noise_multiplier: 1.0}}}"
            )
        return self

    @property
    def spec_key_or_default(self) -> str:
        return self.spec_key or DEFAULT_SPEC_KEY[self.runner]

    @property
    def seed_key_or_default(self) -> str:
        return self.seed_key or DEFAULT_SEED_KEY[self.runner]

    @property
    def baseline_name(self) -> str | None:
        if self.baseline is not None:
            return self.baseline
        return next((s.name for s in self.specs if s.spec == "none"), None)

    def base_path(self, sweep_file: str | Path) -> Path:
        p = Path(self.base)
        return p if p.is_absolute() else Path(sweep_file).resolve().parent / p
