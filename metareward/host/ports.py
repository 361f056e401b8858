"""Free local ports, for the servers a job starts (a vLLM server, accelerate's main process)."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (the OS picks it; another process may take it before the
    caller binds it, which the callers' retries absorb)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
