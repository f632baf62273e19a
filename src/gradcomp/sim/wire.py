"""The simulation's updates in the coordinator's own protobuf messages (server/codec.py), so a
simulated byte is a real byte: clients serialise a `SubmitUpdateRequest`, the driver parses it
and hands the `Fields` to the same `Coordinator.accept_update` the gRPC service calls.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from gradcomp._proto import fed_pb2
from gradcomp.compression import Fields, Payload, to_fields
from gradcomp.protocol.codec import fields_to_pb, pb_to_fields


def update_request(
    *,
    client_id: str,
    round: int,
    model_version: int,
    num_examples: int,
    payloads: Mapping[str, Payload],
    metrics: Mapping[str, float],
) -> bytes:
    msg = fed_pb2.SubmitUpdateRequest(
        client_id=client_id, round=round, model_version=model_version, num_examples=num_examples
    )
    for name, payload in payloads.items():
        nt = msg.update.add(name=name)
        fields_to_pb(to_fields(payload), nt.tensor)
    for key, value in metrics.items():
        msg.metrics[key] = float(value)
    return msg.SerializeToString()


@dataclass
class ParsedUpdate:
    client_id: str
    round: int
    model_version: int
    num_examples: int
    update: dict[str, Fields]
    metrics: dict[str, float]


def parse_request(data: bytes) -> ParsedUpdate:
    msg = fed_pb2.SubmitUpdateRequest()
    msg.ParseFromString(data)
    update: dict[str, Fields] = {}
    for nt in msg.update:
        if nt.name in update:
            raise ValueError(f"tensor {nt.name!r} appears twice in the update")
        update[nt.name] = pb_to_fields(nt.tensor)
    return ParsedUpdate(
        msg.client_id, int(msg.round), int(msg.model_version), int(msg.num_examples), update, dict(msg.metrics)
    )
