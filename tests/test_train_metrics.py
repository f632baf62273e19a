"""The driver's training metrics: progress events in, `gradcomp_train_*` series out, over real HTTP.

No Ray here: the events are the dicts worker/loop.py puts on the queue. A real run's metrics
are checked against a real Prometheus in test_prometheus.py and against results.json in
test_train_ray.py.
"""

from __future__ import annotations

import math
import re
import socket
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gradcomp import metrics
from gradcomp.cli import main
from gradcomp.worker.train_metrics import TrainMetrics, exported


def step(rank: int, **kw: float) -> dict[str, float | int | str]:
    event = {"type": "step", "rank": rank, "epoch": 0, "step": 1, "loss": 2.0, "examples": 16}
    event.update(bytes_sent=100, dense_bytes=5000, compression_ratio=50.0, step_seconds=0.02, lr=0.1)
    return {**event, **kw}


def test_step_events_count_per_rank() -> None:
    obs = TrainMetrics("tm-steps", world=2, batch_size=16)
    for rank in (0, 1, 0):
        obs.observe(step(rank, loss=1.5 + rank))
    obs.observe(step(1, examples=13, bytes_sent=7, dense_bytes=7, compression_ratio=1.0, lr=0.05))
    r0, r1 = {"run": "tm-steps", "rank": "0"}, {"run": "tm-steps", "rank": "1"}
    assert metrics.value("gradcomp_train_steps_total", r0) == 2
    assert metrics.value("gradcomp_train_examples_total", r1) == 16 + 13  # a DP-SGD batch's own size
    assert metrics.value("gradcomp_train_bytes_sent_total", r1) == 107
    assert metrics.value("gradcomp_train_dense_bytes_total", r0) == 10000
    assert metrics.value("gradcomp_train_compression_ratio", r1) == 1.0  # the last step's
    assert metrics.value("gradcomp_train_loss", r0) == 1.5  # the last step's minibatch
    assert metrics.value("gradcomp_train_loss", r1) == 2.0
    assert metrics.value("gradcomp_train_step_duration_seconds_count", r0) == 2
    assert metrics.value("gradcomp_train_step_duration_seconds_sum", r0) == pytest.approx(0.04)
    assert metrics.value("gradcomp_train_learning_rate", {"run": "tm-steps"}) == 0.05


def test_epoch_restore_and_privacy_events() -> None:
    obs = TrainMetrics("tm-epoch", world=1, batch_size=8)
    run = {"run": "tm-epoch"}
    assert metrics.REGISTRY.get_sample_value("gradcomp_train_restores_total", run) == 0  # exported before any
    assert metrics.REGISTRY.get_sample_value("gradcomp_train_privacy_epsilon", run) is None  # only with DP
    obs.observe({"type": "restored", "path": "/ckpt"})
    obs.observe({"type": "epoch", "epoch": 3, "train_loss": 0.5, "test_accuracy": 0.9, "test_loss": 0.3})
    obs.observe({"type": "epoch", "epoch": 4, "train_loss": 0.4, "epsilon": 1.25, "delta": 1e-5})
    assert metrics.value("gradcomp_train_restores_total", run) == 1
    assert metrics.value("gradcomp_train_epoch", run) == 4
    assert metrics.value("gradcomp_train_test_accuracy", run) == 0.9  # kept from the last evaluation
    assert metrics.value("gradcomp_train_test_loss", run) == 0.3
    assert metrics.value("gradcomp_train_privacy_epsilon", run) == 1.25
    obs.observe({"type": "epoch", "epoch": 5, "epsilon": None})  # DP without noise: results.json's null
    assert math.isinf(metrics.value("gradcomp_train_privacy_epsilon", run))


@pytest.mark.server
def test_exported_serves_every_rank_from_the_start_and_closes(capsys: pytest.CaptureFixture[str]) -> None:
    with exported("tm-http", 3, 8, 0, "127.0.0.1", 0.0) as observe:
        assert observe is not None
        observe(step(2))
        port = int(re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", capsys.readouterr().err).group(1))
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    samples = [
        s for fam in text_string_to_metric_families(text) for s in fam.samples if s.labels.get("run") == "tm-http"
    ]
    steps = {s.labels["rank"]: s.value for s in samples if s.name == "gradcomp_train_steps_total"}
    assert steps == {"0": 0.0, "1": 0.0, "2": 1.0}  # ranks without a step yet are there at 0
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5)


def test_no_port_no_endpoint() -> None:
    with exported("tm-off", 1, 8, None, "127.0.0.1", 0.0) as observe:
        assert observe is None


@pytest.mark.server
def test_metrics_port_in_use_is_a_user_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("name: busy\ntask: digits-mlp\nepochs: 1\nbatch_size: 16\nscaling: {num_workers: 1}\n")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        code = main(["train", str(job), "--runs-dir", str(tmp_path), "--metrics-port", str(port)])
    assert code == 2
    assert f"--metrics-port {port}" in capsys.readouterr().err
    assert not (tmp_path / "busy").exists()  # refused before Ray or the run directory
