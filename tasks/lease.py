"""The campaign lease as a flow holds it: its holder is the Prefect flow run (id and name) in this process, and what
the lease logs goes to that run's log."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from prefect import get_run_logger
from prefect.context import FlowRunContext
from prefect.exceptions import MissingContextError

from metareward.artifacts.store import open_store
from metareward.config.campaign import CampaignConfig
from metareward.pipeline.lease import HeldLease, Holder, ensure_held, hold_campaign


def this_flow_run() -> Holder:
    """This process, running the flow run of the current context (a retry of a flow run keeps its id)."""
    context = FlowRunContext.get()
    flow_run = context.flow_run if context else None
    return Holder.this_process(flow_run.id if flow_run else None, flow_run.name if flow_run else None)


@contextmanager
def campaign_lease(config: CampaignConfig) -> Iterator[HeldLease]:
    """The campaign's lease on its artifact root, held by this flow run for the block (hold_campaign), with
    orchestration.lease_ttl_s and lease_wait_s; a flow run inside one that holds it runs under that lease. Raises
    CampaignHeldError, before the block runs, when another run holds it."""
    orchestration = config.orchestration
    try:
        logger = get_run_logger()
    except MissingContextError:  # a flow's function called outside a flow run
        logger = logging.getLogger(__name__)
    with hold_campaign(open_store(config.artifact_root), config.name, this_flow_run(), orchestration.lease_ttl_s,
                       orchestration.lease_wait_s, logger) as held:
        yield held


def check_lease(config: CampaignConfig) -> None:
    """Raise LeaseLostError when this process's run lost the campaign's lease (another run took it over): called
    as each stage and each job starts, so that a run that lost its lease starts no more work."""
    ensure_held(open_store(config.artifact_root), config.name)
