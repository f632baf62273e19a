"""Shared pieces: job-file loading and overrides, the privacy ledger, run records, tasks, the CLI."""

import json
import math
from typing import Annotated

import pytest
import torch
from pydantic import BeforeValidator, Field

from gradcomp import cli
from gradcomp.config import ConfigError, StrictModel, apply_overrides, compression_spec, load_job
from gradcomp.privacy import BudgetExceeded, PrivacyLedger
from gradcomp.results import RunRecord, atomic_write_json
from gradcomp.tasks import TaskError, evaluate, load_task


class _Inner(StrictModel):
    epochs: int = Field(1, ge=1)


class _Job(StrictModel):
    name: str
    compression: Annotated[str, BeforeValidator(compression_spec)] = "none"
    train: _Inner = _Inner()


def _write(tmp_path, text: str):
    p = tmp_path / "job.yaml"
    p.write_text(text)
    return p


def test_job_file_loads_with_overrides_and_normalised_spec(tmp_path) -> None:
    path = _write(tmp_path, "name: a\ncompression: [topk(0.01), ef]\n")
    job = load_job(_Job, path, ["train.epochs=3"])
    assert job.train.epochs == 3
    assert job.compression == "topk(ratio=0.01) | ef"


@pytest.mark.parametrize(
    "text,fragments",
    [
        ("name: a\nepochz: 3\n", ["epochz: unknown key"]),
        ("name: a\ntrain: {epochs: 0}\n", ["train.epochs", "greater than or equal to 1", "got 0"]),
        ("name: a\ntrain: {epochs: many}\n", ["train.epochs", "valid integer"]),
        ("name: a\ncompression: topk(ratio=2)\n", ["compression", "argument 'ratio' must be in (0, 1]"]),
        ("name: a\ncompression: rtopk(ratio=0.01, r=0.05) | dp(clip=1, sigma=1)\n", ["'rtopk' before 'dp'"]),
        ("compression: none\n", ["name: Field required"]),
        ("- a\n- b\n", ["top level must be a mapping"]),
        ("name: [unclosed\n", ["not valid YAML"]),
    ],
)
def test_bad_job_files_name_the_key_and_problem(tmp_path, text: str, fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        load_job(_Job, _write(tmp_path, text))
    for fragment in fragments:
        assert fragment in str(info.value)
    assert str(tmp_path / "job.yaml") in str(info.value)


def test_missing_job_file_and_bad_overrides(tmp_path) -> None:
    with pytest.raises(ConfigError, match="no such job file"):
        load_job(_Job, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="expected key=value"):
        apply_overrides({}, ["train.epochs"])
    with pytest.raises(ConfigError, match="is not a section"):
        apply_overrides({"train": 3}, ["train.epochs=1"])
    assert apply_overrides({"a": {"b": 1}}, ["a.c=[1, 2]"]) == {"a": {"b": 1, "c": [1, 2]}}


def test_privacy_ledger_matches_opacus_and_enforces_budget() -> None:
    from opacus.accountants import RDPAccountant

    ledger = PrivacyLedger(delta=1e-5, budget=3.0)
    reference = RDPAccountant()
    assert ledger.epsilon() == 0.0
    for _ in range(10):
        ledger.step(noise_multiplier=1.1, sample_rate=0.1)
        reference.step(noise_multiplier=1.1, sample_rate=0.1)
    assert ledger.epsilon() == pytest.approx(reference.get_epsilon(1e-5))
    assert ledger.steps == 10
    assert ledger.epsilon_after(1.1, 0.1, 5) > ledger.epsilon()
    before = ledger.epsilon()
    with pytest.raises(BudgetExceeded, match="budget 3.0"):
        ledger.step(noise_multiplier=1.1, sample_rate=0.1, steps=10_000)
    assert ledger.epsilon() == before, "a refused step records nothing"
    restored = PrivacyLedger(delta=1e-5)
    restored.load_state_dict(json.loads(json.dumps(ledger.state_dict())))
    assert restored.epsilon() == pytest.approx(before)


@pytest.mark.parametrize(
    "kwargs,fragment",
    [
        ({"delta": 0}, "delta"),
        ({"delta": 1e-5, "accountant": "x"}, "one of"),
        ({"delta": 1e-5, "budget": -1}, "budget"),
    ],
)
def test_privacy_ledger_rejects_bad_settings(kwargs, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        PrivacyLedger(**kwargs)


def test_run_record_writes_and_resumes_results_json(tmp_path) -> None:
    rec = RunRecord(tmp_path / "r", "r", "train", {"epochs": 2})
    rec.log({"epoch": 1, "accuracy": 0.5}, bytes_sent=10, dense_bytes=100)
    rec.set_privacy(1.5, 1e-5)
    out = rec.finish(accuracy=0.5)
    on_disk = json.loads((tmp_path / "r" / "results.json").read_text())
    assert on_disk["bytes_sent"] == 10 and on_disk["dense_bytes"] == 100 and on_disk["epsilon"] == 1.5
    assert on_disk["history"] == [{"epoch": 1, "accuracy": 0.5}] and out["finished_at"]
    again = RunRecord.resume(tmp_path / "r", "r", "train", {"epochs": 2})
    again.log({"epoch": 2, "accuracy": 0.7}, bytes_sent=5)
    assert json.loads(again.path.read_text())["bytes_sent"] == 15
    assert again.final == {"epoch": 2, "accuracy": 0.7}


def test_run_record_history_is_changed_through_its_methods(tmp_path) -> None:
    rec = RunRecord(tmp_path / "r", "r", "fedsim", {})
    rec.log({"round": 1, "test_accuracy": 0.4}, bytes_sent=10, dense_bytes=100)
    rec.log({"round": 2, "test_accuracy": 0.6}, bytes_sent=10, dense_bytes=100)
    rec.history[0]["round"] = 99  # a copy: the record is not changed behind its back
    rec.alias_metric("test_accuracy", "accuracy")
    assert [h["accuracy"] for h in rec.history] == [0.4, 0.6]
    rec.replace_history(rec.history[:1], bytes_sent=10, dense_bytes=100)
    rec.save()
    on_disk = json.loads(rec.path.read_text())
    assert on_disk["history"] == [{"round": 1, "test_accuracy": 0.4, "accuracy": 0.4}]
    assert on_disk["final"] == on_disk["history"][-1] and (on_disk["bytes_sent"], on_disk["dense_bytes"]) == (10, 100)
    rec.replace_history([], bytes_sent=0, dense_bytes=0)
    assert rec.final == {} and rec.history == []


def test_atomic_json_writes_tensors_as_numbers(tmp_path) -> None:
    atomic_write_json(tmp_path / "x.json", {"t": torch.tensor(2.5)})
    assert json.loads((tmp_path / "x.json").read_text()) == {"t": 2.5}


def test_results_json_is_strict_json(tmp_path) -> None:
    """A diverged loss or the infinite epsilon of noiseless DP becomes null, never NaN/Infinity."""
    rec = RunRecord(tmp_path / "r", "r", "train", {})
    rec.log({"epoch": 1, "loss": float("nan"), "t": torch.tensor(float("inf"))})
    rec.set_privacy(math.inf, 1e-5)
    rec.finish(loss=float("-inf"), ok=[1.0, float("nan")])
    text = (tmp_path / "r" / "results.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert data["history"] == [{"epoch": 1, "loss": None, "t": None}]
    assert data["epsilon"] is None and data["final"]["loss"] is None and data["final"]["ok"] == [1.0, None]


def test_builtin_tasks_load_and_train_shapes() -> None:
    for name, shape in (("digits-mlp", (64,)), ("digits-cnn", (1, 8, 8))):
        task = load_task(name)
        x, _ = task.train_set[0]
        assert tuple(x.shape) == shape and len(task.train_set) + len(task.test_set) == 1797
        assert task.make_model()(x.unsqueeze(0)).shape == (1, 10)
        assert 0 <= evaluate(task.make_model(), task.test_set)["accuracy"] <= 1
    syn = load_task("synthetic", num_params=50_000)
    assert abs(sum(p.numel() for p in syn.make_model().parameters()) - 50_000) < 300


def test_task_errors_are_clear() -> None:
    with pytest.raises(TaskError, match="unknown task 'mnist'"):
        load_task("mnist")
    with pytest.raises(TaskError, match="cannot be loaded"):
        load_task("no_such_module:f")
    with pytest.raises(TaskError, match="bad arguments"):
        load_task("digits-mlp", width=3)


def test_cli_reports_user_errors_cleanly(capsys) -> None:
    assert cli.main(["bench", "no_such_benchmark"]) == 2
    err = capsys.readouterr().err
    assert "gradcomp bench: error: no benchmark 'no_such_benchmark'" in err and "compress" in err
    with pytest.raises(SystemExit):
        cli.main(["frobnicate"])


@pytest.mark.parametrize("module,model", [("gradcomp.config.train", "TrainJob"), ("gradcomp.config.fed", "FedJob")])
def test_train_and_fed_jobs_share_the_task_section(module: str, model: str) -> None:
    import importlib

    job_cls = getattr(importlib.import_module(module), model)
    job = job_cls.model_validate({"name": "t", "task": "digits-cnn"})
    assert job.task.name == "digits-cnn" and job.task.args == {}
    job = job_cls.model_validate({"name": "t", "task": {"name": "synthetic", "args": {"num_params": 1000}}})
    assert job.task.args == {"num_params": 1000}
    with pytest.raises(ValueError, match="unknown task 'mnist'"):
        job_cls.model_validate({"name": "t", "task": "mnist"})
