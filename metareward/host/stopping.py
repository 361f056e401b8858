"""A process-wide request to stop: set when the run is cancelled or terminated, read by the work that runs on in
threads (jobs, holds, training steps), so that the process ends in seconds instead of finishing its stage."""

from __future__ import annotations

import threading

_stop = threading.Event()
_reason: list[str] = []


class RunStopped(RuntimeError):
    """The run was cancelled or terminated (SIGTERM) while this work ran; what was finished stays finished."""


def request_stop(reason: str) -> None:
    """Ask every job, hold and training step of this process to stop at its next check, for `reason`."""
    if not _stop.is_set():
        _reason.append(reason)
        _stop.set()


def stop_requested() -> str | None:
    """Why this process was asked to stop, or None while it was not."""
    return _reason[0] if _stop.is_set() else None


def raise_if_stopped(what: str) -> None:
    """Raise RunStopped naming `what` when this process was asked to stop."""
    if _stop.is_set():
        raise RunStopped(f"{what} stopped: {_reason[0]}; finished shards and checkpoints are kept, a re-run resumes")


def wait_unless_stopped(seconds: float) -> bool:
    """Sleep up to `seconds`; True when a stop was requested meanwhile (it ends the sleep at once)."""
    return _stop.wait(seconds)
