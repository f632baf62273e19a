"""Scoring reconstructions against the victims, the mean-image baseline, and the verdict.

- Reconstructions of one batch come in no particular order: each is paired with a victim by
  minimum total MSE (Hungarian matching), the usual convention in the attack literature.
- PSNR uses the data range as the peak; MSE is floored at 1e-10 (100 dB on a [0, 1] range).
- Re-identification: the fraction of victims whose matched reconstruction is nearer (L2) to
  that victim than to any other test image.
- Verdict, worst case over attacks and batch sizes: `leaks` when some attack re-identifies
  more than LEAK_REIDENTIFICATION of the victims, or gets PSNR at least LEAK_PSNR_GAIN_DB above
  the mean-image baseline (it learned real pixels without singling a victim out); else `resists`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from scipy.optimize import linear_sum_assignment

from gradcomp.compression import build
from gradcomp.compression.stages import DP
from gradcomp.privacy import gaussian_epsilon, laplace_residual_delta

LEAK_REIDENTIFICATION = 0.2
LEAK_PSNR_GAIN_DB = 6.0
MSE_FLOOR = 1e-10
EPSILON_DELTA = 1e-5

THRESHOLDS = {
    "leaks_if_reidentification_above": LEAK_REIDENTIFICATION,
    "leaks_if_psnr_above_baseline_db": LEAK_PSNR_GAIN_DB,
}


def match(recon: torch.Tensor, victims: torch.Tensor) -> torch.Tensor:
    """`recon` [G, B, ...] reordered within each group to the victims' order (min total MSE)."""
    groups, batch = victims.shape[:2]
    r, v = recon.reshape(groups, batch, -1), victims.reshape(groups, batch, -1)
    out = torch.empty_like(r)
    for g in range(groups):
        cost = torch.cdist(v[g].double(), r[g].double()) ** 2
        rows, cols = linear_sum_assignment(cost.numpy())
        out[g, torch.as_tensor(rows)] = r[g, torch.as_tensor(cols)]
    return out.view_as(recon)


def score(
    recon: torch.Tensor, victims: torch.Tensor, victim_ids: torch.Tensor, pool: torch.Tensor, span: float
) -> dict[str, float]:
    """MSE, PSNR and re-identification of matched reconstructions [G, B, ...] against the victims."""
    flat_r = match(recon, victims).reshape(-1, pool[0].numel()).double()
    flat_v = victims.reshape(-1, pool[0].numel()).double()
    mse = ((flat_r - flat_v) ** 2).mean(dim=1)
    psnr = 10 * torch.log10(span**2 / mse.clamp_min(MSE_FLOOR))
    nearest = torch.cdist(flat_r, pool.reshape(len(pool), -1).double()).argmin(dim=1)
    return {
        "mse": float(mse.mean()),
        "psnr_db": float(psnr.mean()),
        "reidentification": float((nearest == victim_ids.reshape(-1)).double().mean()),
    }


def baseline(
    mean_image: torch.Tensor, victims: torch.Tensor, victim_ids: torch.Tensor, pool: torch.Tensor, span: float
):
    """The same figures for the training set's mean image offered as every reconstruction."""
    guess = mean_image.expand_as(victims)
    return score(guess, victims, victim_ids, pool, span)


def worst(attacks: dict[str, dict[str, Any]]) -> tuple[float, float, str | None]:
    """Highest re-identification, highest PSNR, and the attack with the higher re-identification."""
    ran = {name: a for name, a in attacks.items() if a.get("applicable", True)}
    if not ran:
        return 0.0, -math.inf, None
    name = max(ran, key=lambda n: (ran[n]["reidentification"], ran[n]["psnr_db"]))
    return ran[name]["reidentification"], max(a["psnr_db"] for a in ran.values()), name


def verdict(reidentification: float, psnr_db: float, baseline_psnr_db: float) -> str:
    """`leaks` or `resists` under the thresholds in this module's docstring."""
    if reidentification > LEAK_REIDENTIFICATION or psnr_db >= baseline_psnr_db + LEAK_PSNR_GAIN_DB:
        return "leaks"
    return "resists"


def dp_epsilon(spec: str) -> dict[str, Any] | None:
    """Epsilon of one payload of `spec`'s dp stage, or None without one.

    Adversary: whoever sees one payload. Unit of privacy: the sender's whole gradient (the dp
    stage clips the whole vector), one release, no sampling amplification (q = 1). Gaussian:
    Opacus' RDP accountant at delta 1e-5 (less the sampler's residual, `privacy`); Laplace:
    epsilon = 1 / sigma (L1 clip), "pure" but for the delta its sampler's finite reach leaves.
    """
    stage = next((s for s in build(spec).stages if isinstance(s, DP)), None)
    if stage is None:
        return None
    if stage.mechanism == "laplace":
        eps = math.inf if stage.sigma == 0 else 1.0 / stage.sigma
        return {"epsilon": eps, "delta": laplace_residual_delta(eps), "releases": 1, "sample_rate": 1.0}
    eps = gaussian_epsilon(stage.sigma, 1, EPSILON_DELTA)
    return {"epsilon": eps, "delta": EPSILON_DELTA, "releases": 1, "sample_rate": 1.0}
