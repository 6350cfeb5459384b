from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable
from typing import ClassVar as _ClassVar, Optional as _Optional

DESCRIPTOR: _descriptor.FileDescriptor

class EgressPolicy(_message.Message):
    __slots__ = ("deny_all", "allow_package_managers", "allow_http", "allow_https", "allowed_domains", "allowed_cidrs")
    DENY_ALL_FIELD_NUMBER: _ClassVar[int]
    ALLOW_PACKAGE_MANAGERS_FIELD_NUMBER: _ClassVar[int]
    ALLOW_HTTP_FIELD_NUMBER: _ClassVar[int]
    ALLOW_HTTPS_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_DOMAINS_FIELD_NUMBER: _ClassVar[int]
    ALLOWED_CIDRS_FIELD_NUMBER: _ClassVar[int]
    deny_all: bool
    allow_package_managers: bool
    allow_http: bool
    allow_https: bool
    allowed_domains: _containers.RepeatedScalarFieldContainer[str]
    allowed_cidrs: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, deny_all: _Optional[bool] = ..., allow_package_managers: _Optional[bool] = ..., allow_http: _Optional[bool] = ..., allow_https: _Optional[bool] = ..., allowed_domains: _Optional[_Iterable[str]] = ..., allowed_cidrs: _Optional[_Iterable[str]] = ...) -> None: ...
