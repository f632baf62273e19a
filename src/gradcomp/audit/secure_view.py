"""The audit's `secagg` setting: what the coordinator sees of a client under secure aggregation.

Each victim batch is one client's federated round (`audit/federated`), whose compressed update is
encoded as the client encodes its secure input (`fedclient.secure.secure_input`: clipped, scaled,
conditionally rounded, in Z_(2^32); no distributed-DP noise, so whatever hides the victims is the
masking alone) and masked in a real SecAgg+ round (`secagg.SecAggClient` / `SecAggServer`) with
FILLERS other clients. The attacker is the coordinator: it holds each victim client's masked input,
reads it as the signed integers of the encoding divided by the scale (the decode it would apply to
the sum), and inverts that as the pseudo-gradient. The round is completed, and its unmasked sum must
equal the inputs' sum: the masks cancel in the sum and hide each summand.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

from gradcomp.audit.config import AuditConfig
from gradcomp.audit.federated import ClientRound, attacker_view, client_rounds
from gradcomp.audit.observe import Observation, Setting, Truth, received, victim_groups
from gradcomp.fedclient.secure import secure_input
from gradcomp.secagg.client import SecAggClient
from gradcomp.secagg.params import SecAggParams
from gradcomp.secagg.plan import make_plan
from gradcomp.secagg.quantise import from_ring
from gradcomp.secagg.server import SecAggServer
from gradcomp.tasks import Task

FILLERS = 3  # honest clients beside the victims in each round (zero updates): a round of at least 4
CLIP = 1.0  # the secure encoding's L2 clip of a client's update
BITS = 32
BETA = 1e-9  # the conditional rounding's failure chance (config.secure's default)


def secagg_observe(
    task: Task, setting: Setting, spec: str, batch: int, config: AuditConfig, *, masked: bool = True
) -> tuple[Observation, Truth]:
    """Each victim client's view at the coordinator: its masked input (with `masked=False`, the control,
    its unmasked secure input: what the coordinator would see without the masks)."""
    ids = victim_groups(setting, batch)
    rounds = client_rounds(task, setting, spec, ids, config)
    inputs = {cid: _values(r) for cid, r in enumerate(rounds)}
    dim = len(inputs[0])
    n = len(rounds) + FILLERS
    plan = make_plan(clients_per_round=n, dim=dim, clip=CLIP, bits=BITS, noise_multiplier=None, beta=BETA)
    ring = {cid: secure_input(r.payloads, plan.encoding, r.key) for cid, r in enumerate(rounds)}
    ring.update({cid: np.zeros(dim, dtype=np.uint64) for cid in range(len(rounds), n)})
    seen = masked_inputs(ring, plan.params, f"audit-{config.seed}".encode()) if masked else ring
    observed, mask = [], []
    for cid, r in enumerate(rounds):
        values = torch.as_tensor(from_ring(seen[cid], BITS).astype(np.float64) / plan.encoding.scale)
        dense, sent = _scatter(values, r)
        observed.append(dense * r.scale)
        mask.append(sent)
    return attacker_view(setting, ids, torch.stack(observed).float(), torch.stack(mask), rounds)


def _values(r: ClientRound) -> np.ndarray:
    return np.concatenate([p.values.double().numpy().ravel() for p in r.payloads.values()])


def _scatter(values: torch.Tensor, r: ClientRound) -> tuple[torch.Tensor, torch.Tensor]:
    """The input's values back at the coordinates the payloads carry (shared-seed positions are public)."""
    dense, sent, at = [], [], 0
    for payload in r.payloads.values():
        full, positions = received(payload)
        n = int(positions.sum())
        out = torch.zeros_like(full, dtype=torch.float64)
        out[positions] = values[at : at + n]
        dense.append(out)
        sent.append(positions)
        at += n
    return torch.cat(dense), torch.cat(sent)


def masked_inputs(inputs: dict[int, np.ndarray], params: SecAggParams, round_id: bytes) -> dict[int, np.ndarray]:
    """A complete SecAgg+ round over `inputs` (cid -> ring vector); returns each client's masked input,
    as the coordinator received it, after checking that the round's unmasked sum is the inputs' sum."""
    clients = {cid: SecAggClient(cid, params, round_id) for cid in inputs}
    dim = len(next(iter(inputs.values())))
    server = SecAggServer(params, round_id, dim, hashlib.sha256(round_id).digest())
    share_reqs = server.collect_advertise([c.advertise() for c in clients.values()])
    mask_reqs = server.collect_shares([clients[cid].share_keys(r) for cid, r in share_reqs.items()])
    masked = [clients[cid].masked_input(r, inputs[cid]) for cid, r in mask_reqs.items()]
    unmask_reqs = server.collect_masked(masked)
    total = server.finish([clients[cid].unmask(r) for cid, r in unmask_reqs.items()])
    expected = sum(v.astype(object) for v in inputs.values())
    if not np.array_equal(total.astype(object), expected % (1 << params.bits)):
        raise RuntimeError("the secure aggregation round's sum is not the sum of its inputs")
    return {m.cid: m.y for m in masked}
