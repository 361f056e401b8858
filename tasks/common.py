"""What every metareward task shares: the artifact-store cache policy, retries, result storage."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect.cache_policies import CachePolicy
from prefect.context import TaskRunContext
from prefect.tasks import exponential_backoff

from metareward.config import CampaignConfig
from metareward.pipeline import finished
from metareward.store import ArtifactStore, s3_storage_options

RETRIES = 3
RETRY_DELAYS = exponential_backoff(backoff_factor=5)
GPU_TAG = "gpu"
"""Tag of every task that holds a model: a Prefect concurrency limit on it caps them at the GPU count."""


@dataclass
class ArtifactCache(CachePolicy):
    """Cache key = the job's key (input digests, model digest, config slice, template hash, sampling,
    seed, code version), so a finished shard shows as Cached in Prefect and is never recomputed. If the
    job's artifact was deleted while Prefect still holds a result for the key, the key is replaced by a
    one-off key: the task runs again instead of returning a reference to a table that is gone."""

    def compute_key(self, task_ctx: TaskRunContext, inputs: dict[str, Any], flow_parameters: dict[str, Any],
                    **kwargs: Any) -> str | None:
        config: CampaignConfig = inputs["config"]
        job = inputs["job"]
        key = f"{config.name}-{job.stage}-{job.iteration}-{job.shard}-{job.cache_key}"
        artifact_missing = finished(ArtifactStore(config.artifact_root), job) is None
        if artifact_missing and task_ctx.result_store is not None and task_ctx.result_store.exists(key):
            return f"{key}-rerun-{uuid.uuid4().hex}"
        return key


def stage_options(gpu: bool) -> dict[str, Any]:
    """Decorator options of a stage task: readable run name, artifact cache, retries with back-off,
    results persisted, and the `gpu` tag for tasks that hold a model."""
    return {
        "task_run_name": "{job.run_name}",
        "cache_policy": ArtifactCache(),
        "retries": RETRIES,
        "retry_delay_seconds": RETRY_DELAYS,
        "retry_condition_fn": _worth_retrying,
        "persist_result": True,
        "tags": [GPU_TAG] if gpu else [],
    }


def _worth_retrying(task, task_run, state) -> bool:
    # Bad input and empty preference sets fail the same way every time; engines and stores may recover.
    try:
        state.result()
    except (ValueError, TypeError, KeyError):
        return False
    except Exception:
        return True
    return True


def result_storage(config: CampaignConfig):
    """Where Prefect persists task results and cache records: beside the artifacts. A local root gives a
    folder; an s3:// root a saved RemoteFileSystem block (endpoint only: credentials stay in the env)."""
    store = ArtifactStore(config.artifact_root)
    if store.protocol == "file":
        return Path(store.root) / config.name / "_prefect-results"
    from prefect.filesystems import RemoteFileSystem

    name = f"metareward-results-{config.name}".lower().replace("_", "-").replace(".", "-")
    RemoteFileSystem(basepath=f"{store.root}/{config.name}/_prefect-results",
                     settings=s3_storage_options()).save(name, overwrite=True)
    return f"remote-file-system/{name}"
