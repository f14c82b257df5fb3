from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]
    FLOAT64: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]
    INT64: _ClassVar[DType]
    INT32: _ClassVar[DType]
    INT16: _ClassVar[DType]
    INT8: _ClassVar[DType]
    UINT8: _ClassVar[DType]
    BOOL: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT64: DType
FLOAT16: DType
BFLOAT16: DType
INT64: DType
INT32: DType
INT16: DType
INT8: DType
UINT8: DType
BOOL: DType

class TensorSpec(_message.Message):
    __slots__ = ("name", "dtype", "shape", "nbytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    nbytes: int
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., nbytes: _Optional[int] = ...) -> None: ...

class Hello(_message.Message):
    __slots__ = ("protocol_version", "client_id", "client_nonce", "unix_ms", "mac")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_NONCE_FIELD_NUMBER: _ClassVar[int]
    UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    client_id: int
    client_nonce: bytes
    unix_ms: int
    mac: bytes
    def __init__(self, protocol_version: _Optional[int] = ..., client_id: _Optional[int] = ..., client_nonce: _Optional[bytes] = ..., unix_ms: _Optional[int] = ..., mac: _Optional[bytes] = ...) -> None: ...

class Welcome(_message.Message):
    __slots__ = ("protocol_version", "session_id", "client_nonce", "config_toml", "model", "input_shape", "num_classes", "mac", "client_sizes")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_NONCE_FIELD_NUMBER: _ClassVar[int]
    CONFIG_TOML_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    NUM_CLASSES_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    CLIENT_SIZES_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    session_id: bytes
    client_nonce: bytes
    config_toml: str
    model: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    input_shape: _containers.RepeatedScalarFieldContainer[int]
    num_classes: int
    mac: bytes
    client_sizes: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, protocol_version: _Optional[int] = ..., session_id: _Optional[bytes] = ..., client_nonce: _Optional[bytes] = ..., config_toml: _Optional[str] = ..., model: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., input_shape: _Optional[_Iterable[int]] = ..., num_classes: _Optional[int] = ..., mac: _Optional[bytes] = ..., client_sizes: _Optional[_Iterable[int]] = ...) -> None: ...

class PollRequest(_message.Message):
    __slots__ = ("client_id", "session_id", "seq", "mac")
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    client_id: int
    session_id: bytes
    seq: int
    mac: bytes
    def __init__(self, client_id: _Optional[int] = ..., session_id: _Optional[bytes] = ..., seq: _Optional[int] = ..., mac: _Optional[bytes] = ...) -> None: ...

class Envelope(_message.Message):
    __slots__ = ("protocol_version", "session_id", "client_id", "seq", "task_id", "kind", "round", "meta_json", "tensors", "payload_bytes")
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    CLIENT_ID_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    META_JSON_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    protocol_version: int
    session_id: bytes
    client_id: int
    seq: int
    task_id: bytes
    kind: str
    round: int
    meta_json: str
    tensors: _containers.RepeatedCompositeFieldContainer[TensorSpec]
    payload_bytes: int
    def __init__(self, protocol_version: _Optional[int] = ..., session_id: _Optional[bytes] = ..., client_id: _Optional[int] = ..., seq: _Optional[int] = ..., task_id: _Optional[bytes] = ..., kind: _Optional[str] = ..., round: _Optional[int] = ..., meta_json: _Optional[str] = ..., tensors: _Optional[_Iterable[_Union[TensorSpec, _Mapping]]] = ..., payload_bytes: _Optional[int] = ...) -> None: ...

class Control(_message.Message):
    __slots__ = ("code", "reason")
    class Code(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        CODE_UNSPECIFIED: _ClassVar[Control.Code]
        KEEPALIVE: _ClassVar[Control.Code]
        DONE: _ClassVar[Control.Code]
        SUPERSEDED: _ClassVar[Control.Code]
    CODE_UNSPECIFIED: Control.Code
    KEEPALIVE: Control.Code
    DONE: Control.Code
    SUPERSEDED: Control.Code
    CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    code: Control.Code
    reason: str
    def __init__(self, code: _Optional[_Union[Control.Code, str]] = ..., reason: _Optional[str] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("header", "data", "mac", "control")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    MAC_FIELD_NUMBER: _ClassVar[int]
    CONTROL_FIELD_NUMBER: _ClassVar[int]
    header: bytes
    data: bytes
    mac: bytes
    control: Control
    def __init__(self, header: _Optional[bytes] = ..., data: _Optional[bytes] = ..., mac: _Optional[bytes] = ..., control: _Optional[_Union[Control, _Mapping]] = ...) -> None: ...

class SubmitReply(_message.Message):
    __slots__ = ("accepted", "reason")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    reason: str
    def __init__(self, accepted: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...
