"""Progress of model requests, for progress bars: a stage announces how many requests it is about to make and the
backend reports each one that finishes, under the label of the job in hand (no Prefect, no terminal)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

RequestListener = Callable[[str, int, int, int], None]
"""listener(label, newly expected requests, newly finished requests, tokens those finished requests generated)."""

_listeners: list[RequestListener] = []
_label: ContextVar[str | None] = ContextVar("metareward_progress_label", default=None)


def add_request_listener(listener: RequestListener) -> None:
    """Call listener(label, expected, finished, tokens) as requests are announced and finish in this process."""
    _listeners.append(listener)


def remove_request_listener(listener: RequestListener) -> None:
    """Stop calling a listener added with add_request_listener."""
    _listeners.remove(listener)


def stage_label(stage: str, iteration: int) -> str:
    """The label the requests of a stage's jobs are counted under: 'iter-2 judgments'."""
    return f"iter-{iteration} {stage}"


@contextmanager
def labelled(label: str) -> Iterator[None]:
    """Count the requests made inside the block under `label` (e.g. "iter-1 judgments")."""
    token = _label.set(label)
    try:
        yield
    finally:
        _label.reset(token)


def expect(count: int) -> None:
    """`count` more requests are about to be made."""
    _notify(count, 0)


def finished(count: int = 1, tokens: int = 0) -> None:
    """`count` requests have finished, having generated `tokens` completion tokens (call from the thread that made
    the request batch)."""
    _notify(0, count, tokens)


def generated_tokens(results) -> int:
    """The completion tokens of GenerationResults (what finished() counts for a batch of generations)."""
    return sum(completion.n_tokens for result in results for completion in result.completions)


def _notify(expected: int, done: int, tokens: int = 0) -> None:
    label = _label.get()
    if label is None or not (expected or done):
        return
    for listener in list(_listeners):
        listener(label, expected, done, tokens)
