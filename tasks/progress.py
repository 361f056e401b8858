"""Live progress in the Prefect UI: a model stage's progress artifact (requests done of those announced, shards done,
tok/s, an estimate of the time left) kept up to date while the stage runs."""

from __future__ import annotations

import threading
import time
from types import TracebackType

from prefect.artifacts import create_progress_artifact, update_progress_artifact

from metareward.inference.progress import add_request_listener, remove_request_listener, stage_label
from metareward.pipeline.jobs import Job, JobResult, add_job_listener, remove_job_listener

UPDATE_EVERY_S = 2.0
"""The least time between two updates of a progress artifact by requests (a finished shard always updates it)."""


class StageProgressArtifact:
    """While open (a `with` block around a model stage): the stage's progress artifact, keyed `key`, updated as its
    requests and shards finish — progress = (shards done + the requests done of the shards running / those they
    announced) / shards, never going back — with a description of requests, shards, tok/s and time left; 100 % when
    the block ends without an error."""

    def __init__(self, key: str, stage: str, iteration: int, shards: int):
        self.label = stage_label(stage, iteration)
        self.title = f"{stage} iter-{iteration}"
        self.shards = shards
        self.key = key
        self.done_shards = 0
        self.expected = self.finished = self.tokens = 0
        self.expected_at_shard = self.finished_at_shard = 0
        self.progress = 0.0
        self.started = time.monotonic()
        self.updated = 0.0
        self.artifact_id = None
        self._lock = threading.Lock()

    def __enter__(self) -> StageProgressArtifact:
        self.artifact_id = create_progress_artifact(0.0, key=self.key, description=self._description())
        add_request_listener(self.requests)
        add_job_listener(self.job_finished)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        remove_request_listener(self.requests)
        remove_job_listener(self.job_finished)
        if kind is None:
            with self._lock:
                self.done_shards = self.shards
                self._update(force=True)

    def requests(self, label: str, expected: int, done: int, tokens: int) -> None:
        """Count the stage's requests as they are announced and finish (a request listener)."""
        if label != self.label:
            return
        with self._lock:
            self.expected += expected
            self.finished += done
            self.tokens += tokens
            self._update()

    def job_finished(self, job: Job, result: JobResult) -> None:
        """Count one of the stage's shards as done (a job listener)."""
        if stage_label(job.stage, job.iteration) != self.label:
            return
        with self._lock:
            self.done_shards = min(self.done_shards + 1, self.shards)
            self.expected_at_shard, self.finished_at_shard = self.expected, self.finished
            self._update(force=True)

    def _update(self, force: bool = False) -> None:
        running = self.expected - self.expected_at_shard
        share = (self.finished - self.finished_at_shard) / running if running > 0 else 0.0
        self.progress = max(self.progress, min(1.0, (self.done_shards + min(share, 1.0)) / max(self.shards, 1)))
        now = time.monotonic()
        if self.artifact_id is None or not force and now - self.updated < UPDATE_EVERY_S:
            return
        self.updated = now
        update_progress_artifact(self.artifact_id, 100 * self.progress, description=self._description())

    def _description(self) -> str:
        elapsed = time.monotonic() - self.started
        parts = [f"{self.title}: {self.done_shards}/{self.shards} shard(s) done",
                 f"{self.finished:,} of {self.expected:,} requests announced so far"]
        if self.tokens and elapsed > 0:
            parts.append(f"{self.tokens / elapsed:,.1f} tok/s")
        if 0 < self.progress < 1:
            parts.append(f"about {_duration(elapsed * (1 - self.progress) / self.progress)} left")
        return ", ".join(parts)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min" if seconds < 5400 else \
        f"{seconds / 3600:.1f} h"

