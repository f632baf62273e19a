"""Attacks that regenerate DP noise from what the adversary of each mode knows, run against the
code: the noise that protects data must not be reproducible without a secret the adversary lacks.

- Local DP, adversary the coordinator: it knows the job seed, the client's name, the round,
  the global model and the spec. When the noise was keyed by round_seed(job seed,
  client, round), regenerating it recovered the exact clipped update (max error 4.8e-7).
- Central DP, adversary any client: it knows the job seed (every TrainingConfig carries it),
  the released models and the number of clients per round. When the noise was seeded
  with the job seed + 7919, regenerating it recovered the exact sum of the clipped updates, and
  the job seed predicted who was sampled.

Each attack is first shown to work where it should (against the pre-fix construction, or with
the secret in hand), so a failing attack here is the defence, not a broken attack.
"""

from __future__ import annotations

import random

import pytest
import torch

from gradcomp.compression import Dense, Pipeline, parse_spec
from gradcomp.config.fed import FedJob
from gradcomp.fedclient.config import LocalTrainingConfig
from gradcomp.fedclient.data import dataset_view
from gradcomp.fedclient.noisekey import OneKey
from gradcomp.fedclient.runtime import ClientMemory, ClientRuntime
from gradcomp.fedclient.seeds import round_seed
from gradcomp.keyed_random import new_key, subkey
from gradcomp.protocol.codec import serialize_model
from gradcomp.server import store
from gradcomp.server.core import Coordinator
from gradcomp.strategies.aggregate import clipped_sum
from gradcomp.strategies.central_dp import CentralDP
from gradcomp.tasks import load_task

# --- local DP: the coordinator against one client --------------------------------------------------
TASK = load_task("digits-mlp", hidden=16)
DATA = dataset_view(TASK.train_set).subset(torch.arange(64).numpy())
JOB_SEED, CLIENT, ROUND, SIGMA, CLIP = 7, "client-3", 3, 4.0, 1.0
SPEC = f"dp(clip={CLIP}, sigma={SIGMA}) | rtopk(ratio=0.1, r=0.3) | ef"  # dp, then selection and EF after it


def _client() -> ClientRuntime:
    cfg = LocalTrainingConfig(
        task="digits-mlp", epochs=1, batch_size=16, lr=0.5, momentum=0.0, spec=SPEC, seed=JOB_SEED,
        task_args={"hidden": 16},
    )  # fmt: skip
    runtime = ClientRuntime(cfg, task=TASK, noise_keys=OneKey(new_key()))
    torch.manual_seed(0)
    runtime.load_global(2, serialize_model(dict(TASK.make_model().named_parameters()), 2))
    return runtime


def _clipped_update(runtime: ClientRuntime) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The client's update before noise (the deltas, and the jointly clipped vector the dp stage protects)."""
    result = runtime.train(CLIENT, ROUND, DATA)
    deltas = {k: result.params[k].float() - g for k, g in runtime.global_params.items()}
    flat = torch.cat([d.reshape(-1) for d in deltas.values()])
    return deltas, flat * min(1.0, CLIP / float(flat.norm()))


def _coordinator_attack(payloads: dict, names: list[str], sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The attack: regenerate the noise from (job seed, client, round), subtract it from the sent
    values. Returns (the recovered clipped values, their positions in the joint update)."""
    gen = torch.Generator().manual_seed(round_seed(JOB_SEED, CLIENT, ROUND))
    noise = torch.randn(sum(sizes), generator=gen) * SIGMA * CLIP
    recovered, where, offset = [], [], 0
    for name, size in zip(names, sizes, strict=True):
        p = payloads[name]
        idx = p.indices.long() + offset if p.indices is not None else torch.arange(size) + offset
        recovered.append(p.values.float() - noise[idx])
        where.append(idx)
        offset += size
    return torch.cat(recovered), torch.cat(where)


def test_the_coordinator_cannot_remove_a_clients_local_dp_noise() -> None:
    runtime = _client()
    deltas, clipped = _clipped_update(runtime)
    names, sizes = list(deltas), [d.numel() for d in deltas.values()]
    pipe_state = {"steps": dict.fromkeys(names, ROUND), "memory": {}}

    # The attack works on the pre-fix client: noise drawn from the round seed the coordinator can compute.
    before_fix = Pipeline(parse_spec(SPEC), seed=round_seed(JOB_SEED, CLIENT, ROUND))
    before_fix.load_state_dict(pipe_state)
    got, where = _coordinator_attack(before_fix.compress_update(deltas), names, sizes)
    assert float((got - clipped[where]).abs().max()) < 1e-4  # the exact clipped values, as in the audit

    # The real client: its noise is keyed by its own secret, so the same attack recovers noise, not data.
    _, payloads, _ = runtime.build_update(CLIENT, ROUND, 2, runtime.train(CLIENT, ROUND, DATA), ClientMemory(), DATA)
    got, where = _coordinator_attack(payloads, names, sizes)
    error = got - clipped[where]
    # what is left is the client's noise minus the guess: more than sigma * clip per value (rtopk keeps the
    # values the noise made large), against clipped values whose norm over the whole update is <= clip
    assert float(error.std()) > SIGMA * CLIP
    assert float(error.norm()) > 50 * CLIP


# --- central DP: a client against the coordinator's released models -------------------------------
SHAPES = {"w": (40, 25), "b": (25,)}
PARAMS = {k: torch.zeros(s) for k, s in SHAPES.items()}
Z = 1.0


def _central_job(clients: int = 3, per_round: int | None = None) -> FedJob:
    return FedJob.model_validate(
        {
            "rounds": 10,
            "seed": JOB_SEED,
            "clients": {"expected": clients, "min": clients},
            "round": {"min_clients": 1, "fraction": (per_round or clients) / clients},
            "privacy": {"mode": "central", "clip": CLIP, "noise_multiplier": Z},
        }
    )


def _updates(round: int) -> dict[str, dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(100 + round)
    return {n: {k: torch.randn(s, generator=gen) * 0.1 for k, s in SHAPES.items()} for n in ("a", "b", "c")}


def _run_round(coord: Coordinator, updates: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One round with every client reporting; returns the released model."""
    for n in updates:
        coord.register(n)
    chosen = coord.select_clients()
    assert chosen is not None and set(chosen) == set(updates)
    for n, delta in updates.items():
        coord.accept_update(n, coord.version + 1, 5, {k: Dense(v.reshape(-1), tuple(v.shape), v.dtype)
                                                      for k, v in delta.items()})  # fmt: skip
    assert coord.finish_round(force=True) is not None
    return {k: v.clone() for k, v in coord.params.items()}


def _client_attack(before: dict, after: dict, noise: dict[str, torch.Tensor], m: int) -> dict[str, torch.Tensor]:
    """Released aggregate * m minus the regenerated noise: the sum of the clipped updates if the noise is right."""
    return {k: (after[k] - before[k]) * m - noise[k] for k in after}


def _noise_from_job_seed(job: FedJob) -> dict[str, torch.Tensor]:
    """The old construction, regenerated: CentralDP's stream seeded with job seed + 7919, tensors in model order."""
    gen = torch.Generator().manual_seed(job.seed + 7919)
    return {k: torch.randn(s, generator=gen) * Z * CLIP for k, s in SHAPES.items()}


def test_a_client_cannot_remove_the_central_dp_noise() -> None:
    job = _central_job()
    coord = Coordinator(job, PARAMS)
    updates = _updates(1)
    released = _run_round(coord, updates)
    truth = clipped_sum(list(updates.values()), CLIP)

    # With the coordinator's secret (what its checkpoint holds) the attack is exact: the attack is sound.
    strategy = coord.strategy
    assert isinstance(strategy, CentralDP)
    stream = strategy.round_noise(1)
    keyed = {k: stream.normal(s, torch.float32, "cpu") * Z * CLIP for k, s in SHAPES.items()}
    exact = _client_attack(PARAMS, released, keyed, 3)
    for k in SHAPES:
        torch.testing.assert_close(exact[k], truth[k], rtol=0, atol=1e-4)

    # With what a client knows (the job seed), it recovers the sum plus noise of std sqrt(2) * z * clip.
    guessed = _client_attack(PARAMS, released, _noise_from_job_seed(job), 3)
    error = torch.cat([(guessed[k] - truth[k]).reshape(-1) for k in SHAPES])
    assert float(error.std()) == pytest.approx(2**0.5 * Z * CLIP, rel=0.1)


def test_a_client_cannot_predict_who_is_sampled() -> None:
    """The old sampling, predicted: random.Random(seed * 1_000_003 + round * 1_009 + attempt) over the sorted pool."""
    names = [f"c{i:02d}" for i in range(20)]
    coord = Coordinator(_central_job(clients=20, per_round=5), {"w": torch.zeros(3)})
    hits = 0
    for round in range(1, 11):
        for n in names:
            coord.register(n)
        chosen = coord.select_clients()
        assert chosen is not None and len(chosen) == 5
        predicted = sorted(random.Random(JOB_SEED * 1_000_003 + round * 1_009).sample(sorted(names), 5))
        hits += predicted == sorted(chosen)
        for n in chosen:
            coord.accept_update(n, round, 1, {"w": Dense(torch.zeros(3), (3,), torch.float32)})
        assert coord.finish_round(force=True) is not None
    assert hits == 0  # before the fix: 10 of 10 (one exact guess has odds 1 in 15504)


def test_a_resumed_coordinator_continues_the_same_secret_streams(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The legitimate side: the checkpoint carries the secret, so a resumed coordinator samples and noises
    round 2 exactly as the uninterrupted one; a coordinator with another secret does not."""
    job = _central_job(clients=3, per_round=2)
    first = Coordinator(job, PARAMS, checkpoint=lambda co: store.save_state(tmp_path, co.state_dict()))
    _run_round_of_two(first, 1)
    resumed = Coordinator(job, PARAMS)
    resumed.load_state_dict(store.load_state(tmp_path))
    assert resumed.secret == first.secret
    stranger = Coordinator(job, PARAMS)
    stranger.load_state_dict({**store.load_state(tmp_path), "secret": new_key().hex()})
    outcomes = [_run_round_of_two(c, 2) for c in (first, resumed, stranger)]
    assert outcomes[1][0] == outcomes[0][0]
    for k in SHAPES:
        torch.testing.assert_close(outcomes[1][1][k], outcomes[0][1][k], rtol=0, atol=0)
        assert not torch.equal(outcomes[2][1][k], outcomes[0][1][k])


def _run_round_of_two(coord: Coordinator, round: int) -> tuple[list[str], dict[str, torch.Tensor]]:
    for n in "abc":
        coord.register(n)
    chosen = coord.select_clients()
    assert chosen is not None and len(chosen) == 2
    for n in chosen:
        delta = _updates(round)[n]
        coord.accept_update(n, round, 5, {k: Dense(v.reshape(-1), tuple(v.shape), v.dtype) for k, v in delta.items()})
    assert coord.finish_round(force=True) is not None
    return sorted(chosen), {k: v.clone() for k, v in coord.params.items()}


def test_sub_keys_are_independent_of_the_job_seed() -> None:
    """The coordinator's secret never comes from the job: two coordinators of one job hold different ones."""
    job = _central_job()
    a, b = Coordinator(job, PARAMS), Coordinator(job, PARAMS)
    assert a.secret != b.secret and len(a.secret) == 32
    assert subkey(a.secret, "central-dp") != subkey(b.secret, "central-dp")
