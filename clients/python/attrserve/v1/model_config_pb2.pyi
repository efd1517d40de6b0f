from attrserve.v1 import tensor_pb2 as _tensor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Platform(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PLATFORM_UNSPECIFIED: _ClassVar[Platform]
    PLATFORM_PYTORCH_EAGER: _ClassVar[Platform]
    PLATFORM_TORCHSCRIPT: _ClassVar[Platform]
    PLATFORM_TORCH_EXPORT: _ClassVar[Platform]
PLATFORM_UNSPECIFIED: Platform
PLATFORM_PYTORCH_EAGER: Platform
PLATFORM_TORCHSCRIPT: Platform
PLATFORM_TORCH_EXPORT: Platform

class InputSpec(_message.Message):
    __slots__ = ("name", "dtype", "dims")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DIMS_FIELD_NUMBER: _ClassVar[int]
    name: str
    dtype: _tensor_pb2.DataType
    dims: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, name: _Optional[str] = ..., dtype: _Optional[_Union[_tensor_pb2.DataType, str]] = ..., dims: _Optional[_Iterable[int]] = ...) -> None: ...

class OutputSelector(_message.Message):
    __slots__ = ("index", "key")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    index: int
    key: str
    def __init__(self, index: _Optional[int] = ..., key: _Optional[str] = ...) -> None: ...

class ModelConfig(_message.Message):
    __slots__ = ("name", "version", "platform", "inputs", "max_batch_rows", "max_queue_delay_microseconds", "device", "output", "description", "precision", "max_queued_rows", "max_queued_bytes", "strict_input_dtypes", "intra_op_threads", "instances", "memory_format")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    PLATFORM_FIELD_NUMBER: _ClassVar[int]
    INPUTS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_ROWS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_DELAY_MICROSECONDS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUED_ROWS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUED_BYTES_FIELD_NUMBER: _ClassVar[int]
    STRICT_INPUT_DTYPES_FIELD_NUMBER: _ClassVar[int]
    INTRA_OP_THREADS_FIELD_NUMBER: _ClassVar[int]
    INSTANCES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_FORMAT_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    platform: Platform
    inputs: _containers.RepeatedCompositeFieldContainer[InputSpec]
    max_batch_rows: int
    max_queue_delay_microseconds: int
    device: str
    output: OutputSelector
    description: str
    precision: str
    max_queued_rows: int
    max_queued_bytes: int
    strict_input_dtypes: bool
    intra_op_threads: int
    instances: int
    memory_format: str
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., platform: _Optional[_Union[Platform, str]] = ..., inputs: _Optional[_Iterable[_Union[InputSpec, _Mapping]]] = ..., max_batch_rows: _Optional[int] = ..., max_queue_delay_microseconds: _Optional[int] = ..., device: _Optional[str] = ..., output: _Optional[_Union[OutputSelector, _Mapping]] = ..., description: _Optional[str] = ..., precision: _Optional[str] = ..., max_queued_rows: _Optional[int] = ..., max_queued_bytes: _Optional[int] = ..., strict_input_dtypes: _Optional[bool] = ..., intra_op_threads: _Optional[int] = ..., instances: _Optional[int] = ..., memory_format: _Optional[str] = ...) -> None: ...
