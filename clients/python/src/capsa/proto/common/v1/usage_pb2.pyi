import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Usage(_message.Message):
    __slots__ = ("cpu_time", "memory_used_bytes", "memory_peak_bytes", "vmm_resident_bytes", "network_rx_bytes", "network_tx_bytes", "disk_read_bytes", "disk_write_bytes", "uptime", "sample_time", "vmm_resident_peak_bytes", "processes_running", "terminals_open")
    CPU_TIME_FIELD_NUMBER: _ClassVar[int]
    MEMORY_USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    MEMORY_PEAK_BYTES_FIELD_NUMBER: _ClassVar[int]
    VMM_RESIDENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    NETWORK_RX_BYTES_FIELD_NUMBER: _ClassVar[int]
    NETWORK_TX_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_READ_BYTES_FIELD_NUMBER: _ClassVar[int]
    DISK_WRITE_BYTES_FIELD_NUMBER: _ClassVar[int]
    UPTIME_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_TIME_FIELD_NUMBER: _ClassVar[int]
    VMM_RESIDENT_PEAK_BYTES_FIELD_NUMBER: _ClassVar[int]
    PROCESSES_RUNNING_FIELD_NUMBER: _ClassVar[int]
    TERMINALS_OPEN_FIELD_NUMBER: _ClassVar[int]
    cpu_time: _duration_pb2.Duration
    memory_used_bytes: int
    memory_peak_bytes: int
    vmm_resident_bytes: int
    network_rx_bytes: int
    network_tx_bytes: int
    disk_read_bytes: int
    disk_write_bytes: int
    uptime: _duration_pb2.Duration
    sample_time: _timestamp_pb2.Timestamp
    vmm_resident_peak_bytes: int
    processes_running: int
    terminals_open: int
    def __init__(self, cpu_time: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., memory_used_bytes: _Optional[int] = ..., memory_peak_bytes: _Optional[int] = ..., vmm_resident_bytes: _Optional[int] = ..., network_rx_bytes: _Optional[int] = ..., network_tx_bytes: _Optional[int] = ..., disk_read_bytes: _Optional[int] = ..., disk_write_bytes: _Optional[int] = ..., uptime: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., sample_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., vmm_resident_peak_bytes: _Optional[int] = ..., processes_running: _Optional[int] = ..., terminals_open: _Optional[int] = ...) -> None: ...
