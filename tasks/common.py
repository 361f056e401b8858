"""What every metareward task shares: retries that skip errors that cannot heal, the GPU tag, result storage."""

from __future__ import annotations

from pathlib import Path

from prefect.tasks import exponential_backoff

from metareward.config import CampaignConfig
from metareward.store import open_store, s3_storage_options

RETRIES = 3
RETRY_DELAYS = exponential_backoff(backoff_factor=5)
GPU_TAG = "gpu"
"""Tag of every task that holds a model: a Prefect concurrency limit on it caps them at the GPU count."""


def worth_retrying(task, task_run, state) -> bool:
    """Bad input and empty preference sets fail the same way every time; engines and stores may recover."""
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
    store = open_store(config.artifact_root)
    if store.protocol == "file":
        return Path(store.root) / config.name / "_prefect-results"
    from prefect.filesystems import RemoteFileSystem

    name = f"metareward-results-{config.name}".lower().replace("_", "-").replace(".", "-")
    RemoteFileSystem(basepath=f"{store.root}/{config.name}/_prefect-results",
                     settings=s3_storage_options()).save(name, overwrite=True)
    return f"remote-file-system/{name}"
