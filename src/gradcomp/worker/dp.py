"""Example-level differential privacy for data-parallel training (DP-SGD across workers).

Each rank computes per-example gradients with `torch.func` (vmap over `grad`), clips each
to L2 norm `clip`, sums them and adds Gaussian noise *before* any compression or
collective, so everything downstream (sparsification, error feedback, averaging) is
post-processing.

Where the noise goes depends on whether the aggregation is linear in the ranks' vectors:
- linear (dense all-reduce, shared-index randomk, with or without ef): each rank adds
  std sigma * clip / sqrt(world); the *sum* carries std sigma * clip exactly once, as in
  single-process DP-SGD;
- non-linear per rank (topk, rtopk, unit, fp16/bf16 rounding): each rank's compressed
  message is a function of its own noisy sum alone, so each rank must add the full
  sigma * clip for the guarantee to hold; the average then carries sqrt(world) times more
  noise than the linear case.
The accountant is charged noise multiplier `sigma` with the Poisson sampler's rate q
(`worker/sampling.py`): batches really are Poisson samples, as the accountant assumes.
Each rank divides its noisy sum by its *expected* batch size (public), never the drawn
size (private), and an empty batch contributes a zero sum plus the same noise, so every
rank joins every collective.

Two ledgers, two adversaries. `ledger` (the printed epsilon, the budget) holds against whoever
sees the averaged gradients and the model: noise sigma * clip once per step. `rank_ledger` holds
against whoever sees one rank's own messages (the interconnect): that rank's noise alone,
sigma / sqrt(world) under linear aggregation. The noise comes from the rank's
`secret_source` (a 256-bit OS key, new at every start and resume, never checkpointed).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.func import functional_call, grad_and_value, vmap

from gradcomp.compression import Pipeline
from gradcomp.compression.stages import ErrorFeedback, NoneStage, RandomK
from gradcomp.config.common import ConfigError
from gradcomp.config.train import DPConfig
from gradcomp.privacy import PrivacyLedger
from gradcomp.tasks import Classification, Objective
from gradcomp.tasks.checks import per_example_blocker
from gradcomp.worker.sampling import RandomSource, normal_like, secret_source


def linear_aggregation(pipeline: Pipeline) -> bool:
    """True when the averaged result depends on the ranks' vectors only through their sum."""
    return all(isinstance(s, NoneStage | ErrorFeedback | RandomK) for s in pipeline.stages)


def refuse_unclippable(job_dp: DPConfig | None, model: nn.Module) -> None:
    """Refuse, before training, a DP-SGD job whose model has no per-example gradients (batch norm)."""
    reason = per_example_blocker(model) if job_dp is not None else None
    if reason is not None:
        raise ConfigError(f"dp: {reason}")


class ExampleDP:
    """Per-example clipping + Gaussian noise on one rank, and the run's privacy ledger."""

    def __init__(
        self,
        model: nn.Module,
        cfg: DPConfig,
        *,
        world: int,
        split_noise: bool,
        sample_rate: float,
        expected_batch: float,
        noise_seed: int | None = None,
        objective: Objective | None = None,
        autocast: torch.dtype | None = None,
    ):
        """`noise_seed` None (training): secret OS entropy; an int makes the noise reproducible, which
        only an audit or a test may want (anyone who knows the seed can subtract the noise).
        `objective`: the task's loss, taken one example at a time (default: classification).
        `autocast` (torch.bfloat16 under `precision: bf16`): the forward pass's precision; clipping,
        summing and noise always run in the parameters' precision."""
        self.model = model
        self.autocast = autocast
        self.objective = objective if objective is not None else Classification()
        self.cfg = cfg
        self.world = world
        self.split_noise = split_noise
        self.sample_rate = sample_rate
        self.expected_batch = expected_batch
        self.ledger = PrivacyLedger(cfg.delta, cfg.accountant, budget=cfg.epsilon_budget)
        self.rank_ledger = PrivacyLedger(cfg.delta, cfg.accountant)
        device = next(model.parameters()).device
        self.noise_source: RandomSource = (
            secret_source() if noise_seed is None else torch.Generator(device=device).manual_seed(noise_seed)
        )
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]

    @property
    def noise_std(self) -> float:
        """Std of the noise this rank adds to its sum of clipped gradients."""
        std = self.cfg.noise_multiplier * self.cfg.clip
        return std / math.sqrt(self.world) if self.split_noise else std

    def would_exceed_budget(self) -> bool:
        """Whether one more step would pass `epsilon_budget`: the loop stops *before* overspending."""
        return self.ledger.would_exceed(self.cfg.noise_multiplier, self.sample_rate)

    def gradient(
        self, x: torch.Tensor, y: torch.Tensor, canaries: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, float]:
        """Flat noisy gradient of this rank's batch / expected local batch, and the batch's summed loss.

        Averaging over ranks then gives (sum of all clipped gradients + noise) / expected global
        batch, Opacus' estimator for Poisson batches. An empty batch gives noise alone.
        `canaries` ([k, P]) are extra per-example gradients, clipped like the others: the one-run
        privacy audit (`audit/onerun.py`) inserts its gradient canaries here.
        """
        summed, loss_sum = self._clipped_sum(x, y, canaries)
        if self.cfg.noise_multiplier > 0:
            summed.add_(normal_like(self.noise_source, summed), alpha=self.noise_std)
        return summed.div_(self.expected_batch), loss_sum

    def _clipped_sum(self, x: torch.Tensor, y: torch.Tensor, extra: torch.Tensor | None) -> tuple[torch.Tensor, float]:
        """Sum of the per-example gradients (and `extra` rows), each clipped to L2 norm `clip`; the summed loss."""
        rows, loss_sum = self._per_example(x, y)
        if extra is not None:
            rows = torch.cat([rows, extra.to(rows)])
        if rows.shape[0] == 0:
            return rows.new_zeros(rows.shape[1]), loss_sum
        norms = torch.linalg.vector_norm(rows, dim=1)
        factor = (self.cfg.clip / norms.clamp_min(1e-12)).clamp(max=1.0)
        return factor @ rows, loss_sum

    def _per_example(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Per-example flat gradients [B, P] (B may be 0) and the summed loss."""
        model = self.model
        params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        if x.shape[0] == 0:
            size = sum(p.numel() for p in params.values())
            return torch.zeros(0, size, device=x.device, dtype=next(iter(params.values())).dtype), 0.0
        buffers = {n: b.detach() for n, b in model.named_buffers()}

        objective = self.objective

        def loss_one(p: dict[str, torch.Tensor], b: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor):
            out = functional_call(model, (p, b), (xi.unsqueeze(0),))
            return objective.mean(out, yi.unsqueeze(0))

        low = torch.autocast(x.device.type, dtype=self.autocast or torch.bfloat16, enabled=self.autocast is not None)
        with low:
            grads, losses = vmap(grad_and_value(loss_one), in_dims=(None, None, 0, 0))(params, buffers, x, y)
        batch = x.shape[0]
        flat = torch.cat([grads[n].reshape(batch, -1) for n in self.names], dim=1)
        return flat, float(losses.sum())

    @property
    def rank_noise_multiplier(self) -> float:
        """Noise std / clip in one rank's own message (what an observer of that rank's link faces)."""
        return self.noise_std / self.cfg.clip

    def account(self, steps: int = 1, *, force: bool = False) -> float:
        """Charge `steps` released steps to both ledgers; returns the (averaged-gradient) epsilon so far.

        `force` charges past the budget: for steps already released (lost with a failed run), which
        happened whether or not the budget allows them."""
        if self.cfg.noise_multiplier == 0:
            return 0.0
        self.rank_ledger.step(self.rank_noise_multiplier, self.sample_rate, steps)
        return self.ledger.step(self.cfg.noise_multiplier, self.sample_rate, steps, check_budget=not force)

    def epsilon(self) -> float:
        """Epsilon spent so far against whoever sees the averaged gradients and the model; infinite
        without noise (clipping alone gives no guarantee)."""
        if self.cfg.noise_multiplier == 0:
            return math.inf
        return self.ledger.epsilon()

    def rank_epsilon(self) -> float:
        """Epsilon spent so far against an observer of one rank's messages (`rank_ledger`)."""
        if self.cfg.noise_multiplier == 0:
            return math.inf
        return self.rank_ledger.epsilon()

    def write_grads(self, flat: torch.Tensor) -> None:
        """Scatter a flat gradient back into the parameters' `.grad`."""
        params = dict(self.model.named_parameters())
        expected = sum(params[name].numel() for name in self.names)
        if flat.numel() != expected:
            raise ValueError(
                f"flat gradient has {flat.numel()} values; the model's trainable parameters have {expected}"
            )
        at = 0
        for name in self.names:
            p = params[name]
            n = p.numel()
            p.grad = flat[at : at + n].view_as(p).to(p.dtype).clone()
            at += n

    def state_dict(self) -> dict[str, Any]:
        """The ledgers only: the noise generator is never saved (a resumed run must draw fresh noise)."""
        return {"ledger": self.ledger.state_dict(), "rank_ledger": self.rank_ledger.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.ledger.load_state_dict(state["ledger"])
        if "rank_ledger" in state:
            self.rank_ledger.load_state_dict(state["rank_ledger"])
        else:  # a checkpoint from before the per-rank ledger: rebuilt from the shared history at this
            # run's per-rank noise (exact unless the worker count changed since)
            self.rank_ledger.load_state_dict(
                {
                    "history": [
                        [s / math.sqrt(self.world) if self.split_noise else s, q, n]
                        for s, q, n in state["ledger"]["history"]
                    ]
                }
            )
