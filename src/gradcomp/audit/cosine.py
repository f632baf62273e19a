"""Cosine-similarity gradient inversion (Geiping et al. 2020, "Inverting Gradients").

Loss: 1 - cosine similarity between the candidate inputs' gradient and the observed payload,
plus total variation; Adam with step decay; inputs kept inside the data range. Cosine
ignores the gradient's length, so normalising it (`unit`) leaves this attack unchanged.
Sparse payloads are compared on their transmitted coordinates only, and every victim batch
of a spec is optimised at once (one batched problem, see `gradients.py`).
"""

from __future__ import annotations

import torch
from torch import nn

from gradcomp.audit.observe import Observation, as_images

TV_WEIGHT = 1e-2
ADAM_LR = 0.1


def total_variation(x: torch.Tensor, input_shape: tuple[int, ...]) -> torch.Tensor:
    """Mean absolute difference of neighbouring pixels (0 when the input is not an image)."""
    img = as_images(x, input_shape)
    if img is None:
        return x.new_zeros(())
    return (img[:, 1:, :] - img[:, :-1, :]).abs().mean() + (img[:, :, 1:] - img[:, :, :-1]).abs().mean()


def cosine_attack(obs: Observation, iterations: int, seed: int) -> torch.Tensor:
    """Reconstructions [G, B, ...] maximising cosine similarity on the sent coordinates, plus TV."""
    x = obs.random_inputs(seed)
    opt = torch.optim.Adam([x], lr=ADAM_LR)
    milestones = [int(iterations * f) for f in (3 / 8, 5 / 8, 7 / 8)]
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=0.1)
    target, mask = obs.observed, obs.mask.to(obs.observed.dtype)
    lo, hi = obs.bounds
    for _ in range(iterations):
        opt.zero_grad(set_to_none=True)
        g = obs.grads(x, create_graph=True) * mask
        loss = (1 - nn.functional.cosine_similarity(g, target, dim=1, eps=1e-12)).sum()
        loss = loss + TV_WEIGHT * obs.groups * total_variation(x, obs.input_shape)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            x.clamp_(lo, hi)
    return x.detach()
