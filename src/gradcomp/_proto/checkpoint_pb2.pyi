from . import fed_pb2 as _fed_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Checkpoint(_message.Message):
    __slots__ = ("format", "round", "model", "strategy_state", "meta_json")
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_STATE_FIELD_NUMBER: _ClassVar[int]
    META_JSON_FIELD_NUMBER: _ClassVar[int]
    format: int
    round: int
    model: _containers.RepeatedCompositeFieldContainer[_fed_pb2.NamedTensor]
    strategy_state: _containers.RepeatedCompositeFieldContainer[_fed_pb2.NamedTensor]
    meta_json: str
    def __init__(self, format: _Optional[int] = ..., round: _Optional[int] = ..., model: _Optional[_Iterable[_Union[_fed_pb2.NamedTensor, _Mapping]]] = ..., strategy_state: _Optional[_Iterable[_Union[_fed_pb2.NamedTensor, _Mapping]]] = ..., meta_json: _Optional[str] = ...) -> None: ...
