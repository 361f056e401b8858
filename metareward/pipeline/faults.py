"""Which failures a retry can heal — an endpoint that is down for a while, a server error, a timeout, an engine
that died — and which it cannot: bad input, a missing file, a wrong setting, a corrupt artifact."""

from __future__ import annotations

import errno

from metareward.host.stopping import stop_requested

_TRANSIENT_ERRNOS = {errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.ETIMEDOUT, errno.EHOSTUNREACH,
                     errno.ENETUNREACH, errno.ENETDOWN, errno.EPIPE}
_TRANSIENT_NAMES = {
    # botocore and aiohttp (under s3fs), named so that neither must be importable here.
    "EndpointConnectionError", "ConnectionClosedError", "ReadTimeoutError", "ConnectTimeoutError",
    "ClientConnectionError", "ClientConnectorError", "ServerDisconnectedError", "ServerTimeoutError",
    "ClientOSError", "ClientPayloadError",
    # httpx's transport errors (connect, read, write, pool, protocol).
    "TransportError",
    # metareward: an engine or server that died or cannot be reached, and the test-only injected fault.
    "BackendUnavailableError", "InjectedFault",
}
_THROTTLING = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "ServiceUnavailable",
               "InternalError", "RequestLimitExceeded"}


def transient(error: BaseException) -> bool:
    """Whether `error`, or any error it was raised from, is one a later attempt can get past: a connection
    refused or reset, a timeout, an HTTP 429 or 5xx, S3 throttling, an inference engine that died. Everything
    else — a missing file, a bad config or input, a corrupt artifact, CUDA out of memory — fails the same way
    every time and is not retried. Nothing is, once the run was asked to stop (cancelled, terminated)."""
    if stop_requested():
        return False
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if _transient_itself(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def _transient_itself(error: BaseException) -> bool:
    if isinstance(error, (TimeoutError, ConnectionError)):
        return True
    if isinstance(error, OSError) and error.errno in _TRANSIENT_ERRNOS:
        return True
    if any(kind.__name__ in _TRANSIENT_NAMES for kind in type(error).__mro__):
        return True
    response = getattr(error, "response", None)
    status = getattr(response, "status_code", None)
    if isinstance(status, int) and (status == 429 or status >= 500):
        return True
    if isinstance(response, dict):  # botocore's ClientError
        code = str(response.get("Error", {}).get("Code", ""))
        http = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return code in _THROTTLING or http == 429 or http >= 500
    return False
