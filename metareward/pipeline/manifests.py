"""Stage manifests: one JSON per stage and iteration listing its shards, their digests and keys, and the stage's
combined statistics — what `metareward show`, MLflow tracking and the summary read, without Prefect or a model."""

from __future__ import annotations

import polars as pl

from metareward.artifacts.stats import combine
from metareward.artifacts.store import ArtifactStore, StoreError, TableRef
from metareward.paper.prompts import JUDGE_TEMPLATE_HASH, META_JUDGE_TEMPLATE_HASH
from metareward.pipeline.jobs import Job, JobResult
from metareward.pipeline.stages import STAGE


def manifest_key(campaign: str, iteration: int, stage_name: str) -> str:
    """Where a stage's manifest lies: beside its shards."""
    return f"{campaign}/iter-{iteration}/{stage_name}/manifest.json"


def write_manifest(store: ArtifactStore, campaign: str, jobs: list[Job], results: list[JobResult]) -> dict:
    """The stage's manifest.json: rows, digests and cache keys per shard, the combined statistics, the code
    fingerprint and settings digest of the stage, and the template hashes. Returns the combined statistics."""
    first = jobs[0]
    combined = combine(first.stage, [result.stats for result in results])
    store.write_json(manifest_key(campaign, first.iteration, first.stage), {
        "stage": first.stage,
        "iteration": first.iteration,
        "model_id": first.model_id,
        "rows": sum(result.table.rows for result in results),
        "shards": {job.shard: {**result.table.as_dict(), "cache_key": job.cache_key, "cached": result.cached,
                               **({"recomputed": result.recomputed} if result.recomputed else {})}
                   for job, result in zip(jobs, results, strict=True)},
        "stats": combined,
        "code": first.code,
        "settings_digest": first.settings_digest,
        "templates": {"judge": JUDGE_TEMPLATE_HASH, "meta_judge": META_JUDGE_TEMPLATE_HASH},
    })
    return combined


def stage_manifests(store: ArtifactStore, campaign: str) -> dict[int, dict[str, dict]]:
    """Every stage manifest of a campaign in the store, by iteration and then stage (in the registry's
    order), each with its `key` added."""
    found: dict[int, dict[str, dict]] = {}
    for key in store.list(campaign):
        parts = key.split("/")
        if len(parts) != 4 or parts[3] != "manifest.json" or not parts[1].startswith("iter-"):
            continue
        try:
            manifest = store.read_json(key)
            found.setdefault(manifest["iteration"], {})[manifest["stage"]] = {**manifest, "key": key}
        except (ValueError, KeyError, TypeError) as error:
            raise StoreError(f"stage manifest {store.uri(key)} is damaged ({type(error).__name__}: {error}): delete it "
                             "and run the campaign again to rewrite it from the finished shards") from None
    return {
        iteration: {name: stages[name] for name in STAGE if name in stages}
        for iteration, stages in sorted(found.items())
    }


def read_stage_table(store: ArtifactStore, manifest: dict, columns: list[str] | None = None) -> pl.DataFrame:
    """A stage's whole table (only `columns`, when given): its shards, as its manifest lists them,
    concatenated in shard order."""
    return store.read_tables([TableRef.from_dict(shard) for _, shard in sorted(manifest["shards"].items())], columns)
