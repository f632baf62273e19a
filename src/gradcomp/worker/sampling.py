"""Poisson batches for example-level DP-SGD, so the accountant's assumption holds.

The RDP/PRV accountants price the *sampled* Gaussian mechanism: every step, every training
example joins the batch independently with probability q. Shuffled fixed-size batches are a
different mechanism (a published gap, not a rounding error), so the DP path draws its batches
as Opacus' `UniformWithReplacementSampler` does (each example of the share joins when a uniform
draw falls below q), and the ledger is charged exactly that q. The draws are gradcomp's own so
that they can come from a keyed stream rather than a torch generator (below).

Across ranks: the examples are split into `world` strided shares of a per-epoch permutation
(as Opacus' `DistributedUniformWithReplacementSampler` does) and each rank Poisson-samples
its own share with the same q, so the union of the local batches is a Poisson sample of the
whole set. Opacus' distributed sampler itself is not used because it *skips* empty batches:
ranks would then take different step counts (a DDP hang), and conditioning on a non-empty
batch is not the mechanism the accountant prices. Here every rank yields exactly
`steps_per_epoch` batches, empty ones included; an empty batch still joins the collective
with a zero gradient plus its noise (see `ExampleDP.gradient`).

Who was sampled must stay secret for amplification to hold, so the inclusion draws come from
an AES-CTR stream under a fresh 256-bit OS key (`secret_source`), never from the job seed (which
sits in the job file and results.json): anyone who knew the batches would face the Gaussian
mechanism without amplification. Not a torch generator seeded from OS entropy: torch's CPU
generator keeps only 32 bits of its seed, so 2^32 candidate seeds could be searched. The share
permutation stays seeded by (job seed, epoch): which rank holds an example says nothing about
whether it was sampled.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from gradcomp.keyed_random import KeyedStream, new_key

RandomSource = torch.Generator | KeyedStream


@dataclass(frozen=True)
class PoissonPlan:
    """Sampling rate and step count of a DP-SGD run (identical on every rank)."""

    examples: int
    world: int
    sample_rate: float
    steps_per_epoch: int

    @classmethod
    def for_job(cls, examples: int, batch_size: int, world: int) -> PoissonPlan:
        """q = expected global batch / examples; one epoch = examples / expected global batch steps."""
        global_batch = batch_size * world
        if examples < global_batch:
            raise ValueError(
                f"batch_size {batch_size} x {world} workers needs at least {global_batch} training examples; "
                f"the task has {examples}"
            )
        return cls(examples, world, global_batch / examples, examples // global_batch)

    @property
    def expected_local_batch(self) -> float:
        """E[local batch size]: the divisor that turns a rank's noisy sum into its share of the mean.

        Dividing by the *actual* batch size would make the scale data-dependent (the batch size
        of a Poisson sample is itself private); the expected size is public.
        """
        return self.sample_rate * self.examples / self.world

    def share(self, rank: int, seed: int, epoch: int) -> torch.Tensor:
        """The example indices rank `rank` samples from this epoch (strided, like Opacus' split)."""
        perm = torch.randperm(self.examples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        return perm[rank :: self.world]

    def batches(
        self, rank: int, seed: int, epoch: int, source: RandomSource, steps: int | None = None
    ) -> Iterator[torch.Tensor]:
        """This rank's next `steps` batches of `epoch` (default: a whole epoch), some may be empty.

        The inclusions are drawn from `source` (the rank's `secret_source` in training; a seeded
        generator in tests); a run resumed mid-epoch draws fresh batches for the steps it has left,
        each one still a Poisson sample.
        """
        share = self.share(rank, seed, epoch)
        for _ in range(self.steps_per_epoch if steps is None else steps):
            yield share[uniform(source, share.numel()) < self.sample_rate]


def secret_source() -> KeyedStream:
    """An AES-CTR stream under a fresh 256-bit OS key: DP noise and Poisson inclusions come from one.

    Nothing derived from the job seed can reproduce it, it differs per rank and per (re)start, and it
    is never checkpointed (a resumed run draws new noise, never the same draws on other gradients).
    """
    return KeyedStream(new_key())


def uniform(source: RandomSource, n: int) -> torch.Tensor:
    """`n` float64 draws, uniform on (0, 1) (CPU)."""
    if isinstance(source, KeyedStream):
        return torch.from_numpy(source.uniform(n))
    return torch.rand(n, generator=source, dtype=torch.float64)


def normal_like(source: RandomSource, like: torch.Tensor) -> torch.Tensor:
    """Standard normal draws of `like`'s shape, dtype and device."""
    if isinstance(source, KeyedStream):
        return source.normal(tuple(like.shape), like.dtype, like.device)
    return torch.randn(like.shape, generator=source, device=like.device, dtype=like.dtype)
