"""DLG-style gradient inversion (Zhu et al. 2019, with known labels as in iDLG).

Loss: squared L2 distance between the candidate inputs' gradient and the observed payload
on its transmitted coordinates, minimised with L-BFGS; the result is clipped to the data
range. Unlike the cosine attack it is sensitive to the gradient's scale. All victim batches
of a spec are one batched problem.
"""

from __future__ import annotations

import torch

from gradcomp.audit.observe import Observation


def l2_attack(obs: Observation, iterations: int, seed: int) -> torch.Tensor:
    """Reconstructions [G, B, ...] minimising the squared L2 gradient distance (L-BFGS), clipped to range."""
    x = obs.random_inputs(seed)
    opt = torch.optim.LBFGS([x], lr=1.0, max_iter=iterations, history_size=100, line_search_fn="strong_wolfe")
    target, mask = obs.observed, obs.mask.to(obs.observed.dtype)

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss = ((obs.grads(x, create_graph=True) * mask - target) ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    lo, hi = obs.bounds
    return x.detach().nan_to_num(nan=lo).clamp(lo, hi)
