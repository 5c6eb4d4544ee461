from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Header(_message.Message):
    __slots__ = ("name", "value")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    name: str
    value: str
    def __init__(self, name: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...

class ForwardRequest(_message.Message):
    __slots__ = ("method", "path", "query", "headers", "body", "origin_region")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    ORIGIN_REGION_FIELD_NUMBER: _ClassVar[int]
    method: str
    path: str
    query: str
    headers: _containers.RepeatedCompositeFieldContainer[Header]
    body: bytes
    origin_region: str
    def __init__(self, method: _Optional[str] = ..., path: _Optional[str] = ..., query: _Optional[str] = ..., headers: _Optional[_Iterable[_Union[Header, _Mapping]]] = ..., body: _Optional[bytes] = ..., origin_region: _Optional[str] = ...) -> None: ...

class ForwardResponse(_message.Message):
    __slots__ = ("status", "headers", "body", "served_by")
    STATUS_FIELD_NUMBER: _ClassVar[int]
    HEADERS_FIELD_NUMBER: _ClassVar[int]
    BODY_FIELD_NUMBER: _ClassVar[int]
    SERVED_BY_FIELD_NUMBER: _ClassVar[int]
    status: int
    headers: _containers.RepeatedCompositeFieldContainer[Header]
    body: bytes
    served_by: str
    def __init__(self, status: _Optional[int] = ..., headers: _Optional[_Iterable[_Union[Header, _Mapping]]] = ..., body: _Optional[bytes] = ..., served_by: _Optional[str] = ...) -> None: ...

class TransferMessage(_message.Message):
    __slots__ = ("id", "payment_id", "payer_id", "payee_id", "from_home", "to_home", "amount", "currency")
    ID_FIELD_NUMBER: _ClassVar[int]
    PAYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    PAYER_ID_FIELD_NUMBER: _ClassVar[int]
    PAYEE_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_HOME_FIELD_NUMBER: _ClassVar[int]
    TO_HOME_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    id: str
    payment_id: str
    payer_id: str
    payee_id: str
    from_home: str
    to_home: str
    amount: int
    currency: str
    def __init__(self, id: _Optional[str] = ..., payment_id: _Optional[str] = ..., payer_id: _Optional[str] = ..., payee_id: _Optional[str] = ..., from_home: _Optional[str] = ..., to_home: _Optional[str] = ..., amount: _Optional[int] = ..., currency: _Optional[str] = ...) -> None: ...

class TransferResult(_message.Message):
    __slots__ = ("transfer_id", "outcome", "reason")
    TRANSFER_ID_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    transfer_id: str
    outcome: str
    reason: str
    def __init__(self, transfer_id: _Optional[str] = ..., outcome: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class RefundMessage(_message.Message):
    __slots__ = ("id", "payment_id", "from_home", "to_home", "amount", "currency")
    ID_FIELD_NUMBER: _ClassVar[int]
    PAYMENT_ID_FIELD_NUMBER: _ClassVar[int]
    FROM_HOME_FIELD_NUMBER: _ClassVar[int]
    TO_HOME_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    CURRENCY_FIELD_NUMBER: _ClassVar[int]
    id: str
    payment_id: str
    from_home: str
    to_home: str
    amount: int
    currency: str
    def __init__(self, id: _Optional[str] = ..., payment_id: _Optional[str] = ..., from_home: _Optional[str] = ..., to_home: _Optional[str] = ..., amount: _Optional[int] = ..., currency: _Optional[str] = ...) -> None: ...

class RefundResult(_message.Message):
    __slots__ = ("refund_id", "outcome", "reason", "payer_id")
    REFUND_ID_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    PAYER_ID_FIELD_NUMBER: _ClassVar[int]
    refund_id: str
    outcome: str
    reason: str
    payer_id: str
    def __init__(self, refund_id: _Optional[str] = ..., outcome: _Optional[str] = ..., reason: _Optional[str] = ..., payer_id: _Optional[str] = ...) -> None: ...

class OwnershipRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class OwnershipEntry(_message.Message):
    __slots__ = ("home_region", "serving_region", "epoch")
    HOME_REGION_FIELD_NUMBER: _ClassVar[int]
    SERVING_REGION_FIELD_NUMBER: _ClassVar[int]
    EPOCH_FIELD_NUMBER: _ClassVar[int]
    home_region: str
    serving_region: str
    epoch: int
    def __init__(self, home_region: _Optional[str] = ..., serving_region: _Optional[str] = ..., epoch: _Optional[int] = ...) -> None: ...

class OwnershipReply(_message.Message):
    __slots__ = ("region", "entries")
    REGION_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    region: str
    entries: _containers.RepeatedCompositeFieldContainer[OwnershipEntry]
    def __init__(self, region: _Optional[str] = ..., entries: _Optional[_Iterable[_Union[OwnershipEntry, _Mapping]]] = ...) -> None: ...

class StockGrantRequest(_message.Message):
    __slots__ = ("grant_id", "sku", "to_region", "wanted", "fence")
    GRANT_ID_FIELD_NUMBER: _ClassVar[int]
    SKU_FIELD_NUMBER: _ClassVar[int]
    TO_REGION_FIELD_NUMBER: _ClassVar[int]
    WANTED_FIELD_NUMBER: _ClassVar[int]
    FENCE_FIELD_NUMBER: _ClassVar[int]
    grant_id: str
    sku: str
    to_region: str
    wanted: int
    fence: int
    def __init__(self, grant_id: _Optional[str] = ..., sku: _Optional[str] = ..., to_region: _Optional[str] = ..., wanted: _Optional[int] = ..., fence: _Optional[int] = ...) -> None: ...

class StockGrantReply(_message.Message):
    __slots__ = ("grant_id", "sku", "from_region", "to_region", "units", "fence")
    GRANT_ID_FIELD_NUMBER: _ClassVar[int]
    SKU_FIELD_NUMBER: _ClassVar[int]
    FROM_REGION_FIELD_NUMBER: _ClassVar[int]
    TO_REGION_FIELD_NUMBER: _ClassVar[int]
    UNITS_FIELD_NUMBER: _ClassVar[int]
    FENCE_FIELD_NUMBER: _ClassVar[int]
    grant_id: str
    sku: str
    from_region: str
    to_region: str
    units: int
    fence: int
    def __init__(self, grant_id: _Optional[str] = ..., sku: _Optional[str] = ..., from_region: _Optional[str] = ..., to_region: _Optional[str] = ..., units: _Optional[int] = ..., fence: _Optional[int] = ...) -> None: ...
