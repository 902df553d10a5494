from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class FetchMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FETCH_MODE_UNSPECIFIED: _ClassVar[FetchMode]
    FETCH_MODE_SHARED: _ClassVar[FetchMode]
    FETCH_MODE_PER_SUBSCRIBER: _ClassVar[FetchMode]

class Reason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REASON_UNSPECIFIED: _ClassVar[Reason]
    REASON_SUBSCRIBE: _ClassVar[Reason]
    REASON_CHANGE: _ClassVar[Reason]

class Status(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STATUS_UNSPECIFIED: _ClassVar[Status]
    STATUS_OK: _ClassVar[Status]
    STATUS_NOT_FOUND: _ClassVar[Status]
    STATUS_FORBIDDEN: _ClassVar[Status]
    STATUS_ERROR: _ClassVar[Status]
FETCH_MODE_UNSPECIFIED: FetchMode
FETCH_MODE_SHARED: FetchMode
FETCH_MODE_PER_SUBSCRIBER: FetchMode
REASON_UNSPECIFIED: Reason
REASON_SUBSCRIBE: Reason
REASON_CHANGE: Reason
STATUS_UNSPECIFIED: Status
STATUS_OK: Status
STATUS_NOT_FOUND: Status
STATUS_FORBIDDEN: Status
STATUS_ERROR: Status

class EntityKey(_message.Message):
    __slots__ = ("entity", "id")
    ENTITY_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    entity: str
    id: str
    def __init__(self, entity: _Optional[str] = ..., id: _Optional[str] = ...) -> None: ...

class NotifyRequest(_message.Message):
    __slots__ = ("keys", "idempotency_key")
    KEYS_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedCompositeFieldContainer[EntityKey]
    idempotency_key: str
    def __init__(self, keys: _Optional[_Iterable[_Union[EntityKey, _Mapping]]] = ..., idempotency_key: _Optional[str] = ...) -> None: ...

class NotifyResponse(_message.Message):
    __slots__ = ("accepted", "sequences", "duplicate")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    SEQUENCES_FIELD_NUMBER: _ClassVar[int]
    DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    accepted: int
    sequences: _containers.RepeatedScalarFieldContainer[int]
    duplicate: bool
    def __init__(self, accepted: _Optional[int] = ..., sequences: _Optional[_Iterable[int]] = ..., duplicate: _Optional[bool] = ...) -> None: ...

class ResolverMessage(_message.Message):
    __slots__ = ("register", "response", "drain")
    REGISTER_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    DRAIN_FIELD_NUMBER: _ClassVar[int]
    register: Register
    response: ResolveResponse
    drain: Drain
    def __init__(self, register: _Optional[_Union[Register, _Mapping]] = ..., response: _Optional[_Union[ResolveResponse, _Mapping]] = ..., drain: _Optional[_Union[Drain, _Mapping]] = ...) -> None: ...

class Drain(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Register(_message.Message):
    __slots__ = ("name", "entities", "pass_through", "max_in_flight")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ENTITIES_FIELD_NUMBER: _ClassVar[int]
    PASS_THROUGH_FIELD_NUMBER: _ClassVar[int]
    MAX_IN_FLIGHT_FIELD_NUMBER: _ClassVar[int]
    name: str
    entities: _containers.RepeatedCompositeFieldContainer[EntityRegistration]
    pass_through: bool
    max_in_flight: int
    def __init__(self, name: _Optional[str] = ..., entities: _Optional[_Iterable[_Union[EntityRegistration, _Mapping]]] = ..., pass_through: _Optional[bool] = ..., max_in_flight: _Optional[int] = ...) -> None: ...

class EntityRegistration(_message.Message):
    __slots__ = ("entity", "fetch_mode")
    ENTITY_FIELD_NUMBER: _ClassVar[int]
    FETCH_MODE_FIELD_NUMBER: _ClassVar[int]
    entity: str
    fetch_mode: FetchMode
    def __init__(self, entity: _Optional[str] = ..., fetch_mode: _Optional[_Union[FetchMode, str]] = ...) -> None: ...

class ResolveResponse(_message.Message):
    __slots__ = ("request_id", "results")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    results: _containers.RepeatedCompositeFieldContainer[KeyResult]
    def __init__(self, request_id: _Optional[int] = ..., results: _Optional[_Iterable[_Union[KeyResult, _Mapping]]] = ...) -> None: ...

class KeyResult(_message.Message):
    __slots__ = ("id", "status", "rows", "version", "message")
    ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    id: str
    status: Status
    rows: _containers.RepeatedScalarFieldContainer[bytes]
    version: int
    message: str
    def __init__(self, id: _Optional[str] = ..., status: _Optional[_Union[Status, str]] = ..., rows: _Optional[_Iterable[bytes]] = ..., version: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class NodeMessage(_message.Message):
    __slots__ = ("registered", "request", "pass_through")
    REGISTERED_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    PASS_THROUGH_FIELD_NUMBER: _ClassVar[int]
    registered: Registered
    request: ResolveRequest
    pass_through: PassThrough
    def __init__(self, registered: _Optional[_Union[Registered, _Mapping]] = ..., request: _Optional[_Union[ResolveRequest, _Mapping]] = ..., pass_through: _Optional[_Union[PassThrough, _Mapping]] = ...) -> None: ...

class Registered(_message.Message):
    __slots__ = ("node_id", "resolver_id")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    RESOLVER_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    resolver_id: str
    def __init__(self, node_id: _Optional[str] = ..., resolver_id: _Optional[str] = ...) -> None: ...

class ResolveRequest(_message.Message):
    __slots__ = ("request_id", "entity", "ids", "secret", "reason", "shared")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ENTITY_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SHARED_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    entity: str
    ids: _containers.RepeatedScalarFieldContainer[str]
    secret: str
    reason: Reason
    shared: bool
    def __init__(self, request_id: _Optional[int] = ..., entity: _Optional[str] = ..., ids: _Optional[_Iterable[str]] = ..., secret: _Optional[str] = ..., reason: _Optional[_Union[Reason, str]] = ..., shared: _Optional[bool] = ...) -> None: ...

class PassThrough(_message.Message):
    __slots__ = ("connection_id", "secret", "payload")
    CONNECTION_ID_FIELD_NUMBER: _ClassVar[int]
    SECRET_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    connection_id: str
    secret: str
    payload: bytes
    def __init__(self, connection_id: _Optional[str] = ..., secret: _Optional[str] = ..., payload: _Optional[bytes] = ...) -> None: ...
