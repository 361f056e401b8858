"""Superseded tables: a stage's folder holds exactly its current shards, so a glob of it reads each row once.

A changed setting gives a stage's jobs new keys and new tables; the tables of the old keys are moved, with their
markers, from `{campaign}/iter-{t}/{stage}/` to `{campaign}/_superseded/iter-{t}/{stage}/` once the stage's manifest
names its current shards — a glob of the stage (`…/iter-1/judgments/*.parquet`) no longer finds them. They stay there,
still a finished job's result: a setting changed back finds its old job there and moves it back instead of computing
it again. `metareward gc` removes them, with the model and checkpoint folders of superseded training jobs.
"""

from __future__ import annotations

import dataclasses
import posixpath
from dataclasses import dataclass

from metareward.artifacts.store import ArtifactStore, TableRef

SUPERSEDED_FOLDER = "_superseded"
"""The folder under a campaign where its superseded tables and markers wait for `metareward gc` (a campaign's
stages are under `iter-{t}/`, so no glob of a stage reaches it)."""
_JOB_FILES = (".parquet", ".json")


def superseded_key(key: str) -> str:
    """Where the job files of `key` ({campaign}/iter-{t}/{stage}/{name}) go once superseded."""
    campaign, rest = key.split("/", 1)
    return f"{campaign}/{SUPERSEDED_FOLDER}/{rest}"


def supersede(store: ArtifactStore, campaign: str, iteration: int, stage_name: str, current: set[str]) -> list[str]:
    """Move every job file of the stage's folder that is not one of its `current` job names ("shard-0003-ab12…") —
    tables and markers of other keys, a table whose marker is gone — under the campaign's superseded folder, the
    marker first (a job is finished only while both are in place). Model and checkpoint folders stay where they are
    (MLflow's model versions point at them) until `metareward gc`. Returns the keys it moved."""
    folder = f"{campaign}/iter-{iteration}/{stage_name}"
    moved = []
    for key in sorted(_job_files(store, folder), key=lambda key: not key.endswith(".json")):
        name = posixpath.basename(key).rsplit(".", 1)[0]
        if name not in current:
            store.move(key, superseded_key(key))
            moved.append(key)
    return moved


def restore(store: ArtifactStore, key: str) -> bool:
    """Move a superseded job (table, then marker) back to `key` when its superseded copy is whole (its table is what
    its marker recorded); the marker is rewritten with the moved object's ETag (a copy on S3 may get another). Returns
    whether the job is back."""
    away = superseded_key(key)
    if not store.exists(away + ".json"):
        return False
    try:
        marker = store.read_json(away + ".json")
        recorded = TableRef.from_dict(marker["table"])
    except (ValueError, KeyError, TypeError):
        return False
    if store.exists(away + ".parquet"):
        if store.mismatch(dataclasses.replace(recorded, uri=store.uri(away + ".parquet"))):
            return False
        store.move(away + ".parquet", key + ".parquet")
    elif not store.exists(key + ".parquet"):
        return False
    if store.protocol == "s3":
        marker["table"]["etag"] = store.fs.info(store.uri(key + ".parquet")).get("ETag")
    marker["table"]["uri"] = store.uri(key + ".parquet")
    store.write_json(key + ".json", marker)
    store.delete(away + ".json")
    return True


@dataclass(frozen=True)
class Garbage:
    """What `metareward gc` removes from a campaign: its superseded folder's files, and the model and checkpoint
    folders of superseded training jobs (their marker is in the superseded folder: the folders of a training still
    running, or killed before it finished, have no marker anywhere and stay); with their total size in bytes."""

    keys: list[str]
    folders: list[str]
    size: int


def garbage(store: ArtifactStore, campaign: str) -> Garbage:
    """The campaign's superseded files and orphaned job folders (see Garbage), found without removing anything."""
    keys = store.list(f"{campaign}/{SUPERSEDED_FOLDER}")
    size = sum(int(store.fs.info(store.uri(key))["size"]) for key in keys)
    folders = []
    for key in store.list(campaign):
        parts = key.split("/")
        # {campaign}/iter-{t}/{stage}/{job name}/(model|checkpoints)/…: a job folder.
        if len(parts) > 5 and parts[1].startswith("iter-") and parts[4] in ("model", "checkpoints"):
            job = "/".join(parts[:4])
            if job not in folders and store.exists(superseded_key(job) + ".json"):
                folders.append(job)
    for folder in folders:
        size += sum(int(store.fs.info(store.uri(key))["size"]) for key in store.list(folder))
    return Garbage(keys, folders, size)


def collect_garbage(store: ArtifactStore, campaign: str) -> Garbage:
    """Remove what `garbage` finds and return it."""
    found = garbage(store, campaign)
    store.delete_prefix(f"{campaign}/{SUPERSEDED_FOLDER}")
    for folder in found.folders:
        store.delete_prefix(folder)
    return found


def _job_files(store: ArtifactStore, folder: str) -> list[str]:
    """The job tables and markers directly in a stage folder (not its manifest, not inside job folders)."""
    depth = folder.count("/") + 1
    return [key for key in store.list(folder) if key.count("/") == depth and key.endswith(_JOB_FILES)
            and posixpath.basename(key) != "manifest.json"]
