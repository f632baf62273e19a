"""QSGD (the qsgd stage and its payload kind): unbiased within its variance bound, exact byte
counts on the wire, strict decoding of forged fields, and the federated round trip through
protobuf into the coordinator's aggregate. The data-parallel collective is tested with the
others in test_collectives.py and test_hook.py."""

from __future__ import annotations

import math
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradcomp._proto import fed_pb2
from gradcomp.compression import Fields, SpecError, WireError, build, decode, encode, from_fields
from gradcomp.compression.stages.qsgd import QSGDPayload
from gradcomp.config.fed import FedJob
from gradcomp.protocol.messages import update_fields, update_request
from gradcomp.protocol.model import model_spec
from gradcomp.server.core import Coordinator
from gradcomp.server.updates import Rejected, decode_update, update_nbytes
from gradcomp.worker.collectives import sent_bytes


def test_unbiased_within_the_papers_variance_bound() -> None:
    x = torch.randn(300, generator=torch.Generator().manual_seed(0))
    levels, bucket, draws = 3, 100, 4000
    pipe = build(f"qsgd(levels={levels}, bucket={bucket})", seed=1)
    samples = torch.stack([pipe.compress(x, "k").to_dense() for _ in range(draws)])
    # Per coordinate the level is floor(t) or floor(t) + 1 (t = s|x|/||bucket||): its variance is
    # p(1 - p) steps^2, so the mean of `draws` samples lies within 5 standard errors of x.
    norms = x.view(-1, bucket).norm(dim=1).repeat_interleave(bucket)
    t = levels * x.abs() / norms
    p = t - t.floor()
    std_err = (norms / levels) * (p * (1 - p)).sqrt() / math.sqrt(draws)
    assert ((samples.mean(0) - x).abs() <= 5 * std_err + 1e-6).all()
    # Lemma 3.1: E||Q(v) - v||^2 <= min(d / s^2, sqrt(d) / s) ||v||^2 per bucket.
    err = ((samples - x) ** 2).view(draws, -1, bucket).sum(-1).mean(0)
    bound = min(bucket / levels**2, math.sqrt(bucket) / levels) * x.view(-1, bucket).norm(dim=1) ** 2
    assert (err <= bound).all() and (err > 0).all()


def test_levels_norms_and_bytes_agree_with_the_wire_and_the_collective() -> None:
    x = torch.randn(1000)
    payload = build("qsgd(levels=15, bucket=64)").compress(x)
    assert isinstance(payload, QSGDPayload) and payload.values.dtype == torch.int8
    assert int(payload.values.abs().max()) <= 15
    torch.testing.assert_close(payload.norms[:15], x[:960].view(15, 64).norm(dim=1))
    buckets = math.ceil(1000 / 64)
    header_and_dims = 17 + 8
    assert payload.nbytes == header_and_dims + 4 + 8 + 4 * buckets + 1000
    assert payload.nbytes == len(encode(payload)) == payload.to_fields().nbytes
    assert update_nbytes({"x": payload}) == update_nbytes({"x": payload.to_fields()}) == payload.nbytes
    # The all-gather ships levels and norms: exactly the pack, with no header.
    assert sent_bytes(payload, shared_indices=False) == payload.pack().numel() == 1000 + 4 * buckets
    assert build("qsgd(levels=200)").compress(x).values.dtype == torch.int16
    assert dense_ratio(torch.randn(100_000), "qsgd") > 3.95  # int8 levels + one f32 norm per 512


def test_gather_mean_of_packed_rows_is_the_mean_of_the_payloads() -> None:
    """What the all-gather hands every rank: the packed rows, one per rank, at any byte length (1001
    int8 levels put the norms at an odd offset)."""
    pipes = [build("qsgd(levels=5, bucket=100)", seed=s) for s in range(3)]
    payloads = [p.compress(torch.randn(1001, generator=torch.Generator().manual_seed(i))) for i, p in enumerate(pipes)]
    rows = torch.stack([p.pack() for p in payloads])
    mean = payloads[0].gather_mean(rows, torch.full((1001,), float("nan")))
    torch.testing.assert_close(mean, sum(p.to_dense() for p in payloads) / 3)


def dense_ratio(x: torch.Tensor, spec: str) -> float:
    return build("none").compress(x).nbytes / build(spec).compress(x).nbytes


def test_round_trips_exactly_through_bytes_and_protobuf() -> None:
    x = torch.randn(7, 33, dtype=torch.float64)
    payload = build("qsgd(levels=7, bucket=50) | ef").compress(x, "k")
    back = decode(encode(payload))
    assert torch.equal(back.to_dense(), payload.to_dense()) and back.to_dense().dtype == torch.float64
    msg = fed_pb2.Tensor()
    msg.ParseFromString(_pb(payload.to_fields()).SerializeToString())
    assert torch.equal(from_fields(_fields(msg)).to_dense(), payload.to_dense())


def _pb(f: Fields) -> fed_pb2.Tensor:
    from gradcomp.protocol.codec import fields_to_pb

    return fields_to_pb(f)


def _fields(msg: fed_pb2.Tensor) -> Fields:
    from gradcomp.protocol.codec import pb_to_fields

    return pb_to_fields(msg)


def test_error_feedback_keeps_exactly_what_the_levels_lost() -> None:
    pipe = build("qsgd(levels=1, bucket=16) | ef", seed=3)
    total_in, total_sent = torch.zeros(64), torch.zeros(64)
    for step in range(5):
        x = torch.randn(64, generator=torch.Generator().manual_seed(step))
        total_in += x
        total_sent += pipe.compress(x, "k").to_dense()
        torch.testing.assert_close(total_in - total_sent, pipe.residual("k"), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("topk(ratio=0.1) | qsgd", "drop topk"),
        ("qsgd | fp16", "drop fp16"),
        ("qsgd | unit", "only 'ef' may follow"),
        ("qsgd | qsgd", "only 'ef' may follow"),
        ("qsgd(levels=0)", "argument 'levels'"),
        ("qsgd(bucket=0)", "argument 'bucket'"),
    ],
)
def test_specs_it_cannot_work_in_are_refused(spec: str, fragment: str) -> None:
    with pytest.raises(SpecError, match=fragment):
        build(spec)


def test_dp_before_qsgd_builds() -> None:
    assert build("dp(clip=1.0, sigma=0.5) | qsgd(levels=15) | ef").spec.startswith("dp(")


def _good(levels: int = 3, bucket: int = 4, numel: int = 6) -> Fields:
    return build(f"qsgd(levels={levels}, bucket={bucket})").compress(torch.randn(numel)).to_fields()


def _with(f: Fields, **kw: object) -> Fields:
    return Fields(**{**vars(f), **kw})  # type: ignore[arg-type]


def _extra(levels: int, bucket: int, norms: list[float]) -> bytes:
    return struct.pack("<II", levels, bucket) + struct.pack(f"<{len(norms)}f", *norms)


@pytest.mark.parametrize(
    ("forge", "fragment"),
    [
        (lambda f: _with(f, values=bytes([4, 0, 0, 0, 0, 0])), r"levels span \[0, 4\], beyond the \+-3"),
        (lambda f: _with(f, values=bytes([0x80, 0, 0, 0, 0, 0])), r"levels span \[-128, 0\]"),
        (lambda f: _with(f, extra=_extra(3, 4, [1.0, -1.0])), "finite and >= 0"),
        (lambda f: _with(f, extra=_extra(3, 4, [float("nan"), 1.0])), "finite and >= 0"),
        (lambda f: _with(f, extra=_extra(3, 4, [1.0])), "2 bucket norms need 16"),
        (lambda f: _with(f, extra=_extra(3, 1, [1.0, 1.0])), "6 bucket norms need 32"),
        (lambda f: _with(f, extra=b"\x03\x00"), "needs 8 bytes of levels and bucket, got 2"),
        (lambda f: _with(f, extra=b""), "needs 8 bytes"),
        (lambda f: _with(f, extra=_extra(0, 4, [1.0, 1.0])), "levels 0 must be in"),
        (lambda f: _with(f, extra=_extra(3, 0, [])), "bucket 0 in"),
        (lambda f: _with(f, value_dtype=8, values=bytes(12)), "levels 3 travel as torch.int8"),
        (lambda f: _with(f, value_dtype=1, values=bytes(24)), "qsgd value dtype"),
        (lambda f: _with(f, values=bytes(5)), "expected 6 bytes for 6"),
        (lambda f: _with(f, index_dtype=16, indices=b"\x00"), "must not carry indices"),
        (lambda f: _with(f, kind=0, value_dtype=1, values=bytes(24)), "dense payload must not carry extra bytes"),
        (lambda f: _with(f, kind=9), "unknown payload kind 9"),
    ],
)
def test_forged_fields_are_refused_precisely(forge, fragment: str) -> None:  # type: ignore[no-untyped-def]
    good = _good()
    from_fields(good)  # the unforged fields decode
    with pytest.raises(WireError, match=fragment):
        from_fields(forge(good))


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    levels=st.integers(0, 2**32 - 1) | st.integers(1, 200),
    bucket=st.integers(0, 2**32 - 1) | st.integers(1, 8),
    norms=st.binary(max_size=40),
    values=st.binary(max_size=40),
    value_dtype=st.integers(0, 9),
    shape=st.lists(st.integers(0, 2**40), max_size=3) | st.just([6]),
)
def test_arbitrary_qsgd_fields_raise_only_wire_errors(  # type: ignore[no-untyped-def]
    levels, bucket, norms, values, value_dtype, shape
) -> None:
    f = Fields(2, 1, value_dtype, 0, tuple(shape), values, b"", struct.pack("<II", levels, bucket) + norms)
    try:
        payload = from_fields(f, max_numel=64)
    except WireError:
        return
    dense = payload.to_dense()  # anything accepted restores to a tensor within its bucket norms
    assert dense.shape == tuple(shape) and bool(torch.isfinite(dense).all())
    bound = max(payload.norms.tolist(), default=0.0)
    assert float(dense.abs().max(initial=0.0)) <= bound * (1 + 1e-6)


PARAMS = {"w": torch.zeros(4, 3), "b": torch.zeros(3)}


def test_federated_round_aggregates_what_the_clients_quantised() -> None:
    """Clients compress with the job's qsgd spec, the update crosses protobuf, the coordinator
    counts its bytes and averages the dequantized tensors."""
    spec = "qsgd(levels=7, bucket=5) | ef"
    c = Coordinator(FedJob.model_validate({"rounds": 1, "compression": spec, "clients": {"expected": 2, "min": 2},
                                           "round": {"min_clients": 2}}), PARAMS)  # fmt: skip
    for n in ("a", "b"):
        c.register(n)
    assert sorted(c.select_clients()) == ["a", "b"]
    sent, nbytes = {}, 0
    for seed, name in enumerate(("a", "b")):
        delta = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(seed)) for k, v in PARAMS.items()}
        payloads = build(spec, seed=seed).compress_update(delta)
        msg = fed_pb2.SubmitUpdateRequest()
        msg.ParseFromString(
            update_request(
                client_id=name, round=1, model_version=0, num_examples=10, payloads=payloads, metrics={}
            ).SerializeToString()
        )
        fields = update_fields(msg)
        assert all(f.kind == 2 for f in fields.values())
        nbytes += update_nbytes(fields)
        sent[name] = {k: p.to_dense() for k, p in payloads.items()}
        c.accept_update(name, 1, 10, fields)
    res = c.finish_round()
    assert res is not None and c.version == 1
    for k in PARAMS:
        torch.testing.assert_close(c.params[k], (sent["a"][k] + sent["b"][k]) / 2)
    assert nbytes == sum(len(encode(p)) for p in build(spec, seed=0).compress_update(PARAMS).values()) * 2


def test_coordinator_refuses_a_forged_level_as_malformed() -> None:
    fields = {k: build("qsgd(levels=3)").compress(torch.randn(v.shape)).to_fields() for k, v in PARAMS.items()}
    fields["b"] = _with(fields["b"], values=bytes([100, 0, 0]))
    with pytest.raises(Rejected, match="beyond the") as e:
        decode_update(fields, model_spec(PARAMS))
    assert e.value.reason == "malformed"


def _train_rank(rank: int, out_dir: str) -> None:
    """`gradcomp train`'s own per-worker loop (DDP + the compression hook) on a gloo rank."""
    import json
    from pathlib import Path

    from gradcomp.config.train import TrainJob
    from gradcomp.worker.loop import Session, train_worker

    for spec in ("none", "qsgd(levels=15) | ef"):
        job = TrainJob.model_validate(
            {"name": "qsgd", "task": "digits-mlp", "epochs": 2, "batch_size": 64, "compression": spec,
             "optimizer": {"name": "momentum", "lr": 0.5, "momentum": 0.5}, "checkpoint": {"every_epochs": 0}}
        )  # fmt: skip
        events: list[dict] = []
        session = Session(rank, 2, torch.device("cpu"), lambda metrics, where: None, progress=_collect(events))
        train_worker(job, session)
        if rank == 0:  # rank 0 reports the epoch, with its evaluation
            last = [e for e in events if e["type"] == "epoch"][-1]
            Path(out_dir, f"{spec.split('(')[0]}.json").write_text(json.dumps(last))


def _collect(into: list[dict]):  # type: ignore[no-untyped-def]
    return lambda batch: into.extend(batch["events"])


def test_gradcomp_train_loop_learns_with_qsgd_at_a_quarter_of_the_bytes() -> None:
    import json
    import tempfile
    from pathlib import Path

    from gradcomp.worker.local_group import spawn_gloo_ranks

    with tempfile.TemporaryDirectory() as tmp:
        spawn_gloo_ranks(_train_rank, (tmp,), world=2)
        dense = json.loads(Path(tmp, "none.json").read_text())
        qsgd = json.loads(Path(tmp, "qsgd.json").read_text())
    assert qsgd["test_accuracy"] > 0.8 and qsgd["test_accuracy"] > dense["test_accuracy"] - 0.05, (qsgd, dense)
    # int8 levels and one float32 norm per 512 values, against float32 all-reduced values
    assert 3.9 < qsgd["compression_ratio"] < 4.0 and dense["compression_ratio"] == 1.0


def _round_same_input(rank: int, out_dir: str) -> None:
    import json
    from pathlib import Path

    import torch.distributed as dist
    from torch import nn

    from gradcomp.worker.hook import CompressionState

    state = CompressionState.for_model(nn.Linear(64, 4), "qsgd(levels=1, bucket=64)", seed=0)
    x = torch.randn(4096, generator=torch.Generator().manual_seed(0))  # the same input on both ranks
    levels = state.pipeline.compress(x, key="k").values.tolist()
    both: list = [None, None]
    dist.all_gather_object(both, levels)
    if rank == 0:
        Path(out_dir, "levels.json").write_text(json.dumps(both))


def test_ranks_round_independently_in_the_ddp_hook() -> None:
    """Each rank's pipeline is seeded by (job seed, rank): the same gradient is rounded differently on
    each, so the rounding errors average down over ranks instead of adding up."""
    import json
    import tempfile
    from pathlib import Path

    from gradcomp.worker.local_group import spawn_gloo_ranks

    with tempfile.TemporaryDirectory() as tmp:
        spawn_gloo_ranks(_round_same_input, (tmp,), world=2)
        first, second = json.loads(Path(tmp, "levels.json").read_text())
    differ = sum(a != b for a, b in zip(first, second, strict=True))
    assert differ > 100, differ  # of 4096 levels, each drawn at p(1 - p) = 0.2 on average


def test_the_audit_observes_what_the_qsgd_wire_delivers() -> None:
    """`gradcomp audit` sees qsgd payloads through the real wire: every coordinate, dequantized."""
    from gradcomp.audit.observe import make_setting, observe
    from gradcomp.tasks import load_task

    spec = "qsgd(levels=15, bucket=128)"
    setting = make_setting(load_task("digits-mlp"), victims=2, seed=0)
    obs, truth = observe(setting, spec, 1, seed=0)
    assert obs.mask.all()
    sent = build(spec, seed=0).compress(truth.gradient[0], key="victim-batch-0")
    torch.testing.assert_close(obs.observed[0], sent.to_dense(), rtol=0, atol=0)
    assert truth.wire_bytes == sent.nbytes == len(encode(sent))
    assert not torch.equal(obs.observed[0], truth.gradient[0])  # quantised, not the raw gradient
