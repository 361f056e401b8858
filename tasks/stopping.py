"""How a flow run stops mid-stage: on Cancelled or Crashed (a worker's cancel, SIGTERM) every thread's work stops and
the engines with it; a run no worker watches (`metareward run` from a shell) is watched for the UI's Cancel here."""

from __future__ import annotations

import threading

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId
from prefect.logging.loggers import flow_run_logger
from prefect.states import Cancelled

from metareward.host.stopping import request_stop, stop_requested
from metareward.inference.engines import close_shared_backends
from metareward.placement.replicas import close_shared_pools

CANCEL_POLL_S = 2.0
"""Seconds between two reads of a watched flow run's state (watch_for_cancel)."""

_cancelled: list[str] = []
"""Ids of the flow runs of this process that the UI cancelled (watch_for_cancel saw them Cancelling)."""


def stop_work(flow, flow_run, state) -> None:
    """Flow hook for Cancelled and Crashed (a cancel from the Prefect UI of a run a worker started, SIGTERM from a
    scheduler: a Kubernetes eviction, a spot notice): the jobs, holds and trainings still running in this process's
    threads stop at their next check, none is retried, and the engines (vLLM servers with their process groups,
    Ray engine replicas) are stopped now, so the process ends in seconds and leaves no server holding a GPU.
    Finished shards and training checkpoints stay in the store; a re-run resumes from them."""
    request_stop(f"flow run {flow_run.name!r} is {state.name}")
    close_shared_backends()
    close_shared_pools()


def watch_for_cancel(flow, flow_run, state) -> None:
    """on_running hook of a flow run that no Prefect worker supervises (`metareward run` starts the campaign flow in
    its own process, and nothing there acts on the UI's Cancel button): a daemon thread reads the run's state every
    CANCEL_POLL_S seconds and, once it is Cancelling, stops the run's work as stop_work does — the run then ends
    within seconds — and records it for mark_cancelled."""
    logger = flow_run_logger(flow_run, flow)

    def watch() -> None:
        with get_client(sync_client=True) as client:
            while not stop_requested():
                current = client.read_flow_run(flow_run.id).state
                if current is None or current.is_final():
                    return
                if current.is_cancelling():
                    logger.warning("flow run %r was cancelled from the Prefect UI: stopping its jobs and engines "
                                   "(finished shards and checkpoints are kept; run it again to resume)", flow_run.name)
                    _cancelled.append(str(flow_run.id))
                    stop_work(flow, flow_run, current)
                    return
                threading.Event().wait(CANCEL_POLL_S)

    threading.Thread(target=watch, name=f"cancel-watch {flow_run.name}", daemon=True).start()


def mark_cancelled() -> bool:
    """Once a watched run has stopped (its work raised RunStopped), set it and its subflow runs that are not yet
    Completed to Cancelled, as a worker would have, and say whether the UI had cancelled a run of this process."""
    if not _cancelled:
        return False
    with get_client(sync_client=True) as client:
        for flow_run_id in _cancelled:
            children = client.read_flow_runs(flow_run_filter=FlowRunFilter(
                parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
            for run_id in [flow_run_id, *(child.id for child in children if not child.state.is_completed())]:
                client.set_flow_run_state(run_id, Cancelled(message="Cancelled from the Prefect UI"), force=True)
    return True
