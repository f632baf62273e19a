from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Tensor(_message.Message):
    __slots__ = ("kind", "dtype", "value_dtype", "index_dtype", "shape", "values", "indices", "extra")
    KIND_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    VALUE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    INDEX_DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    INDICES_FIELD_NUMBER: _ClassVar[int]
    EXTRA_FIELD_NUMBER: _ClassVar[int]
    kind: int
    dtype: int
    value_dtype: int
    index_dtype: int
    shape: _containers.RepeatedScalarFieldContainer[int]
    values: bytes
    indices: bytes
    extra: bytes
    def __init__(self, kind: _Optional[int] = ..., dtype: _Optional[int] = ..., value_dtype: _Optional[int] = ..., index_dtype: _Optional[int] = ..., shape: _Optional[_Iterable[int]] = ..., values: _Optional[bytes] = ..., indices: _Optional[bytes] = ..., extra: _Optional[bytes] = ...) -> None: ...

class NamedTensor(_message.Message):
    __slots__ = ("name", "tensor")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    name: str
    tensor: Tensor
    def __init__(self, name: _Optional[str] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class ModelWeights(_message.Message):
    __slots__ = ("version", "tensors")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    version: int
    tensors: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    def __init__(self, version: _Optional[int] = ..., tensors: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ...) -> None: ...

class TrainingConfig(_message.Message):
    __slots__ = ("task", "task_args_json", "local_epochs", "batch_size", "lr", "momentum", "compression", "seed", "strategy", "strategy_settings", "local_steps", "secure")
    class StrategySettingsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    TASK_FIELD_NUMBER: _ClassVar[int]
    TASK_ARGS_JSON_FIELD_NUMBER: _ClassVar[int]
    LOCAL_EPOCHS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    LR_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    COMPRESSION_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_SETTINGS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_STEPS_FIELD_NUMBER: _ClassVar[int]
    SECURE_FIELD_NUMBER: _ClassVar[int]
    task: str
    task_args_json: str
    local_epochs: int
    batch_size: int
    lr: float
    momentum: float
    compression: str
    seed: int
    strategy: str
    strategy_settings: _containers.ScalarMap[str, float]
    local_steps: int
    secure: SecureEncoding
    def __init__(self, task: _Optional[str] = ..., task_args_json: _Optional[str] = ..., local_epochs: _Optional[int] = ..., batch_size: _Optional[int] = ..., lr: _Optional[float] = ..., momentum: _Optional[float] = ..., compression: _Optional[str] = ..., seed: _Optional[int] = ..., strategy: _Optional[str] = ..., strategy_settings: _Optional[_Mapping[str, float]] = ..., local_steps: _Optional[int] = ..., secure: _Optional[_Union[SecureEncoding, _Mapping]] = ...) -> None: ...

class SecureEncoding(_message.Message):
    __slots__ = ("bits", "clip", "scale", "norm_bound", "sigma_sq", "degree", "threshold", "min_survivors")
    BITS_FIELD_NUMBER: _ClassVar[int]
    CLIP_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    NORM_BOUND_FIELD_NUMBER: _ClassVar[int]
    SIGMA_SQ_FIELD_NUMBER: _ClassVar[int]
    DEGREE_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MIN_SURVIVORS_FIELD_NUMBER: _ClassVar[int]
    bits: int
    clip: float
    scale: float
    norm_bound: float
    sigma_sq: str
    degree: int
    threshold: int
    min_survivors: int
    def __init__(self, bits: _Optional[int] = ..., clip: _Optional[float] = ..., scale: _Optional[float] = ..., norm_bound: _Optional[float] = ..., sigma_sq: _Optional[str] = ..., degree: _Optional[int] = ..., threshold: _Optional[int] = ..., min_survivors: _Optional[int] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("client_id", "protocol_version")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    protocol_version: int
    def __init__(self, client_id: _Optional[str] = ..., protocol_version: _Optional[int] = ...) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = ("client_name", "job_name", "shard_index", "num_shards", "heartbeat_seconds")
    CLIENT_NAME_FIELD_NUMBER: _ClassVar[int]
    JOB_NAME_FIELD_NUMBER: _ClassVar[int]
    SHARD_INDEX_FIELD_NUMBER: _ClassVar[int]
    NUM_SHARDS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    client_name: str
    job_name: str
    shard_index: int
    num_shards: int
    heartbeat_seconds: float
    def __init__(self, client_name: _Optional[str] = ..., job_name: _Optional[str] = ..., shard_index: _Optional[int] = ..., num_shards: _Optional[int] = ..., heartbeat_seconds: _Optional[float] = ...) -> None: ...

class PullTaskRequest(_message.Message):
    __slots__ = ("client_id",)
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    def __init__(self, client_id: _Optional[str] = ...) -> None: ...

class PullTaskResponse(_message.Message):
    __slots__ = ("action", "round", "model_version", "model_bytes", "num_chunks", "config", "retry_after_seconds", "deadline_seconds", "message", "secure_session", "secure_id")
    class Action(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        WAIT: _ClassVar[PullTaskResponse.Action]
        TRAIN: _ClassVar[PullTaskResponse.Action]
        DONE: _ClassVar[PullTaskResponse.Action]
    WAIT: PullTaskResponse.Action
    TRAIN: PullTaskResponse.Action
    DONE: PullTaskResponse.Action
    ACTION_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_BYTES_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    SECURE_SESSION_FIELD_NUMBER: _ClassVar[int]
    SECURE_ID_FIELD_NUMBER: _ClassVar[int]
    action: PullTaskResponse.Action
    round: int
    model_version: int
    model_bytes: int
    num_chunks: int
    config: TrainingConfig
    retry_after_seconds: float
    deadline_seconds: float
    message: str
    secure_session: bytes
    secure_id: int
    def __init__(self, action: _Optional[_Union[PullTaskResponse.Action, str]] = ..., round: _Optional[int] = ..., model_version: _Optional[int] = ..., model_bytes: _Optional[int] = ..., num_chunks: _Optional[int] = ..., config: _Optional[_Union[TrainingConfig, _Mapping]] = ..., retry_after_seconds: _Optional[float] = ..., deadline_seconds: _Optional[float] = ..., message: _Optional[str] = ..., secure_session: _Optional[bytes] = ..., secure_id: _Optional[int] = ...) -> None: ...

class GetModelRequest(_message.Message):
    __slots__ = ("version", "chunk")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    version: int
    chunk: int
    def __init__(self, version: _Optional[int] = ..., chunk: _Optional[int] = ...) -> None: ...

class ModelChunk(_message.Message):
    __slots__ = ("version", "chunk", "num_chunks", "total_bytes", "data")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    NUM_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    version: int
    chunk: int
    num_chunks: int
    total_bytes: int
    data: bytes
    def __init__(self, version: _Optional[int] = ..., chunk: _Optional[int] = ..., num_chunks: _Optional[int] = ..., total_bytes: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class SubmitUpdateRequest(_message.Message):
    __slots__ = ("client_id", "round", "model_version", "num_examples", "update", "metrics")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    UPDATE_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    round: int
    model_version: int
    num_examples: int
    update: _containers.RepeatedCompositeFieldContainer[NamedTensor]
    metrics: _containers.ScalarMap[str, float]
    def __init__(self, client_id: _Optional[str] = ..., round: _Optional[int] = ..., model_version: _Optional[int] = ..., num_examples: _Optional[int] = ..., update: _Optional[_Iterable[_Union[NamedTensor, _Mapping]]] = ..., metrics: _Optional[_Mapping[str, float]] = ...) -> None: ...

class SubmitUpdateResponse(_message.Message):
    __slots__ = ("accepted", "round", "received")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    round: int
    received: int
    def __init__(self, accepted: _Optional[bool] = ..., round: _Optional[int] = ..., received: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("client_id",)
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    def __init__(self, client_id: _Optional[str] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("round", "done")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    round: int
    done: bool
    def __init__(self, round: _Optional[int] = ..., done: _Optional[bool] = ...) -> None: ...

class LeaveRequest(_message.Message):
    __slots__ = ("client_id", "reason")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    client_id: str
    reason: str
    def __init__(self, client_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class LeaveResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class SecAggRequest(_message.Message):
    __slots__ = ("round", "session", "phase", "message")
    class Phase(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        NONE: _ClassVar[SecAggRequest.Phase]
        ADVERTISE: _ClassVar[SecAggRequest.Phase]
        SHARE_KEYS: _ClassVar[SecAggRequest.Phase]
        MASKED_INPUT: _ClassVar[SecAggRequest.Phase]
        UNMASK: _ClassVar[SecAggRequest.Phase]
    NONE: SecAggRequest.Phase
    ADVERTISE: SecAggRequest.Phase
    SHARE_KEYS: SecAggRequest.Phase
    MASKED_INPUT: SecAggRequest.Phase
    UNMASK: SecAggRequest.Phase
    ROUND_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    PHASE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    round: int
    session: bytes
    phase: SecAggRequest.Phase
    message: bytes
    def __init__(self, round: _Optional[int] = ..., session: _Optional[bytes] = ..., phase: _Optional[_Union[SecAggRequest.Phase, str]] = ..., message: _Optional[bytes] = ...) -> None: ...

class SecAggResponse(_message.Message):
    __slots__ = ("state", "message", "retry_after_seconds", "detail")
    class State(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        WAIT: _ClassVar[SecAggResponse.State]
        READY: _ClassVar[SecAggResponse.State]
        DROPPED: _ClassVar[SecAggResponse.State]
        ABORTED: _ClassVar[SecAggResponse.State]
    WAIT: SecAggResponse.State
    READY: SecAggResponse.State
    DROPPED: SecAggResponse.State
    ABORTED: SecAggResponse.State
    STATE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_SECONDS_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    state: SecAggResponse.State
    message: bytes
    retry_after_seconds: float
    detail: str
    def __init__(self, state: _Optional[_Union[SecAggResponse.State, str]] = ..., message: _Optional[bytes] = ..., retry_after_seconds: _Optional[float] = ..., detail: _Optional[str] = ...) -> None: ...
