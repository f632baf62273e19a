"""Analytic first-layer inversion (Phong et al. 2017; Geiping et al. 2020, section 3).

For a first layer y = W x + b, the gradient of row i is dL/dW_i = (dL/db_i) x, so
dL/dW_i / dL/db_i is exactly the input, for every unit that one example alone activates.
With B > 1 examples some units mix several inputs; rows that isolate one example repeat
the same image, so the attack keeps the B largest groups of (near-)identical candidate rows.

Any rescaling of the whole gradient (`unit`) cancels in the ratio. Sparse payloads: a row
is a candidate when its bias entry was sent, and only its sent pixels count; pixels no row
sent read as zero, as the decoded gradient gives them.
"""

from __future__ import annotations

import torch
from torch import nn

from gradcomp.audit.observe import Observation

# Two candidate rows are the same image when their RMS difference over the pixels both sent is
# below this fraction of the data range, and both sent at least MIN_OVERLAP of the pixels.
SAME_IMAGE_RMS = 0.02
MIN_OVERLAP = 1 / 8


def first_linear(model: nn.Module, input_numel: int) -> str | None:
    """Name of the model's first layer if it is a biased Linear reading the whole input, else None."""
    if not isinstance(model, nn.Sequential):
        return None
    for name, child in model.named_children():
        if isinstance(child, nn.Flatten):
            continue
        ok = isinstance(child, nn.Linear) and child.bias is not None and child.in_features == input_numel
        return name if ok else None
    return None


def applicable(obs: Observation) -> str | None:
    """None when the attack applies to this model, else why not."""
    numel = int(torch.tensor(obs.input_shape).prod())
    if first_linear(obs.grads.model, numel) is None:
        return "the model's first layer is not a biased Linear over the whole input"
    return None


def analytic_attack(obs: Observation) -> torch.Tensor:
    """Reconstructions [G, B, *input_shape] from the first layer's weight / bias gradient ratios."""
    numel = int(torch.tensor(obs.input_shape).prod())
    name = first_linear(obs.grads.model, numel)
    if name is None:
        raise ValueError(applicable(obs))
    offsets = obs.grads.offsets()
    (w0, w1), (b0, b1) = offsets[f"{name}.weight"], offsets[f"{name}.bias"]
    lo, hi = obs.bounds
    out = torch.empty(obs.groups, obs.batch, numel)
    for g in range(obs.groups):
        gw = obs.observed[g, w0:w1].view(-1, numel)
        gb = obs.observed[g, b0:b1]
        mw = obs.mask[g, w0:w1].view(-1, numel) & obs.mask[g, b0:b1, None] & (gb.abs() > 0)[:, None]
        cand = torch.where(mw, gw / torch.where(gb.abs() > 0, gb, 1.0)[:, None], 0.0).clamp(lo, hi)
        out[g] = _pick_images(cand, mw, gb.abs(), obs.batch, hi - lo)
    return out.clamp(lo, hi).view(obs.groups, obs.batch, *obs.input_shape)


def _pick_images(cand: torch.Tensor, valid: torch.Tensor, strength: torch.Tensor, k: int, span: float) -> torch.Tensor:
    """The k largest groups of near-identical candidate rows, each averaged over its members."""
    cand, valid = cand.double(), valid.double()
    filled = cand * valid
    overlap = valid @ valid.T
    sq = (filled * cand) @ valid.T
    msd = (sq + sq.T - 2 * filled @ filled.T) / overlap.clamp_min(1)
    need = max(1.0, MIN_OVERLAP * cand.shape[1])
    same = (overlap >= need) & (msd <= (SAME_IMAGE_RMS * span) ** 2) & (valid.sum(1) > 0)[:, None]
    alive = valid.sum(1) > 0
    images = torch.zeros(k, cand.shape[1], dtype=cand.dtype)
    for i in range(k):
        if not alive.any():
            break
        members = same & alive[None, :] & alive[:, None]
        score = members.sum(1).double() + strength.double() / (strength.max() + 1e-30) * 0.5
        best = int(torch.where(alive, score, -1.0).argmax())
        group = members[best] | (torch.arange(len(alive)) == best)
        counts = valid[group].sum(0)
        images[i] = (filled[group].sum(0) / counts.clamp_min(1)).where(counts > 0, 0.0)
        alive &= ~group
    return images.float()
