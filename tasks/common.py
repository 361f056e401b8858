"""What every metareward flow and task shares: the deployment's environment applied, retries that skip errors that
cannot heal, the GPU tag, result storage."""

from __future__ import annotations

import logging
import re
from pathlib import Path

from prefect import get_run_logger
from prefect.context import FlowRunContext
from prefect.tasks import exponential_backoff

from metareward.artifacts.store import open_store, s3_storage_options
from metareward.config.campaign import CampaignConfig
from metareward.pipeline.faults import transient

GPU_TAG = "gpu"
"""Tag of every task that holds a model, to find them in the UI. It governs nothing: GPUs are governed by the GPU
pool's jobs (one job holds the GPUs its `gpu_count` asks for), the campaign deployments' concurrency limit and, on
Ray, by placement groups."""


def in_this_environment(config: CampaignConfig) -> CampaignConfig:
    """The config a flow runs: its parameter with the settings this process's environment overrides
    (CampaignConfig.with_environment; a worker's METAREWARD_ARTIFACT_ROOT applies to a run started from the UI as
    to the CLI), each setting and where it came from logged to the run (secrets by variable name only)."""
    config = config.with_environment()
    logger = get_run_logger() if FlowRunContext.get() else logging.getLogger("metareward")
    logger.info("Settings from the environment:\n  %s", "\n  ".join(config.setting_sources()))
    return config


def worth_retrying(task, task_run, state) -> bool:
    """Retry only what can heal (metareward.pipeline.faults.transient): an endpoint down for a while, a server error, a
    timeout, an engine that died — never bad input, a missing file, a wrong setting or a corrupt artifact,
    which would fail the same way after every back-off."""
    try:
        state.result()
    except Exception as error:
        return transient(error)
    return True


RETRIED = {"retries": 3, "retry_delay_seconds": exponential_backoff(backoff_factor=5),
           "retry_condition_fn": worth_retrying}
"""Task options of everything that touches an engine or the store: 3 retries after 5, 10, 20 s, only
for failures that can heal."""


def retried(config: CampaignConfig) -> dict:
    """RETRIED with the config's orchestration.retries and retry_backoff_s (delays b, 2b, 4b, …)."""
    backoff = config.orchestration.retry_backoff_s
    return {**RETRIED, "retries": config.orchestration.retries,
            "retry_delay_seconds": [backoff * 2**attempt for attempt in range(config.orchestration.retries)]}


def result_storage(config: CampaignConfig):
    """Where Prefect persists task results and cache records: beside the artifacts. A local root gives a
    folder; an s3:// root a saved RemoteFileSystem block (endpoint only: credentials stay in the env)."""
    store = open_store(config.artifact_root)
    if store.protocol == "file":
        return Path(store.root) / config.name / "_prefect-results"
    from prefect.filesystems import RemoteFileSystem

    name = f"metareward-results-{config.name}".lower().replace("_", "-").replace(".", "-")
    RemoteFileSystem(basepath=f"{store.root}/{config.name}/_prefect-results",
                     settings=s3_storage_options()).save(name, overwrite=True)
    return f"remote-file-system/{name}"


def artifact_key(campaign: str, name: str) -> str:
    """A Prefect artifact key for the campaign (lowercase letters, digits and dashes only)."""
    return re.sub(r"[^a-z0-9-]", "-", f"{campaign}-{name}".lower())


def iteration_artifact_key(campaign: str, iteration: int) -> str:
    """The key of iteration t's summary artifact (`…-seed-sft` for stage 0)."""
    return artifact_key(campaign, "seed-sft" if iteration == 0 else f"iter-{iteration}")


def progress_artifact_key(campaign: str, iteration: int, stage: str) -> str:
    """The key of the progress artifact a model stage of iteration t keeps up to date while it runs."""
    return artifact_key(campaign, f"iter-{iteration}-{stage}-progress")
