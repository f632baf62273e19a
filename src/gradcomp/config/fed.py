"""The federated job file (`gradcomp serve --config FED.yaml`, reused by `gradcomp fedsim`).

Everything a coordinator and its clients need is validated here, before any work starts:
round sizes that cannot be met, an unsound privacy set-up or a compression spec that does
not build fail at load time with the key path named.

`FedJob.client_spec()` is the compression spec every client actually runs: the job's spec,
with `dp(clip, sigma)` prepended for local DP, or a clip-only `dp(clip, sigma=0)` for central DP.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, model_validator

from gradcomp.config.common import RunName, StrictModel, TaskConfig, compression_spec, load_job
from gradcomp.config.secure import SecureAggregationSection, check_secure
from gradcomp.config.serve import LimitsSection, ServerSection
from gradcomp.partition import parse_partition
from gradcomp.privacy import negligible_reach_problem
from gradcomp.strategies import StrategySection, default_config, strategy_class

Spec = Annotated[str, BeforeValidator(compression_spec)]
# Stored in its canonical spelling (`dirichlet(0.5)` -> `dirichlet(alpha=0.5)`), checked at load time.
Partition = Annotated[str, AfterValidator(lambda text: str(parse_partition(text)))]


class ClientsSection(StrictModel):
    """Who takes part: the population the coordinator plans for."""

    expected: int = Field(
        3,
        ge=1,
        description="clients in the population (N): m = ceil(round.fraction * N) are asked per round; DP "
        "plans with m / N but charges each round at the rate it really drew from the connected clients",
    )
    min: int = Field(1, ge=1, description="clients that must be connected before the first round starts")


class RoundSection(StrictModel):
    """How a round asks, waits, retries, and benches clients that miss rounds."""

    fraction: float = Field(1.0, gt=0, le=1, description="fraction of the expected clients asked per round")
    min_clients: int = Field(1, ge=1, description="fewest updates that make a round; fewer means retry")
    deadline_seconds: float = Field(60.0, gt=0, description="how long a round waits for its clients")
    max_retries: int = Field(3, ge=0, description="retries of a round that missed min_clients, then the job fails")
    join_timeout_seconds: float = Field(600.0, gt=0, description="how long to wait for clients.min to connect")
    bench_after_misses: int = Field(
        2,
        ge=1,
        description="consecutive rounds a selected client may end without an accepted update before it is benched",
    )
    bench_rounds: int = Field(
        5, ge=0, description="rounds a benched client is not offered for selection (0: never bench)"
    )


class LocalSection(StrictModel):
    """Each client's local SGD in a round (sent to clients in their training config)."""

    epochs: int = Field(1, ge=1, description="passes over the client's shard per round")
    batch_size: int = Field(32, ge=1, description="local minibatch size")
    lr: float = Field(0.1, gt=0, description="local learning rate")
    momentum: float = Field(0.0, ge=0, lt=1, description="local SGD momentum (reset every round)")
    steps: int = Field(
        0,
        ge=0,
        description="fixed-work mode: this many batches of batch_size drawn with replacement per round, whatever "
        "the shard's size (epochs unused), so a round's time does not reveal it; 0: epochs passes over the shard",
    )


class PrivacySection(StrictModel):
    """Client-level DP (McMahan et al. 2018). local: each client clips and noises its own update;
    central: clients clip, the coordinator clips again and adds Gaussian noise to the sum."""

    mode: Literal["none", "local", "central", "distributed"] = Field(
        "none", description="who adds the noise (docs/privacy.md); distributed needs secure_aggregation"
    )
    clip: float | None = Field(None, gt=0, description="L2 bound on one client's update")
    noise_multiplier: float | None = Field(None, ge=0, description="noise std / clip")
    delta: float = Field(1e-5, gt=0, lt=1, description="the delta every reported epsilon is at")
    epsilon_budget: float | None = Field(None, gt=0, description="stop before epsilon would exceed this")
    accountant: Literal["rdp", "prv", "gdp"] = Field("rdp", description="Opacus accountant that composes the rounds")
    unprotected_metrics: bool = Field(
        False,
        description="central only: write the clients' un-noised example counts and mean train loss into the "
        "round log (results.json, checkpoint, sweep cells); they are outside the guarantee",
    )


class StragglerSection(StrictModel):
    """Slow clients in `gradcomp fedsim`: a fixed, seeded subset whose updates arrive late."""

    fraction: float = Field(0.0, ge=0, le=1, description="share of the clients that are stragglers")
    delay: Literal["fixed", "uniform", "exponential"] = Field(
        "exponential", description="distribution of a straggler's extra delay per round (mean: mean_seconds)"
    )
    mean_seconds: float = Field(0.0, ge=0, description="mean extra delay of a straggler's update")


def _on_off(value: object) -> object:
    """YAML reads a bare on/off as a boolean; take it back as the word."""
    return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


class SimulationConfig(StrictModel):
    """`gradcomp fedsim` only (ignored by `gradcomp serve`): many virtual clients on a Ray actor pool."""

    clients: int | None = Field(None, ge=1, description="virtual clients; sets clients.expected (default: it)")
    partition: Partition = Field(
        "iid",
        description="iid | dirichlet(alpha=A) | shards(k=K labels per client) | natural (the task's own groups: "
        "a source module of the lm task, a FEMNIST writer; whole groups per client, at most one client per group)",
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="probability a selected client drops out of a round")
    dropout_spread: float = Field(
        0.0,
        ge=0,
        lt=1,
        description="0: every client drops out with probability `dropout`; above 0 each client gets its own "
        "probability, drawn once from a Beta distribution with mean `dropout` and variance "
        "dropout_spread * dropout * (1 - dropout), so some clients are nearly always there and some rarely",
    )
    stragglers: StragglerSection = Field(default_factory=StragglerSection)
    actors: int | None = Field(None, ge=0, description="Ray actors (default one per CPU); 0 runs in the driver")
    grpc: bool = Field(False, description="send updates over real gRPC on 127.0.0.1 to the coordinator service")
    secret_seed: int | None = Field(
        None,
        description="seeds the simulated secrets (each client's local-DP noise key, the coordinator's sampling "
        "and central-DP noise; default: the job seed). Everything runs in one process: this models the "
        "deployment's secrets, it protects nothing",
    )
    eval_every: int = Field(1, ge=1, description="evaluate the global model every this many rounds")
    vectorize: Annotated[Literal["auto", "on", "off"], BeforeValidator(_on_off)] = Field(
        "auto",
        description="train each round's clients together with torch.func (vmap over stacked parameters): "
        "auto falls back to one client at a time for models that cannot (batch norm, dropout), on refuses them",
    )


class FedJob(StrictModel):
    name: RunName = Field("fed", description="run name: runs/<name>/")
    task: TaskConfig = Field(default_factory=TaskConfig)
    rounds: int = Field(10, ge=1, description="rounds to aggregate")
    clients: ClientsSection = Field(default_factory=ClientsSection)
    round: RoundSection = Field(default_factory=RoundSection)
    local: LocalSection = Field(default_factory=LocalSection)
    strategy: StrategySection = Field(default_factory=default_config, description="server step (table below)")
    compression: Spec = Field("none", description="each client's update pipeline, e.g. `dp(...) | rtopk(...) | ef`")
    privacy: PrivacySection = Field(default_factory=PrivacySection)
    secure_aggregation: SecureAggregationSection | None = Field(
        None, description="SecAgg+: the coordinator sees only the sum of each round's survivors (docs/privacy.md)"
    )
    limits: LimitsSection = Field(default_factory=LimitsSection)
    server: ServerSection = Field(default_factory=ServerSection)
    seed: int = Field(0, description="public randomness: initial model, batch order, randomk; never noise")
    simulation: SimulationConfig | None = Field(None, description="gradcomp fedsim only")

    def resume_key(self) -> dict[str, Any]:
        """The parts of the job a resumed coordinator must share with the run it continues: all but
        the round count, the server's and limits' operational settings, the round timing, the epsilon
        budget, what the round log reports (privacy.unprotected_metrics) and the simulation section."""
        data = self.model_dump(mode="json")
        for key in ("rounds", "server", "limits", "simulation"):
            data.pop(key, None)
        for key in ("deadline_seconds", "max_retries", "join_timeout_seconds"):
            data["round"].pop(key, None)
        data["privacy"].pop("epsilon_budget", None)
        data["privacy"].pop("unprotected_metrics", None)
        if not data["local"].get("steps"):  # epoch mode, as every checkpoint from before local.steps: still theirs
            data["local"].pop("steps", None)
        return data

    @model_validator(mode="after")
    def _consistent(self) -> FedJob:
        if self.clients.min > self.clients.expected:
            raise ValueError(f"clients.min ({self.clients.min}) exceeds clients.expected ({self.clients.expected})")
        if self.round.min_clients > self.clients_per_round:
            raise ValueError(
                f"round.min_clients ({self.round.min_clients}) exceeds the clients asked per round "
                f"({self.clients_per_round} = max(1, ceil(round.fraction * clients.expected)))"
            )
        if self.limits.max_update_bytes > self.limits.max_message_bytes:
            raise ValueError("limits.max_update_bytes must not exceed limits.max_message_bytes")
        if self.limits.chunk_bytes > self.limits.max_message_bytes // 2:
            raise ValueError("limits.chunk_bytes must be at most half of limits.max_message_bytes")
        self._check_privacy()
        self._check_collective_free()
        self._check_strategy_extras()
        check_secure(self)
        return self

    def _check_strategy_extras(self) -> None:
        """A strategy whose clients send tensors beside the update (SCAFFOLD's control deltas) sends
        them dense and un-noised, and its client state assumes plain SGD steps."""
        from gradcomp.strategies import strategy_class

        half = strategy_class(self.strategy.name).client_half
        if not half.update_names(["x"]):
            return
        if self.privacy.mode == "local":
            raise ValueError(
                f"strategy {self.strategy.name} sends control variates beside each update without local DP's "
                "noise: use privacy.mode none or central, or a strategy without client extras (fedprox)"
            )
        if self.local.momentum:
            raise ValueError(f"strategy {self.strategy.name} needs plain local SGD: set local.momentum: 0")

    def _check_collective_free(self) -> None:
        from gradcomp.compression import build

        reason = build(self.compression).collective_only
        if reason:
            raise ValueError(
                f"compression {self.compression!r} works only in data-parallel training ({reason}); "
                "a federated client compresses its own update alone"
            )

    def _check_privacy(self) -> None:
        from gradcomp.compression import build

        p = self.privacy
        has_dp = build(self.compression).dp is not None
        if p.unprotected_metrics and p.mode != "central":
            raise ValueError(
                "privacy.unprotected_metrics applies to privacy.mode central (local-DP clients never send their "
                f"example count or loss; without DP they are reported anyway), got mode {p.mode}"
            )
        if p.mode == "distributed":
            if has_dp:
                raise ValueError("privacy.mode distributed adds discrete noise under the masks; remove the dp stage")
            return
        if p.mode == "none":
            if has_dp:
                raise ValueError(
                    "compression has a dp stage but privacy.mode is none: set privacy.mode: local "
                    "so epsilon is accounted, or remove the dp stage"
                )
            return
        if p.mode == "central":
            if not strategy_class(self.strategy.name).aggregates_by_mean():
                raise ValueError(
                    f"privacy.mode central adds noise calibrated for the clipped mean; strategy "
                    f"{self.strategy.name!r} aggregates otherwise and cannot be combined with it"
                )
            if has_dp:
                raise ValueError("privacy.mode central adds noise at the coordinator; remove the dp stage")
            if p.clip is None or p.noise_multiplier is None:
                raise ValueError("privacy.mode central needs privacy.clip and privacy.noise_multiplier")
        if p.mode == "local" and not has_dp and (p.clip is None or p.noise_multiplier is None):
            raise ValueError(
                "privacy.mode local needs a dp(clip, sigma) stage in compression, or privacy.clip and "
                "privacy.noise_multiplier (then dp is prepended to the spec)"
            )
        if p.mode == "local" and has_dp:
            dp = build(self.compression).dp
            assert dp is not None
            if (p.clip not in (None, dp.clip)) or (p.noise_multiplier not in (None, dp.sigma)):
                raise ValueError(
                    f"privacy.clip/noise_multiplier ({p.clip}, {p.noise_multiplier}) disagree with the "
                    f"compression dp stage (clip={dp.clip}, sigma={dp.sigma}); give them in one place"
                )
            # The accountant models the Gaussian mechanism; a Laplace stage would get a wrong epsilon.
            if dp.mechanism != "gaussian":
                raise ValueError("client-level DP accounting needs dp(mechanism=gaussian)")
        params = self.dp_params()
        if params is not None and (problem := negligible_reach_problem(params[1], p.delta)) is not None:
            raise ValueError(problem)

    # --- derived values used by coordinator, clients and simulation ---------------------------
    @property
    def clients_per_round(self) -> int:
        """m: clients asked per round."""
        return max(1, math.ceil(self.round.fraction * self.clients.expected))

    @property
    def sample_rate(self) -> float:
        """q = m / N, the planned client sampling rate (the budget check at start; each released round is
        charged at the rate it really drew, `server.accounting.round_sample_rate`)."""
        return min(1.0, self.clients_per_round / self.clients.expected)

    def client_spec(self) -> str:
        """The compression spec clients run (see module docstring)."""
        from gradcomp.compression import build

        p = self.privacy
        base = self.compression
        if p.mode == "local" and build(base).dp is None:
            return _prepend(f"dp(clip={p.clip}, sigma={p.noise_multiplier})", base)
        if p.mode == "central":
            return _prepend(f"dp(clip={p.clip}, sigma=0.0)", base)
        return base

    def reports_client_claims(self) -> bool:
        """Whether the round log may hold what clients claim beside their updates (example counts, mean
        train loss): without DP, or under central DP with `privacy.unprotected_metrics`. Local DP never
        keeps them; central DP would release them un-noised, outside its guarantee."""
        if self.secure_aggregation is not None:  # the coordinator sees sums only, no claims
            return False
        return self.privacy.mode == "none" or (self.privacy.mode == "central" and self.privacy.unprotected_metrics)

    def dp_params(self) -> tuple[float, float] | None:
        """(clip, noise multiplier) of the client-level mechanism, None without DP."""
        from gradcomp.compression import build

        if self.privacy.mode == "none":
            return None
        if self.privacy.mode in ("central", "distributed"):
            assert self.privacy.clip is not None and self.privacy.noise_multiplier is not None
            return self.privacy.clip, self.privacy.noise_multiplier
        dp = build(self.client_spec()).dp
        assert dp is not None
        return dp.clip, dp.sigma


def _prepend(stage: str, spec: str) -> str:
    return stage if spec.strip() == "none" else f"{stage} | {spec}"


def load_fed_job(path: str | Path, overrides: list[str] | None = None) -> FedJob:
    """Load and validate a federated job file (raises ConfigError naming every problem)."""
    return load_job(FedJob, path, overrides)
