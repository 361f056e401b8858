"""Stage manifests: one JSON per stage and iteration listing its shards, their digests and keys, and the stage's
combined statistics — what `metareward show`, MLflow tracking and the summary read, without Prefect or a model."""

from __future__ import annotations

import posixpath

import polars as pl

from metareward.artifacts.stats import combine
from metareward.artifacts.store import ArtifactStore, StoreError, TableRef, open_store
from metareward.paper.prompts import JUDGE_TEMPLATE_HASH, META_JUDGE_TEMPLATE_HASH
from metareward.pipeline.jobs import Job, JobResult
from metareward.pipeline.stages import STAGE
from metareward.pipeline.superseded import supersede


def manifest_key(campaign: str, iteration: int, stage_name: str) -> str:
    """Where a stage's manifest lies: beside its shards."""
    return f"{campaign}/iter-{iteration}/{stage_name}/manifest.json"


def lists(store: ArtifactStore, campaign: str, job: Job) -> bool:
    """Whether the stage's manifest lists this job as its shard (False when it is missing, damaged, or lists the
    job of other settings)."""
    try:
        manifest = store.read_json(manifest_key(campaign, job.iteration, job.stage))
        return manifest["shards"][job.shard]["cache_key"] == job.cache_key
    except (FileNotFoundError, ValueError, KeyError, TypeError):
        return False


def write_manifest(store: ArtifactStore, campaign: str, jobs: list[Job], results: list[JobResult]) -> list[str]:
    """The stage's manifest.json: rows, digests and cache keys per shard, the combined statistics, the code
    fingerprint and settings digest of the stage, and the template hashes. Then the stage's folder is left with its
    current shards alone: the tables of other keys are moved away (superseded.supersede), and their keys returned."""
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
    return supersede(store, campaign, first.iteration, first.stage, {posixpath.basename(job.key) for job in jobs})


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


def current_tables(store: ArtifactStore, campaign: str, iteration: int | None = None,
                   stage_name: str | None = None) -> list[tuple[int, str, TableRef]]:
    """(iteration, stage, table) of every current shard table of a campaign — the tables its stage manifests list —
    in iteration, registry and shard order; only those of `iteration` and `stage_name` when given. Raises StoreError
    when the campaign has no such stage."""
    found = [(t, name, TableRef.from_dict(shard))
             for t, stages in stage_manifests(store, campaign).items() if iteration is None or t == iteration
             for name, manifest in stages.items() if stage_name is None or name == stage_name
             for _, shard in sorted(manifest["shards"].items())]
    if not found:
        wanted = " ".join(filter(None, [stage_name, iteration is not None and f"iteration {iteration}"]))
        raise StoreError(f"no {wanted or 'stage'} of campaign {campaign!r} under {store.root} (no stage manifest "
                         "found): check the campaign's name and artifact root")
    return found


def read_stage(artifact_root: str, campaign: str, stage_name: str, iteration: int | None = None,
               columns: list[str] | None = None) -> pl.DataFrame:
    """A stage's current rows (every iteration's, or one's), each shard checked against its digest — the one line
    that reads a campaign's table right, e.g. `read_stage("s3://bucket/runs", "demo", "judgments", iteration=1)`;
    a glob of the stage's folder reads the same rows (superseded tables are moved out of it). Credentials and the
    S3 endpoint come from the environment (AWS_*), as for the pipeline."""
    store = open_store(artifact_root)
    return store.read_tables([table for _, _, table in current_tables(store, campaign, iteration, stage_name)],
                             columns)
