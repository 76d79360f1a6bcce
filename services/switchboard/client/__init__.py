"""A typed async client for application developers: ``switchboard.client``.

It speaks only the public contracts (the generated stubs in ``switchboard.api``),
so it works against any Switchboard deployment: one process, or the mesh
behind Envoy. See docs/python-client.md.

    from switchboard.client import Client

    async with Client("127.0.0.1:50051") as client:
        await client.sign_in("ada@example.com", "a long passphrase 42")
        answer = await client.ask(conversation, "hello")
        async for event in client.follow([conversation]):
            ...
"""

from switchboard.client.backoff import Backoff
from switchboard.client.client import Client, channel_options, new_request_id
from switchboard.client.errors import (
    Aborted,
    AlreadyExists,
    ApprovalExpired,
    Cancelled,
    ChecksumMismatch,
    CircuitOpen,
    ContentBlocked,
    ConversationBusy,
    CursorAhead,
    CursorExpired,
    DataLoss,
    DeadlineExceeded,
    DependencyUnavailable,
    DestinationBlocked,
    EtagMismatch,
    FailedPrecondition,
    FieldViolation,
    HandlerFailed,
    Internal,
    InvalidArgument,
    MediaTypeMismatch,
    ModalityUnsupported,
    NotFound,
    OutOfRange,
    PermissionDenied,
    QueueFull,
    QuotaExceeded,
    QuotaViolation,
    RateLimited,
    RequestTooLarge,
    ResourceExhausted,
    ResultTooLarge,
    RunCancelled,
    RunFailed,
    RunInterrupted,
    RunSuperseded,
    SessionRevoked,
    SignedOut,
    SubscriberTooSlow,
    SwitchboardError,
    TokenExpired,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    Unknown,
    UploadExpired,
    UploadOffsetMismatch,
    from_rpc_error,
    from_status,
)
from switchboard.client.events import Follower, scope
from switchboard.client.files import CHUNK_BYTES, TransferPolicy
from switchboard.client.interceptors import RetryPolicy
from switchboard.client.runs import Answer, RunWatch
from switchboard.client.session import TokenKeeper
from switchboard.client.streams import StreamPolicy

__all__ = [
    "CHUNK_BYTES",
    "Aborted",
    "AlreadyExists",
    "Answer",
    "ApprovalExpired",
    "Backoff",
    "Cancelled",
    "ChecksumMismatch",
    "CircuitOpen",
    "Client",
    "ContentBlocked",
    "ConversationBusy",
    "CursorAhead",
    "CursorExpired",
    "DataLoss",
    "DeadlineExceeded",
    "DependencyUnavailable",
    "DestinationBlocked",
    "EtagMismatch",
    "FailedPrecondition",
    "FieldViolation",
    "Follower",
    "HandlerFailed",
    "Internal",
    "InvalidArgument",
    "MediaTypeMismatch",
    "ModalityUnsupported",
    "NotFound",
    "OutOfRange",
    "PermissionDenied",
    "QueueFull",
    "QuotaExceeded",
    "QuotaViolation",
    "RateLimited",
    "RequestTooLarge",
    "ResourceExhausted",
    "ResultTooLarge",
    "RetryPolicy",
    "RunCancelled",
    "RunFailed",
    "RunInterrupted",
    "RunSuperseded",
    "RunWatch",
    "SessionRevoked",
    "SignedOut",
    "StreamPolicy",
    "SubscriberTooSlow",
    "SwitchboardError",
    "TokenExpired",
    "TokenKeeper",
    "TransferPolicy",
    "Unauthenticated",
    "Unavailable",
    "Unimplemented",
    "Unknown",
    "UploadExpired",
    "UploadOffsetMismatch",
    "channel_options",
    "from_rpc_error",
    "from_status",
    "new_request_id",
    "scope",
]
