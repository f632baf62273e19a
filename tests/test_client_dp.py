"""Local client-level DP on the client runtime: the dp stage clips the whole update (all tensors
together), and a client's noise is a function of (job seed, client, round), so a round redone
after a coordinator crash and --resume re-sends the same noisy update, not a second release."""

from __future__ import annotations

import pytest
import torch

from gradcomp.fedclient.config import LocalTrainingConfig
from gradcomp.fedclient.data import dataset_tensors
from gradcomp.fedclient.runtime import ClientMemory, ClientRuntime
from gradcomp.protocol.codec import serialize_model
from gradcomp.tasks import load_task

TASK = load_task("digits-mlp")
DATA = dataset_tensors(TASK.train_set).subset(torch.arange(96).numpy())


def _runtime(spec: str) -> ClientRuntime:
    """A fresh client process: nothing carried over but the job's settings and the global model."""
    cfg = LocalTrainingConfig(task="digits-mlp", epochs=1, batch_size=16, lr=0.5, momentum=0.0, spec=spec, seed=7)
    runtime = ClientRuntime(cfg, task=TASK)
    torch.manual_seed(0)
    runtime.load_global(4, serialize_model(dict(TASK.make_model().named_parameters()), 4))
    return runtime


def _update(runtime: ClientRuntime, client: str, round: int) -> tuple[dict[str, torch.Tensor], bytes]:
    result = runtime.train(client, round, DATA)
    request, payloads, _ = runtime.build_update(client, round, 4, result, ClientMemory())
    return {k: p.to_dense() for k, p in payloads.items()}, request.SerializeToString(deterministic=True)


def test_local_dp_clips_the_whole_update_not_each_tensor() -> None:
    runtime = _runtime("dp(clip=0.5, sigma=0.0)")
    raw = runtime.train("c1", 1, DATA)
    deltas = {k: raw.params[k].float() - runtime.global_params[k] for k in runtime.global_params}
    per_tensor = torch.tensor([min(float(d.norm()), 0.5) for d in deltas.values()])
    assert float(per_tensor.norm()) > 0.6  # what clipping each tensor to 0.5 would send: more than the clip
    sent, _ = _update(runtime, "c1", 1)
    whole = torch.cat([t.reshape(-1) for t in sent.values()])
    assert float(whole.norm()) == pytest.approx(0.5, rel=1e-5)  # the clip bounds the update, not each tensor
    # one factor for every tensor: the update's direction is kept
    factor = float(sent["0.weight"].norm() / deltas["0.weight"].norm())
    for name, delta in deltas.items():
        torch.testing.assert_close(sent[name], delta * factor, rtol=1e-4, atol=1e-7)


def test_a_redone_round_resends_the_same_noise() -> None:
    spec = "dp(clip=1.0, sigma=1.0) | rtopk(ratio=0.1, r=0.3) | ef"
    survivor = _runtime(spec)
    first, first_bytes = _update(survivor, "c1", 3)
    assert _update(survivor, "c1", 3)[1] == first_bytes  # the same client process retrains round 3
    assert _update(_runtime(spec), "c1", 3)[1] == first_bytes  # a restarted client retrains round 3
    other, _ = _update(_runtime(spec), "c1", 4)
    neighbour, _ = _update(_runtime(spec), "c2", 3)
    for name in first:
        assert not torch.equal(first[name], other[name])  # fresh noise in a new round
        assert not torch.equal(first[name], neighbour[name])  # and for another client
