"""Poisson batches for example-level DP-SGD, so the accountant's assumption holds.

The RDP/PRV accountants price the *sampled* Gaussian mechanism: every step, every training
example joins the batch independently with probability q. Shuffled fixed-size batches are a
different mechanism (a published gap, not a rounding error), so the DP path draws its batches
with Opacus' `UniformWithReplacementSampler` instead, and the ledger is charged exactly the
sampler's q.

Across ranks: the examples are split into `world` strided shares of a per-epoch permutation
(as Opacus' `DistributedUniformWithReplacementSampler` does) and each rank Poisson-samples
its own share with the same q, so the union of the local batches is a Poisson sample of the
whole set. Opacus' distributed sampler itself is not used because it *skips* empty batches:
ranks would then take different step counts (a DDP hang), and conditioning on a non-empty
batch is not the mechanism the accountant prices. Here every rank yields exactly
`steps_per_epoch` batches, empty ones included; an empty batch still joins the collective
with a zero gradient plus its noise (see `ExampleDP.gradient`).
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from opacus.utils.uniform_sampler import UniformWithReplacementSampler


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

    def batches(self, rank: int, seed: int, epoch: int, start: int = 0) -> Iterator[torch.Tensor]:
        """This rank's batches of `epoch` from step `start` on: exactly `steps_per_epoch - start`, some may be empty.

        Deterministic in (seed, rank, epoch), so a run resumed mid-epoch draws the same batches.
        """
        share = self.share(rank, seed, epoch)
        gen = torch.Generator().manual_seed(zlib.crc32(f"poisson/{seed}/{rank}/{epoch}".encode()))
        sampler = UniformWithReplacementSampler(
            num_samples=share.numel(), sample_rate=self.sample_rate, generator=gen, steps=self.steps_per_epoch
        )
        for picked in itertools.islice(sampler, start, None):
            yield share[torch.as_tensor(picked, dtype=torch.long)]
