"""The protocol's messages as both sides build and read them.

One constant for the protocol version, one function from a job to the `TrainingConfig` its
clients receive, one builder and one reader of `SubmitUpdateRequest`, so a simulated client, a
real client and the coordinator cannot drift apart on what an update looks like.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from gradcomp._proto import fed_pb2
from gradcomp.compression import Fields, Payload, to_fields
from gradcomp.config.fed import FedJob
from gradcomp.errors import GradcompError
from gradcomp.protocol.codec import fields_to_pb, pb_to_fields
from gradcomp.secagg.params import SecAggParams
from gradcomp.secagg.plan import ClientEncoding
from gradcomp.strategies import strategy_class

# Bumped on any change a peer of the previous version would misread or refuse (see
# docs/architecture.md, "Protocol version"). 2: payload kinds are open (Tensor.extra, qsgd), and
# TrainingConfig names the strategy and its client settings (fields 9, 10) and the fixed-work mode's
# local_steps (11), which a client must apply. 3: secure aggregation runs over the protocol (the SecAgg
# RPC, PullTaskResponse.secure_session/secure_id, SecureEncoding's graph settings).
PROTOCOL_VERSION = 3
# The example count a local-DP client claims (and the coordinator keeps in local DP, whatever is
# claimed): its true count would reach the coordinator, the adversary there, without noise.
PRIVATE_EXAMPLE_COUNT = 1


class DuplicateTensor(GradcompError, ValueError):
    """An update that names one tensor twice (the coordinator answers INVALID_ARGUMENT)."""


def training_config(
    job: FedJob, secure: ClientEncoding | None = None, graph: SecAggParams | None = None
) -> fed_pb2.TrainingConfig:
    """What every client of `job` trains with: task, local SGD settings, the client spec, the seed,
    the strategy's client half with its settings, and under secure aggregation the encoding of the
    clients' inputs and the SecAgg+ graph settings (the coordinator's plan: `server.secure_round.plan_for`)."""
    msg = fed_pb2.TrainingConfig(
        task=job.task.name,
        task_args_json=json.dumps(job.task.args, sort_keys=True),
        local_epochs=job.local.epochs,
        batch_size=job.local.batch_size,
        lr=job.local.lr,
        momentum=job.local.momentum,
        compression=job.client_spec(),
        seed=job.seed,
        strategy=job.strategy.name,
        strategy_settings=strategy_class(job.strategy.name).client_settings(job.strategy),
        local_steps=job.local.steps,
    )
    if secure is not None:
        e = secure
        msg.secure.CopyFrom(
            fed_pb2.SecureEncoding(
                bits=e.bits, clip=e.clip, scale=e.scale, norm_bound=e.norm_bound, sigma_sq=e.sigma_sq
            )
        )
    if secure is not None and graph is not None:
        msg.secure.degree, msg.secure.threshold, msg.secure.min_survivors = (
            graph.degree,
            graph.threshold,
            graph.min_survivors,
        )
    return msg


def update_request(
    *,
    client_id: str,
    round: int,
    model_version: int,
    num_examples: int,
    payloads: Mapping[str, Payload],
    metrics: Mapping[str, float],
) -> fed_pb2.SubmitUpdateRequest:
    """One client's compressed update for one round, tensors in the order of `payloads`."""
    msg = fed_pb2.SubmitUpdateRequest(
        client_id=client_id, round=round, model_version=model_version, num_examples=num_examples
    )
    for name, payload in payloads.items():
        fields_to_pb(to_fields(payload), msg.update.add(name=name).tensor)
    for key, value in metrics.items():
        msg.metrics[key] = float(value)
    return msg


def update_fields(msg: fed_pb2.SubmitUpdateRequest) -> dict[str, Fields]:
    """The update's tensors as `Fields` by name (what `Coordinator.accept_update` takes)."""
    update: dict[str, Fields] = {}
    for nt in msg.update:
        if nt.name in update:
            raise DuplicateTensor(f"tensor {nt.name!r} appears twice in the update")
        update[nt.name] = pb_to_fields(nt.tensor)
    return update
