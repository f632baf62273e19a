"""One client's round: the global model (decoded once per version), local training, update =
local - global, compression with the client's error-feedback memory, the protobuf request.

    runtime = ClientRuntime(LocalTrainingConfig.from_pb(task.config), checks=[...], noise_keys=OneKey(key))
    if not runtime.has_global(version):
        runtime.load_global(version, model_bytes)
    out = runtime.train_round(client=name, round=r, model_version=version, data=data, memory=memory)
    out.request  # fed_pb2.SubmitUpdateRequest; out.memory is what the client keeps for next time

`train_round` = `train` (the `LocalTrainer`, replaceable by a cohort trainer) + `build_update`.
The compression pipeline is rebuilt every round from `round_seed(job seed, client, round)` with
its step counters at the round number and the client's residuals loaded; its dp stage draws its
noise from the client's secret key (`noisekey`: keyed by the client key and every input of the
release, the data included). So the result depends only on (job, client, round, global model, data,
memory, the client's key), not on where the client runs, and the coordinator cannot regenerate the noise.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from gradcomp._proto import fed_pb2
from gradcomp.compression import Dense, Payload, Pipeline, parse_spec
from gradcomp.compression.stages import DP
from gradcomp.fedclient.config import ConfigCheck, LocalTrainingConfig, TaskRefused, run_checks
from gradcomp.fedclient.data import ClientData
from gradcomp.fedclient.noisekey import NoiseKeys, config_digest, fresh_keys, release_key
from gradcomp.fedclient.secure import secure_input
from gradcomp.fedclient.seeds import round_seed
from gradcomp.fedclient.train import LocalTrainer, SGDConfig, SGDTrainer, TrainResult, num_steps
from gradcomp.protocol.messages import PRIVATE_EXAMPLE_COUNT, update_request
from gradcomp.protocol.received import ModelSpec, decode_global
from gradcomp.strategies import Correction
from gradcomp.tasks import Task, load_task

Params = dict[str, torch.Tensor]


@dataclass
class ClientMemory:
    """What a client carries from round to round."""

    residuals: Params = field(default_factory=dict)  # error-feedback memory per tensor (full-size only)
    last_round: int = 0  # the last round this client trained for (0: none yet)
    strategy_state: Params = field(default_factory=dict)  # the strategy's client state (SCAFFOLD's c_i)

    def already_trained(self, round: int) -> bool:
        return round <= self.last_round


@dataclass(frozen=True)
class RoundUpdate:
    request: fed_pb2.SubmitUpdateRequest
    payload_bytes: int  # sum of the tensors' compression wire sizes
    num_examples: int
    train_loss: float
    memory: ClientMemory  # the client's memory after this round
    seconds: float  # local training + compression time
    secure_input: np.ndarray | None = None  # under secure aggregation: the input for the SecAgg round


class ClientRuntime:
    """Holds the task, one model (inside the trainer) and the decoded global model; no client state.
    `noise_keys` gives a client's secret noise key by its name (default: one fresh key for this runtime,
    secret but not reproduced by a restarted process)."""

    def __init__(
        self,
        config: LocalTrainingConfig,
        *,
        task: Task | None = None,
        trainer: LocalTrainer | None = None,
        checks: Sequence[ConfigCheck] = (),
        noise_keys: NoiseKeys | None = None,
        task_checks: Sequence[Callable[[Task], None]] = (),
    ):
        run_checks(config, checks)  # before the task is even loaded
        self.config = config
        self.noise_keys = noise_keys if noise_keys is not None else fresh_keys()
        self.task = task if task is not None else load_task(config.task, **config.task_args)
        for check in task_checks:  # before its model is built (WorkLimits.check_model)
            check(self.task)
        model = self.task.make_model()
        self.trainer: LocalTrainer = trainer if trainer is not None else SGDTrainer(model, self.task.objective)
        self.half = config.half()  # the strategy's client half: what it adds to the local loss, what it sends
        names = list(ModelSpec.of(model).tensors)
        self.served = self.half.served_names(names)  # tensors the strategy serves beside the model
        self.expected = ModelSpec.of(model, self.served)  # what a global model from the coordinator must be
        self.global_version: int | None = None
        self.global_digest = ""  # SHA-256 of the loaded model's bytes: part of each release's noise key
        self.global_params: Params = {}
        self.global_extras: Params = {}
        self.stages = parse_spec(config.spec)  # stages hold settings only; each round's Pipeline holds the state
        self.dp_stage: DP | None = next((s for s in self.stages if isinstance(s, DP)), None)  # draws from the noise key
        self.config_sha = config_digest(config)  # part of every release's noise key, fixed for the runtime
        if self.dp_stage is not None and self.dp_stage.sigma > 0 and self.half.update_names(names):
            raise TaskRefused(
                f"strategy {config.strategy!r} sends tensors beside the update that the dp stage does not noise; "
                "this client refuses to release them under local DP"
            )

    def has_global(self, version: int) -> bool:
        return version == self.global_version

    def load_global(self, version: int, model: bytes) -> None:
        """Decode a serialised `ModelWeights` (no-op when this version is already loaded); bytes that are
        not a model of this task raise `ModelMismatch` (protocol/received.py) before any tensor is built."""
        if self.has_global(version):
            return
        got, params = decode_global(model, self.expected)
        if got != version:
            raise ValueError(f"model bytes hold version {got}, expected {version}")
        self.global_extras = {k: params.pop(k) for k in self.served}
        self.global_params, self.global_version = params, version
        self.global_digest = hashlib.sha256(model).hexdigest()

    def correction(self, state: Params) -> Correction | None:
        """The strategy's term in this round's local loss, given the client's strategy state."""
        anchors = self.half.anchors({**self.global_params, **self.global_extras}, state)
        return None if anchors is None else Correction(self.half, anchors)

    def seed_for(self, client: str, round: int) -> int:
        """The seed of `client`'s batch order and random selection in `round` (known to the coordinator)."""
        return round_seed(self.config.seed, client, round)

    def noise_key_for(self, client: str, round: int, model_version: int, data: ClientData) -> bytes:
        """The secret key of `client`'s dp noise in `round` on the loaded global model and `data` (`noisekey`)."""
        if model_version != self.global_version:
            raise ValueError(f"an update on model v{model_version} while v{self.global_version} is loaded")
        return release_key(
            self.noise_keys(client),
            config_sha=self.config_sha,
            data=data,
            client=client,
            round=round,
            model_version=model_version,
            model_digest=self.global_digest,
        )

    def train(self, client: str, round: int, data: ClientData, state: Params | None = None) -> TrainResult:
        """Local training on the loaded global model; `state` is the client's strategy state."""
        if self.global_version is None:
            raise RuntimeError("no global model loaded: call load_global first")
        seed = self.seed_for(client, round)
        return self.trainer.train(self.global_params, data, self.config, seed, self.correction(state or {}))

    def build_update(
        self, client: str, round: int, model_version: int, result: TrainResult, memory: ClientMemory, data: ClientData
    ) -> tuple[fed_pb2.SubmitUpdateRequest, dict[str, Payload], ClientMemory]:
        """Compress local - global (tensors in the global model's order) into the request; `result` was
        trained on `data`. The tensors are compressed as one update: a dp stage clips and noises the
        whole update jointly."""
        noise_key = self.noise_key_for(client, round, model_version, data) if self.dp_stage is not None else None
        pipe = Pipeline(self.stages, seed=self.seed_for(client, round), noise_key=noise_key)
        names = list(self.global_params)
        # Step counters at the round number: shared-seed randomk positions agree across a round's clients.
        state: dict[str, object] = {"steps": dict.fromkeys(names, round)}
        if pipe.ef:
            state["memory"] = dict(memory.residuals)
        pipe.load_state_dict(state)
        payloads = pipe.compress_update({k: result.params[k].float() - self.global_params[k] for k in names})
        kept_state, extras = self._strategy_round(result, memory.strategy_state)
        payloads.update({k: Dense(v.reshape(-1).float(), tuple(v.shape), torch.float32) for k, v in extras.items()})
        num_examples, stats = _disclosed(pipe, result)
        request = update_request(
            client_id=client,
            round=round,
            model_version=model_version,
            num_examples=num_examples,
            payloads=payloads,
            metrics=stats,
        )
        return request, payloads, ClientMemory(_full_residuals(pipe, self.global_params), round, kept_state)

    def secure_input(
        self, client: str, round: int, model_version: int, payloads: Mapping[str, Payload], data: ClientData
    ) -> np.ndarray:
        """Under secure aggregation: the client's input for the round (`fedclient.secure`), its rounding
        and noise keyed by the round's release key (so a redone round re-sends the same input)."""
        if self.config.secure is None:
            raise ValueError("this job has no secure aggregation")
        key = self.noise_key_for(client, round, model_version, data)
        return secure_input(payloads, self.config.secure, key)

    def _strategy_round(self, result: TrainResult, state: Params) -> tuple[Params, Params]:
        """The client's next strategy state and the tensors the strategy sends beside the update."""
        if not self.half.stateful:
            return state, {}
        steps = num_steps(result.num_examples, SGDConfig.of(self.config))
        new = self.half.after_round(
            {**self.global_params, **self.global_extras}, result.params, steps, self.config.lr, state
        )
        return new, self.half.update_extras(state, new)

    def train_round(
        self, *, client: str, round: int, model_version: int, data: ClientData, memory: ClientMemory
    ) -> RoundUpdate:
        if model_version != self.global_version:
            raise ValueError(f"round {round} wants model v{model_version}; v{self.global_version} is loaded")
        t0 = time.perf_counter()
        result = self.train(client, round, data, memory.strategy_state)
        request, payloads, kept = self.build_update(client, round, model_version, result, memory, data)
        secure = self.secure_input(client, round, model_version, payloads, data) if self.config.secure else None
        return RoundUpdate(
            request=request,
            payload_bytes=sum(p.nbytes for p in payloads.values()),
            num_examples=result.num_examples,
            train_loss=result.train_loss,
            memory=kept,
            seconds=time.perf_counter() - t0,
            secure_input=secure,
        )


def _disclosed(pipe: Pipeline, result: TrainResult) -> tuple[int, dict[str, float]]:
    """The example count and metrics a request carries beside the update. Under local DP (a dp stage
    that adds noise: the coordinator is the adversary) a constant count and no loss: both would
    reach the coordinator without noise. Otherwise the true count (FedAvg's weight) and the loss."""
    dp = pipe.dp
    if dp is not None and dp.sigma > 0:
        return PRIVATE_EXAMPLE_COUNT, {}
    return result.num_examples, {"train_loss": result.train_loss}


def _full_residuals(pipe: Pipeline, like: Mapping[str, torch.Tensor]) -> Params:
    """Residuals worth keeping: full-size ones (a residual over a dp-chosen subset starts afresh)."""
    out: Params = {}
    for k, t in like.items():
        r = pipe.residual(k)
        if r is not None and r.numel() == t.numel():
            out[k] = r.detach().reshape(-1).to(torch.float32).clone()
    return out
