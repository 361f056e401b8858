"""Which failures a retry can heal: network and server trouble yes, bad input and missing files no."""

import errno

import httpx
import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from metareward.inference.base import BackendUnavailableError, RequestRejectedError
from metareward.pipeline.faults import transient


def chained(outer: BaseException, inner: BaseException) -> BaseException:
    try:
        try:
            raise inner
        except BaseException as error:
            raise outer from error
    except BaseException as error:
        return error


@pytest.mark.parametrize("error", [
    ConnectionRefusedError("refused"),
    TimeoutError("timed out"),
    OSError(errno.ECONNRESET, "reset"),
    httpx.ConnectError("down"),
    httpx.HTTPStatusError("503", request=httpx.Request("GET", "http://x"), response=httpx.Response(503)),
    httpx.HTTPStatusError("429", request=httpx.Request("GET", "http://x"), response=httpx.Response(429)),
    EndpointConnectionError(endpoint_url="http://127.0.0.1:9"),
    ClientError({"Error": {"Code": "SlowDown"}, "ResponseMetadata": {"HTTPStatusCode": 503}}, "PutObject"),
    BackendUnavailableError("vLLM server on GPU 0 died"),
    chained(RuntimeError("stage failed"), ConnectionResetError("reset")),
])
def test_network_and_server_trouble_is_retried(error):
    assert transient(error)


@pytest.mark.parametrize("error", [
    FileNotFoundError(errno.ENOENT, "no such file", "/models/x/config.json"),
    ValueError("bad setting"),
    KeyError("column"),
    PermissionError(errno.EACCES, "denied"),
    RequestRejectedError("400: prompt too long"),
    httpx.HTTPStatusError("404", request=httpx.Request("GET", "http://x"), response=httpx.Response(404)),
    ClientError({"Error": {"Code": "NoSuchBucket"}, "ResponseMetadata": {"HTTPStatusCode": 404}}, "PutObject"),
    chained(RuntimeError("stage failed"), OSError(errno.ENOSPC, "disk full")),
])
def test_errors_that_fail_the_same_way_every_time_are_not(error):
    assert not transient(error)
