"""Local client-level DP on the client runtime: the dp stage clips the whole update (all tensors
together), and a client's noise is a function of its secret key and the release's inputs (job
config, client, round, global model), so a round redone after a coordinator crash and --resume
re-sends the same noisy update, not a second release; the coordinator, which knows everything
but the key, cannot regenerate the noise (`test_noise_secrecy.py` runs that attack)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gradcomp.fedclient.config import LocalTrainingConfig
from gradcomp.fedclient.data import dataset_view
from gradcomp.fedclient.noisekey import CONFIG_FIELDS, OneKey, UnlistedConfigField, config_digest
from gradcomp.fedclient.runtime import ClientMemory, ClientRuntime
from gradcomp.keyed_random import new_key
from gradcomp.protocol.codec import serialize_model
from gradcomp.secagg.plan import ClientEncoding
from gradcomp.tasks import load_task

TASK = load_task("digits-mlp")
DATA = dataset_view(TASK.train_set).subset(torch.arange(96).numpy())
KEY = new_key()  # the client's noise key (what `gradcomp client` keeps in its --noise-key-file)


def _runtime(spec: str, key: bytes = KEY, model_seed: int = 0) -> ClientRuntime:
    """A fresh client process: nothing carried over but its key, the job's settings and the global model."""
    cfg = LocalTrainingConfig(task="digits-mlp", epochs=1, batch_size=16, lr=0.5, momentum=0.0, spec=spec, seed=7)
    runtime = ClientRuntime(cfg, task=TASK, noise_keys=OneKey(key))
    torch.manual_seed(model_seed)
    runtime.load_global(4, serialize_model(dict(TASK.make_model().named_parameters()), 4))
    return runtime


def _update(runtime: ClientRuntime, client: str, round: int) -> tuple[dict[str, torch.Tensor], bytes]:
    result = runtime.train(client, round, DATA)
    request, payloads, _ = runtime.build_update(client, round, 4, result, ClientMemory(), DATA)
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
    assert _update(_runtime(spec), "c1", 3)[1] == first_bytes  # a restarted client with its key retrains round 3
    other, _ = _update(_runtime(spec), "c1", 4)
    neighbour, _ = _update(_runtime(spec), "c2", 3)
    for name in first:
        assert not torch.equal(first[name], other[name])  # fresh noise in a new round
        assert not torch.equal(first[name], neighbour[name])  # and for another client name
    assert _update(_runtime(spec, key=new_key()), "c1", 3)[1] != first_bytes  # another key: other noise


def _noise(runtime: ClientRuntime, client: str, round: int) -> torch.Tensor:
    """What the dp stage added: the update sent minus the clipped update (dense spec, no selection)."""
    result = runtime.train(client, round, DATA)
    deltas = torch.cat(
        [(result.params[k].float() - runtime.global_params[k]).reshape(-1) for k in runtime.global_params]
    )
    clipped = deltas * min(1.0, 1.0 / float(deltas.norm()))
    sent, _ = _update(runtime, client, round)
    return torch.cat([sent[k].reshape(-1) for k in runtime.global_params]) - clipped


def test_two_releases_on_different_inputs_never_share_noise() -> None:
    """A coordinator that asks the same round again with another global model gets independent noise,
    not the same noise on a different update (whose difference would cancel it)."""
    spec = "dp(clip=1.0, sigma=2.0)"
    first = _noise(_runtime(spec), "c1", 3)
    again = _noise(_runtime(spec), "c1", 3)
    torch.testing.assert_close(again, first, rtol=0, atol=1e-5)  # same inputs: same noise (up to float rounding)
    other_model = _noise(_runtime(spec, model_seed=1), "c1", 3)
    assert float(first.std()) == pytest.approx(2.0, rel=0.05)  # the noise the spec asks for, sigma * clip
    corr = float(torch.corrcoef(torch.stack([first, other_model]))[0, 1])
    assert abs(corr) < 0.05, corr


BASE = LocalTrainingConfig(
    task="digits-mlp", epochs=1, batch_size=16, lr=0.5, momentum=0.0, spec="dp(clip=1.0, sigma=1.0)", seed=7,
    task_args={"hidden": 16}, strategy="fedprox",
)  # fmt: skip


def test_the_noise_key_hashes_an_explicit_versioned_list_of_config_fields() -> None:
    """Every field of the config changes the key (a setting that changes the update and not the key
    would let two different updates share noise), and the encoding is pinned: a change to the list
    or to how it is hashed must bump NOISE_KEY_VERSION and update this digest."""
    assert set(CONFIG_FIELDS) == {f.name for f in dataclasses.fields(LocalTrainingConfig)}
    assert config_digest(BASE) == "c434aa81a6f83e757a4b235d0c49b3eec9cf5b1a252c650b453ddfd80c845fb7"
    changed = {"task": "digits-cnn", "epochs": 2, "batch_size": 8, "lr": 0.25, "momentum": 0.5,
               "spec": "dp(clip=1.0, sigma=2.0)", "seed": 8, "task_args": {"hidden": 17},
               "strategy": "scaffold", "strategy_settings": {"mu": 0.1}, "steps": 4,
               "secure": ClientEncoding(32, 1.0, 1024.0, 1100.0, "9")}  # fmt: skip
    assert set(changed) == set(CONFIG_FIELDS)
    digests = {config_digest(dataclasses.replace(BASE, **{name: value})) for name, value in changed.items()}
    assert len(digests) == len(changed) and config_digest(BASE) not in digests

    @dataclasses.dataclass(frozen=True)
    class WithMu(LocalTrainingConfig):  # a new client setting (a FedProx mu) not yet in the key
        mu: float = 0.01

    with pytest.raises(UnlistedConfigField, match="mu"):
        config_digest(WithMu(**{f: getattr(BASE, f) for f in CONFIG_FIELDS}))


def test_the_noise_key_covers_the_data() -> None:
    """Same key, client, round, model and config on other examples (another shard): another release key."""
    runtime = _runtime("dp(clip=1.0, sigma=1.0)")
    other = dataset_view(TASK.train_set).subset(torch.arange(96, 192).numpy())
    same = dataset_view(TASK.train_set).subset(torch.arange(96).numpy())  # equal examples, another object
    key = runtime.noise_key_for("c1", 3, 4, DATA)
    assert runtime.noise_key_for("c1", 3, 4, same) == key
    assert runtime.noise_key_for("c1", 3, 4, other) != key
    flipped = type(DATA).of_tensors(DATA.x, DATA.y.roll(1))  # the same inputs with other labels
    assert runtime.noise_key_for("c1", 3, 4, flipped) != key
