"""Gradient compression: stages, pipelines, payloads and their wire encoding (torch, with
numpy for the CPU selection pass).

pipe = build("dp(clip=1.0, sigma=0.8) | rtopk(ratio=0.01, r=0.05) | ef")
payload = pipe.compress(grad, key="layer3")
restored = pipe.decompress(payload)
payload.nbytes  # exact bytes on the wire
"""

from gradcomp.compression.kinds import Dense, Sparse
from gradcomp.compression.payload import KINDS, Fields, Payload, WireError, dense_nbytes, register_kind
from gradcomp.compression.pipeline import Pipeline, build, check_order, parse_spec
from gradcomp.compression.spec import PrivacyOrderError, SpecError
from gradcomp.compression.stages import STAGES, Stage
from gradcomp.compression.wire import decode, encode, from_fields, to_fields

__all__ = [
    "KINDS",
    "STAGES",
    "Dense",
    "Fields",
    "Payload",
    "Pipeline",
    "PrivacyOrderError",
    "Sparse",
    "SpecError",
    "Stage",
    "WireError",
    "build",
    "check_order",
    "decode",
    "dense_nbytes",
    "encode",
    "from_fields",
    "parse_spec",
    "register_kind",
    "to_fields",
]
