"""Test-only faults, in place when the step that must meet them runs (never a timer): a job's first attempt fails,
every attempt fails while a file exists, or a job — or one step of a training — holds until a file exists so that
a test can kill the process or remove the node under it. Never set in production."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from metareward.host.stopping import raise_if_stopped, wait_unless_stopped

FAULT_ENVIRONMENT = "METAREWARD_INJECT_FAULT"
""""STAGE:SHARD" (e.g. "judgments:shard-0001") makes that job's first attempt in this process fail, to exercise
retries; "STAGE:SHARD:while=PATH" makes every attempt fail while the file PATH exists, to exercise a job that fails
past its retries and a retry of the whole run; "STAGE:SHARD:hold=PATH" holds the job's first attempt (anywhere: the
file PATH.started records that it began, on which Ray node and in which process) until the file PATH exists.
A training stage also takes "STAGE:all:step=N[:rank=R]:hold=PATH": rank R (default 0) holds once its optimizer
step N is done (after the checkpoint of an earlier step is complete, when save_steps divides it)."""
_faults_raised: set[str] = set()


class InjectedFault(RuntimeError):
    """The failure METAREWARD_INJECT_FAULT asked for."""


def _fault(target: str) -> dict[str, str] | None:
    """The options of the fault set for `target` ("STAGE:SHARD"), or None when none is: KEY=VALUE parts after the
    target, where a `hold=` or `while=` path is the rest of the setting (colons included)."""
    setting = os.environ.get(FAULT_ENVIRONMENT, "")
    head, found, path = setting, "", ""
    for option in (":hold=", ":while="):
        if option in setting:
            head, _, path = setting.partition(option)
            found = option.strip(":=")
            break
    parts = head.split(":")
    if ":".join(parts[:2]) != target or any("=" not in part for part in parts[2:]):
        return None
    options = dict(part.split("=", 1) for part in parts[2:])
    if found:
        options[found] = path
    return options


def inject_job_fault(stage: str, shard: str, run_name: str) -> None:
    """Meet the fault set for this job as it starts, if any (see FAULT_ENVIRONMENT)."""
    target = f"{stage}:{shard}"
    options = _fault(target)
    if options is None or "step" in options:
        return
    if "hold" in options:
        hold(Path(options["hold"]))
    elif "while" in options:
        if os.path.exists(options["while"]):
            raise InjectedFault(f"{FAULT_ENVIRONMENT}: {run_name} fails on purpose while {options['while']} exists")
    elif target not in _faults_raised:
        _faults_raised.add(target)
        raise InjectedFault(f"{FAULT_ENVIRONMENT}: the first attempt of {run_name} fails on purpose")


def training_step_hold(stage: str) -> tuple[int, int, Path] | None:
    """(step, rank, release file) of a hold set for a training stage's step, or None."""
    options = _fault(f"{stage}:all")
    if options is None or "step" not in options or "hold" not in options:
        return None
    return int(options["step"]), int(options.get("rank", 0)), Path(options["hold"])


def hold(release: Path, timeout_s: float = 600.0) -> None:
    """Hold here the first time (PATH.started is written with the Ray node and pid) until `release` exists; a stop
    requested meanwhile (metareward.host.stopping) raises RunStopped."""
    started = release.with_name(release.name + ".started")
    if started.exists():  # only the first attempt is held
        return
    ray = sys.modules.get("ray")
    node = ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else "local"
    started.write_text(json.dumps({"node_id": node, "pid": os.getpid()}))
    deadline = time.monotonic() + timeout_s
    while not release.exists() and time.monotonic() < deadline:
        if wait_unless_stopped(0.1):
            raise_if_stopped(f"the hold at {release}")
