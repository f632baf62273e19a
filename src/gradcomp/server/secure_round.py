"""The coordinator's side of a secure-aggregation round: the plan it settles once, and what it checks
of an unmasked sum before releasing it.

Under secure aggregation the coordinator never sees an update, only the sum of a round's survivors
(`secagg/`). So the per-update checks of `updates.decode_update` (norm clip, weight caps) cannot
apply; each honest client clipped its own update before quantising (`ClientEncoding.clip`), and a
malicious client's contribution is bounded only by the ring (out of scope: docs/security.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from gradcomp.compression import Payload, Pipeline, parse_spec
from gradcomp.config.fed import FedJob
from gradcomp.protocol.model import TensorSpec
from gradcomp.secagg.plan import SecurePlan, make_plan
from gradcomp.secagg.quantise import from_ring
from gradcomp.server.rounds import RoundState
from gradcomp.server.updates import Params, Rejected, decode_update


def layout(spec: str, model: Mapping[str, TensorSpec], round: int) -> dict[str, Payload]:
    """What every client's payloads look like in `round` (zeros): the whole model, or the round's
    shared coordinates (randomk positions follow the round number; `config.secure.check_secure`
    allows only such summable specs). A client's input is their values in this order."""
    zeros = {k: torch.zeros(s.shape, dtype=s.dtype) for k, s in model.items()}
    pipe = Pipeline(parse_spec(spec))
    pipe.load_state_dict({"steps": dict.fromkeys(model, round)})
    return pipe.compress_update(zeros)


def values_per_client(spec: str, model: Mapping[str, TensorSpec]) -> int:
    """How many values one client's update puts into the sum."""
    return sum(int(p.values.numel()) for p in layout(spec, model, 1).values())


def sum_payloads(plan: SecurePlan, total: np.ndarray, template: Mapping[str, Payload]) -> dict[str, Payload]:
    """The unmasked ring sum as payloads shaped like `template`, back in float units (divided by gamma)."""
    values = torch.from_numpy(from_ring(np.asarray(total, dtype=np.uint64), plan.encoding.bits) / plan.encoding.scale)
    if values.numel() != plan.dim:
        raise Rejected("bad_shape", f"a secure sum of {values.numel()} values; the round sums {plan.dim}")
    out, at = {}, 0
    for name, p in template.items():
        n = int(p.values.numel())
        # every Payload kind is a frozen dataclass (compression/payload.py); the base class cannot say so
        out[name] = dataclasses.replace(p, values=values[at : at + n].to(p.values.dtype))  # type: ignore[type-var]
        at += n
    return out


def plan_for(job: FedJob, model: Mapping[str, TensorSpec]) -> SecurePlan | None:
    """The job's secure-aggregation plan (None without secure aggregation)."""
    s = job.secure_aggregation
    if s is None:
        return None
    clip = s.clip if s.clip is not None else job.privacy.clip
    assert clip is not None  # config.secure.check_secure
    z = job.privacy.noise_multiplier if job.privacy.mode == "distributed" else None
    return make_plan(
        clients_per_round=job.clients_per_round,
        dim=values_per_client(job.client_spec(), model),
        clip=clip,
        bits=s.bits,
        noise_multiplier=z,
        beta=s.rounding_beta,
        scale=s.scale,
        degree=s.degree,
        threshold=s.threshold,
        min_survivors=s.min_survivors,
    )


def checked_sum(
    r: RoundState,
    plan: SecurePlan,
    survivors: Sequence[str],
    total: np.ndarray,
    model: Mapping[str, TensorSpec],
    spec: str,
) -> Params:
    """The mean update of `survivors` from their unmasked ring sum, after checking who they are; else `Rejected`."""
    names = set(survivors)
    if len(names) != len(survivors) or not names <= r.selected:
        raise Rejected("not_selected", f"a secure sum names clients not asked for round {r.number} (or one twice)")
    if len(names) < plan.params.min_survivors:
        raise Rejected("too_few", f"a secure sum of {len(names)} clients; the round needs {plan.params.min_survivors}")
    dense = decode_update(sum_payloads(plan, total, layout(spec, model, r.number)), model)
    return {k: v / len(names) for k, v in dense.items()}
