"""Behaviour of each compression stage and of the pipeline around them."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gradcomp.compression import Dense, PrivacyOrderError, Sparse, SpecError, build, parse_spec, to_fields


def _grad(n: int = 4096, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize(
    "spec,k", [("topk(ratio=0.01)", 41), ("randomk(0.01)", 41), ("rtopk(ratio=0.01, r=0.05)", 41), ("topk(1.0)", 4096)]
)
def test_sparsifiers_keep_exactly_k(spec: str, k: int) -> None:
    payload = build(spec).compress(_grad(), "w")
    assert isinstance(payload, Sparse)
    assert payload.values.numel() == payload.indices.numel() == k
    assert torch.unique(payload.indices).numel() == k
    assert payload.indices.dtype == torch.int32


def test_topk_keeps_the_largest_magnitudes() -> None:
    x = _grad()
    payload = build("topk(0.05)").compress(x, "w")
    kept = set(payload.indices.tolist())
    assert kept == set(x.abs().topk(payload.values.numel()).indices.tolist())
    assert torch.equal(payload.values, x[payload.indices.long()])


def test_rtopk_picks_only_from_top_r_and_uniformly_over_seeds() -> None:
    x = _grad(2000)
    r_set = set(x.abs().topk(100).indices.tolist())  # r = 0.05 * 2000
    counts = torch.zeros(2000)
    seeds = 600
    for seed in range(seeds):
        payload = build("rtopk(ratio=0.01, r=0.05)", seed=seed).compress(x, "w")
        idx = payload.indices.long()
        assert set(idx.tolist()) <= r_set
        counts[idx] += 1
    in_r = counts[list(r_set)]
    expected = seeds * 20 / 100  # each of the top 100 is chosen with probability k/r = 0.2
    assert counts.sum() == seeds * 20
    assert torch.all((in_r - expected).abs() < 5 * math.sqrt(expected))


def test_randomk_indices_agree_across_pipelines_with_same_seed_and_step() -> None:
    a, b = build("randomk(ratio=0.1, seed=5)"), build("randomk(ratio=0.1, seed=5)", seed=99)
    for step in range(3):
        pa, pb = a.compress(_grad(seed=step), "layer"), b.compress(_grad(seed=100 + step), "layer")
        assert torch.equal(pa.indices, pb.indices), f"step {step}"
    # a different step, key or stage seed picks other positions
    assert not torch.equal(a.compress(_grad(), "layer").indices, a.compress(_grad(), "layer").indices)
    other = build("randomk(ratio=0.1, seed=6)").compress(_grad(), "layer")
    assert not torch.equal(other.indices, build("randomk(ratio=0.1, seed=5)").compress(_grad(), "layer").indices)


@pytest.mark.parametrize(
    "spec",
    [
        "topk(0.05) | ef",
        "rtopk(ratio=0.02, r=0.1) | ef",
        "randomk(0.05) | ef",
        "unit | ef",
        "bf16 | ef",
        "topk(0.05) | fp16 | ef",
        "dp(clip=1.0, sigma=0.5) | topk(0.05) | ef",
    ],
)
def test_error_feedback_conserves_the_sum(spec: str) -> None:
    """Over T steps: sum of what was sent + final residual == sum of inputs (after dp)."""
    pipe = build(spec, seed=3)
    total_in, total_sent = torch.zeros(1000, dtype=torch.float64), torch.zeros(1000, dtype=torch.float64)
    if pipe.dp is None:
        for t in range(20):
            x = _grad(1000, seed=t)
            total_in += x.double()
            total_sent += pipe.decompress(pipe.compress(x, "k")).double()
        assert torch.allclose(total_sent + pipe.residual("k").double(), total_in, atol=1e-4)
    else:
        # with dp the conserved input is the clipped+noised tensor; replay it with the same RNG
        dp_only = build(spec.split("|")[0], seed=3)
        for t in range(20):
            x = _grad(1000, seed=t)
            total_in += dp_only.decompress(dp_only.compress(x, "k")).double()
            total_sent += pipe.decompress(pipe.compress(x, "k")).double()
        assert torch.allclose(total_sent + pipe.residual("k").double(), total_in, atol=1e-4)


def test_error_feedback_memory_is_per_key_resettable_and_checkpointable() -> None:
    pipe = build("topk(0.1) | ef")
    pipe.compress(_grad(100, 1), "a")
    pipe.compress(_grad(50, 2), "b")
    assert pipe.residual("a").numel() == 100 and pipe.residual("b").numel() == 50
    state = pipe.state_dict()
    clone = build("topk(0.1) | ef")
    clone.load_state_dict(state)
    x = _grad(100, 3)
    assert torch.equal(pipe.compress(x, "a").values, clone.compress(x, "a").values)
    pipe.reset("a")
    assert pipe.residual("a") is None and pipe.residual("b") is not None
    with pytest.raises(ValueError, match="saved for spec"):
        build("topk(0.2) | ef").load_state_dict(state)


@pytest.mark.parametrize("scale", [1.0, 0.25])
def test_unit_sends_the_direction_only(scale: float) -> None:
    x = _grad() * 17
    out = build(f"unit(scale={scale})").decompress(build(f"unit(scale={scale})").compress(x))
    assert math.isclose(float(out.norm()), scale, rel_tol=1e-5)
    assert torch.allclose(out / out.norm(), x / x.norm(), atol=1e-6)
    sparse = build("topk(0.1) | unit").compress(x)
    assert math.isclose(float(sparse.values.norm()), 1.0, rel_tol=1e-5)
    assert torch.equal(build("unit").compress(torch.zeros(10)).values, torch.zeros(10))


@given(norm=st.floats(0.01, 1000.0), clip=st.floats(0.1, 10.0), n=st.integers(1, 500))
@settings(max_examples=50, deadline=None)
def test_dp_clips_to_at_most_clip(norm: float, clip: float, n: int) -> None:
    x = _grad(n)
    x = x / x.norm() * norm
    out = build(f"dp(clip={clip}, sigma=0)").compress(x).values
    assert float(out.norm()) <= clip * (1 + 1e-5)
    if norm <= clip:
        assert torch.allclose(out, x, rtol=1e-5)
    l1 = build(f"dp(clip={clip}, sigma=0, mechanism=laplace)").compress(x).values
    assert float(l1.abs().sum()) <= clip * (1 + 1e-5)


@pytest.mark.parametrize("mechanism,std_factor", [("gaussian", 1.0), ("laplace", math.sqrt(2))])
def test_dp_noise_scale_is_sigma_times_clip(mechanism: str, std_factor: float) -> None:
    clip, sigma, n = 2.0, 0.8, 200_000
    out = build(f"dp(clip={clip}, sigma={sigma}, mechanism={mechanism})", seed=1).compress(torch.zeros(n)).values
    expected = sigma * clip * std_factor
    # the std of n draws is within a few percent of the truth at this n
    assert abs(float(out.std()) / expected - 1) < 0.02
    assert abs(float(out.mean())) < 5 * expected / math.sqrt(n)


def test_randomk_before_dp_noises_only_the_sent_values() -> None:
    payload = build("randomk(ratio=0.01, seed=1) | dp(clip=1.0, sigma=1.0)").compress(torch.zeros(10_000))
    assert isinstance(payload, Sparse) and payload.values.numel() == 100
    assert float(payload.values.abs().min()) > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("shape", [(), (0,), (1,), (3, 5), (2, 3, 4)])
def test_decompress_restores_shape_and_dtype(dtype: torch.dtype, shape: tuple[int, ...]) -> None:
    x = torch.randn(shape).to(dtype)
    for spec in ("none", "topk(0.5)", "fp16", "bf16 | ef", "randomk(0.5) | ef"):
        pipe = build(spec)
        out = pipe.decompress(pipe.compress(x, "k"))
        assert out.shape == x.shape and out.dtype == dtype, spec
    assert torch.equal(build("none").decompress(build("none").compress(x)), x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_none_passthrough_sends_what_the_stage_path_sends(dtype: torch.dtype) -> None:
    """'none' skips the stage machinery; 'ef' alone runs it and changes nothing on a first step: same wire bytes."""
    x = torch.randn(3, 5).to(dtype)
    none, ef = build("none"), build("ef")
    assert to_fields(none.compress(x, "k")) == to_fields(ef.compress(x, "k"))
    assert none.state_dict()["steps"] == ef.state_dict()["steps"] == {"k": 1}


def test_precision_stages_narrow_the_wire() -> None:
    x = _grad()
    assert build("fp16").compress(x).values.dtype == torch.float16
    assert build("topk(0.1) | bf16").compress(x).values.dtype == torch.bfloat16
    dense = build("none").compress(x)
    assert isinstance(dense, Dense) and build("fp16").compress(x).nbytes < dense.nbytes


def test_yaml_list_form_equals_string_form() -> None:
    listed = parse_spec(["dp(clip=1.0, sigma=0.8)", {"rtopk": {"ratio": 0.01, "r": 0.05}}, "ef"])
    text = parse_spec("dp(clip=1.0, sigma=0.8) | rtopk(ratio=0.01, r=0.05) | ef")
    assert [s.to_spec() for s in listed] == [s.to_spec() for s in text]
    assert build("topk(0.01)").spec == build([{"topk": {"ratio": 0.01}}]).spec


@pytest.mark.parametrize(
    "spec,fragment",
    [
        ("rtopk(ratio=0.01, r=0.05) | dp(clip=1.0, sigma=1.0)", "'rtopk' before 'dp'"),
        ("topk(0.1) | dp(clip=1.0, sigma=1.0) | ef", "Put the selection after the noise"),
    ],
)
def test_unsound_privacy_orders_are_refused_with_a_fix(spec: str, fragment: str) -> None:
    with pytest.raises(PrivacyOrderError, match=fragment):
        build(spec)


def test_sound_privacy_orders_build() -> None:
    build("dp(clip=1.0, sigma=0.8) | rtopk(ratio=0.01, r=0.05) | ef")
    build("randomk(ratio=0.01, seed=3) | dp(clip=1.0, sigma=0.8, mechanism=laplace)")
    build("topk(0.01) | ef")  # no privacy claimed: any order


@pytest.mark.parametrize(
    "spec,fragment",
    [
        ("topkk(0.1)", "unknown stage 'topkk'"),
        ("topk(ratio=0)", "stage 'topk': argument 'ratio' must be in (0, 1]"),
        ("topk(ratio=1.5)", "argument 'ratio' must be in (0, 1]"),
        ("rtopk(ratio=0.1, r=0.05)", "stage 'rtopk': argument 'r' (0.05) must be >= ratio"),
        ("randomk(ratio=-1)", "stage 'randomk': argument 'ratio'"),
        ("topk(ration=0.1)", "stage 'topk' has no argument 'ration'"),
        ("topk()", "stage 'topk': missing argument 'ratio'"),
        ("topk(ratio=abc)", "argument 'ratio' must be a number"),
        ("dp(clip=1.0, sigma=1.0, mechanism=uniform)", "mechanism"),
        ("dp(clip=0, sigma=1.0)", "argument 'clip'"),
        ("ef | topk(0.1)", "'ef' must be the last stage"),
        ("topk(0.1) | randomk(0.1)", "at most one selection stage"),
        ("none | ef", "'none' means no compression"),
        ("", "empty compression spec"),
        ("topk(0.1", "cannot parse stage"),
        (42, "must be a string or a list"),
    ],
)
def test_bad_specs_name_the_stage_and_argument(spec: object, fragment: str) -> None:
    with pytest.raises(SpecError) as info:
        build(spec)  # type: ignore[arg-type]
    assert fragment in str(info.value)


def test_compress_refuses_integer_tensors() -> None:
    with pytest.raises(TypeError, match="floating-point"):
        build("none").compress(torch.arange(4))


def test_compress_update_clips_the_whole_update_not_each_tensor() -> None:
    """dp's sensitivity is the whole update's norm: tensors of norm 3 and 4 come out jointly at clip 1."""
    update = {"a": torch.full((9,), 1.0), "b": torch.full((4, 4), 1.0)}  # norms 3 and 4, together 5
    pipe = build("dp(clip=1.0, sigma=0.0)")
    out = {k: pipe.decompress(p) for k, p in pipe.compress_update(update).items()}
    whole = torch.cat([t.reshape(-1) for t in out.values()])
    assert float(whole.norm()) == pytest.approx(1.0, rel=1e-6)
    torch.testing.assert_close(out["b"], update["b"] / 5)  # one factor for all: the direction is kept
    per_tensor = build("dp(clip=1.0, sigma=0.0)")
    alone = torch.cat([per_tensor.decompress(per_tensor.compress(t, key=k)).reshape(-1) for k, t in update.items()])
    assert float(alone.norm()) == pytest.approx(2**0.5, rel=1e-6)  # what clipping per tensor would send


def test_compress_update_noise_covers_the_joint_vector_and_selection_stays_per_key() -> None:
    update = {"w": torch.zeros(20_000), "b": torch.zeros(100)}
    pipe = build("randomk(ratio=0.5) | dp(clip=1.0, sigma=2.0) | ef", seed=3)
    payloads = pipe.compress_update(update)
    assert all(isinstance(p, Sparse) for p in payloads.values())
    assert payloads["w"].values.numel() == 10_000 and payloads["b"].values.numel() == 50
    assert float(payloads["w"].values.std()) == pytest.approx(2.0, rel=0.05)  # noise std sigma * clip
    single = build("topk(ratio=0.1)", seed=1)
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    again = build("topk(ratio=0.1)", seed=1)
    torch.testing.assert_close(single.compress(x, key="k").to_dense(), again.compress_update({"k": x})["k"].to_dense())
