"""DP-SGD's Poisson batches: sizes follow Binomial(n, q), every rank yields the same number of
batches (empty ones included), and who is sampled comes from secret entropy, not the job seed."""

from __future__ import annotations

import pytest
import torch

from gradcomp.worker.sampling import PoissonPlan, secret_source


def _global_batches(plan: PoissonPlan, epochs: int, secret: bool = False) -> list[list[torch.Tensor]]:
    """Per step, the local batches of every rank (drawn from seeded generators, or from training's
    secret keyed streams)."""
    out = []
    gens = [secret_source() if secret else torch.Generator().manual_seed(rank) for rank in range(plan.world)]
    for epoch in range(epochs):
        ranks = [list(plan.batches(rank, 3, epoch, gens[rank])) for rank in range(plan.world)]
        out.extend(zip(*ranks, strict=True))
    return out


@pytest.mark.parametrize("secret", [False, True], ids=["seeded", "secret-stream"])
def test_batch_sizes_follow_the_binomial_the_accountant_assumes(secret: bool) -> None:
    """Tolerances are 5-7 standard errors: the secret stream's draws are not reproducible."""
    plan = PoissonPlan.for_job(examples=1000, batch_size=16, world=2)
    assert plan.sample_rate == pytest.approx(0.032) and plan.steps_per_epoch == 31
    steps = _global_batches(plan, epochs=100, secret=secret)
    sizes = torch.tensor([sum(len(b) for b in step) for step in steps], dtype=torch.float64)
    n, q = plan.examples, plan.sample_rate
    mean, var = n * q, n * q * (1 - q)
    # 3100 draws: the sample mean's standard error is sqrt(var / 3100) ~ 0.1; the variance's ~ 0.8
    assert float(sizes.mean()) == pytest.approx(mean, abs=0.5)
    assert float(sizes.var()) == pytest.approx(var, abs=4.0)  # fixed-size batches would give 0
    # every example is equally likely, in every step, whichever rank holds it
    hits = torch.zeros(n)
    for step in steps:
        picked = torch.cat(step)
        assert picked.unique().numel() == picked.numel()  # ranks' shares are disjoint
        hits[picked] += 1
    assert float(hits.mean()) / len(steps) == pytest.approx(q, rel=0.02)
    assert float(hits.std()) == pytest.approx((len(steps) * q * (1 - q)) ** 0.5, rel=0.15)


def test_every_rank_yields_every_step_even_when_empty() -> None:
    plan = PoissonPlan.for_job(examples=40, batch_size=1, world=4)  # 10 examples per rank, q = 0.1
    per_rank = [list(plan.batches(rank, 0, 0, torch.Generator().manual_seed(rank))) for rank in range(4)]
    assert all(len(b) == plan.steps_per_epoch == 10 for b in per_rank)
    assert sum(len(batch) == 0 for batches in per_rank for batch in batches) > 0


def test_inclusions_are_secret_and_a_resumed_epoch_draws_only_its_remaining_steps() -> None:
    """Two runs with the same job seed sample different batches (the seed does not reveal who was
    sampled); an epoch resumed at step 7 draws exactly the steps it has left, from the same share."""
    plan = PoissonPlan.for_job(examples=500, batch_size=8, world=2)
    first, second = (torch.cat(list(plan.batches(1, 5, 2, secret_source()))) for _ in range(2))
    assert not torch.equal(first, second)
    resumed = list(plan.batches(1, 5, 2, secret_source(), steps=plan.steps_per_epoch - 7))
    assert len(resumed) == plan.steps_per_epoch - 7
    share = set(plan.share(1, 5, 2).tolist())
    assert all(set(b.tolist()) <= share for b in resumed)


def test_too_few_examples_for_the_batch_is_refused() -> None:
    with pytest.raises(ValueError, match="needs at least 64 training examples"):
        PoissonPlan.for_job(examples=50, batch_size=32, world=2)


def test_training_randomness_is_a_256_bit_keyed_stream_not_a_torch_seed() -> None:
    """torch's CPU generator keeps 32 bits of its seed (2^32 + 5 draws what 5 draws), so a generator
    seeded from OS entropy could be found by search; DP-SGD's noise and inclusions use keyed streams."""
    from gradcomp.config.train import DPConfig
    from gradcomp.keyed_random import KeyedStream
    from gradcomp.worker.dp import ExampleDP

    same = [torch.rand(4, generator=torch.Generator().manual_seed(s)) for s in (5, 2**32 + 5)]
    assert torch.equal(*same)
    assert isinstance(secret_source(), KeyedStream)
    dp = ExampleDP(torch.nn.Linear(3, 2), DPConfig(clip=1.0, noise_multiplier=1.0), world=1, split_noise=False,
                   sample_rate=0.1, expected_batch=1.0)  # fmt: skip
    assert isinstance(dp.noise_source, KeyedStream)
