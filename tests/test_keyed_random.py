"""Keyed randomness (`keyed_random`) and the client's noise key file (`fedclient.noisekey`)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pytest
import torch

from gradcomp.client.grpc_client import ClientError, FLClient
from gradcomp.compression import build
from gradcomp.fedclient.noisekey import KeyFileError, default_key_path, load_or_create_key
from gradcomp.keyed_random import KeyedStream, new_key, subkey


def test_torch_seeds_are_32_bits_which_is_why_secret_streams_are_not_torch_generators() -> None:
    same = [torch.randn(4, generator=torch.Generator().manual_seed(s)) for s in (5, 2**32 + 5)]
    assert torch.equal(*same)


def test_a_stream_is_its_key_and_position() -> None:
    key = new_key()
    a = KeyedStream(key)
    first, second = a.normal((3, 5), torch.float32, "cpu"), a.normal((7,), torch.float64, "cpu")
    b = KeyedStream(key)
    assert torch.equal(b.normal((3, 5), torch.float32, "cpu"), first)
    assert torch.equal(KeyedStream(key, b.position).normal((7,), torch.float64, "cpu"), second)  # resumed
    assert not torch.equal(KeyedStream(new_key()).normal((3, 5), torch.float32, "cpu"), first)


def test_draws_have_the_right_distribution() -> None:
    n = 200_000
    z = KeyedStream(new_key()).normal((n,), torch.float64, "cpu")
    assert abs(float(z.mean())) < 5 / math.sqrt(n) and float(z.std()) == pytest.approx(1.0, abs=0.01)
    assert float((z.abs() > 1.96).double().mean()) == pytest.approx(0.05, abs=0.003)
    lap = KeyedStream(new_key()).laplace((n,), torch.float64, "cpu")
    assert float(lap.abs().mean()) == pytest.approx(1.0, abs=0.02) and float(lap.var()) == pytest.approx(2.0, rel=0.05)
    u = KeyedStream(new_key()).uniform(n)
    assert u.min() > 0.0 and u.max() < 1.0 and abs(u.mean() - 0.5) < 0.005


def test_sub_keys_separate_uses_and_contexts() -> None:
    key = new_key()
    keys = {subkey(key, "a/b"), subkey(key, "a", "b"), subkey(key, "a", "c"), subkey(new_key(), "a", "b")}
    assert len(keys) == 4 and all(len(k) == 32 for k in keys)
    assert subkey(key, "round", 3) == subkey(key, "round", "3")
    with pytest.raises(ValueError, match="32 bytes"):
        subkey(b"short", "x")
    with pytest.raises(ValueError, match="separator"):
        subkey(key, "a\x1fb")


def test_a_pipeline_with_a_noise_key_noises_from_it() -> None:
    x = {"t": torch.zeros(1000)}
    key = new_key()
    a, b = build("dp(clip=1.0, sigma=1.0)"), build("dp(clip=1.0, sigma=1.0)")
    assert torch.equal(a.compress_update(x)["t"].to_dense(), b.compress_update(x)["t"].to_dense())  # seed 0 both
    keyed = [build("dp(clip=1.0, sigma=1.0)", noise_key=key) for _ in range(2)]
    one, two = (p.compress_update(x)["t"].to_dense() for p in keyed)
    assert torch.equal(one, two) and not torch.equal(one, a.compress_update(x)["t"].to_dense())
    assert float(one.std()) == pytest.approx(1.0, rel=0.1)
    state = keyed[0].state_dict()
    assert state["noise_position"] > 0
    keyed[1].load_state_dict(state)  # continues the first pipeline's stream
    assert torch.equal(keyed[0].compress_update(x)["t"].to_dense(), keyed[1].compress_update(x)["t"].to_dense())


def test_the_key_file_is_made_private_once_and_reused(tmp_path: Path) -> None:
    path = tmp_path / "state" / "client-noise.key"
    key = load_or_create_key(path)
    assert len(key) == 32 and path.stat().st_mode & 0o777 == 0o600
    assert load_or_create_key(path) == key  # a restarted client draws with the same key
    path.chmod(0o644)
    with pytest.raises(KeyFileError, match="readable by other users"):
        load_or_create_key(path)
    path.chmod(0o600)
    path.write_text("abcd\n")
    with pytest.raises(KeyFileError, match="64 hex digits"):
        load_or_create_key(path)


def test_the_default_key_path_follows_xdg_state_home(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert default_key_path() == tmp_path / "gradcomp" / "client-noise.key"
    monkeypatch.delenv("XDG_STATE_HOME")
    assert default_key_path() == Path.home() / ".local" / "state" / "gradcomp" / "client-noise.key"


def _client_args(key_file: Path) -> argparse.Namespace:
    from gradcomp.cli import build_parser

    argv = ["client", "--server", "127.0.0.1:1", "--token", "t" * 12, "--shard", "0/1", "--noise-key-file"]
    return build_parser().parse_args([*argv, str(key_file)])


def test_gradcomp_client_keeps_its_key_across_restarts(tmp_path: Path) -> None:
    key_file = tmp_path / "noise.key"
    first = FLClient(_client_args(key_file))
    second = FLClient(_client_args(key_file))
    try:
        assert first.noise_keys("anyone") == second.noise_keys("c1") == load_or_create_key(key_file)
    finally:
        first.close()
        second.close()
    key_file.chmod(0o640)
    with pytest.raises(ClientError, match="--noise-key-file"):
        FLClient(_client_args(key_file))
