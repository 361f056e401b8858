"""The OpenAI-compatible backend's spread of requests over servers, without a server."""

import threading
import time

from metareward.inference.openai_backend import OpenAIBackend


def test_each_server_gets_a_contiguous_block_and_every_server_is_busy_from_the_start():
    backend = OpenAIBackend(["http://a", "http://b", "http://c"], "m", max_concurrency=3)
    started, lock = [], threading.Lock()

    def call(request, server):
        with lock:
            started.append((request, server))
        time.sleep(0.02)
        return request * 10

    try:
        assert backend._map(call, list(range(9))) == [index * 10 for index in range(9)]
    finally:
        backend.close()
    assert dict(started) == {0: "http://a", 1: "http://a", 2: "http://a", 3: "http://b", 4: "http://b",
                             5: "http://b", 6: "http://c", 7: "http://c", 8: "http://c"}
    assert {server for _, server in started[:3]} == {"http://a", "http://b", "http://c"}
