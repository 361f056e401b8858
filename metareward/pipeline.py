"""An iteration as cacheable jobs over the artifact store: keys, artifact paths, and running one job (no Prefect)."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

import metareward
from metareward.config import CampaignConfig, IterationConfig
from metareward.models import MODEL_DIGEST_FILE
from metareward.prompts import JUDGE_TEMPLATE_HASH, META_JUDGE_TEMPLATE_HASH
from metareward.stats import StageStats
from metareward.store import ArtifactStore, TableRef
from metareward.tables import load_prompts

MODEL_STAGES = ("responses", "judgments", "meta_judgments", "checkpoint")
"""Stages whose output depends on the model M_t (its digest is part of their key)."""


@lru_cache(maxsize=1)
def code_version() -> str:
    """The package version plus a digest of metareward's source: any code change recomputes stages, so a
    cached table is never the output of other code."""
    digest = hashlib.blake2b(digest_size=4)
    for source in sorted(Path(metareward.__file__).parent.rglob("*.py")):
        digest.update(source.read_bytes())
    return f"{metareward.__version__}+{digest.hexdigest()}"


def cache_key(parts: dict[str, Any]) -> str:
    """A 12-hex-digit key of everything a job's output depends on (canonical JSON, blake2b)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=6).hexdigest()


@dataclass(frozen=True)
class Job:
    """One unit of cached work: a stage of one iteration, for one shard (or "all").

    `key` is the artifact key without extension: the table is key + ".parquet", its completion marker
    key + ".json" (written last). `inputs` are the URIs of the tables the job reads.
    """

    stage: str
    iteration: int
    shard: str
    cache_key: str
    key: str
    model_path: str
    model_id: str
    inputs: dict[str, list[str]] = field(default_factory=dict)
    shard_count: int = 1

    @property
    def table_key(self) -> str:
        """Where the job's table goes."""
        return self.key + ".parquet"

    @property
    def marker_key(self) -> str:
        """Where the job's completion marker goes (its presence, with the table's, means done)."""
        return self.key + ".json"

    @property
    def model_key(self) -> str:
        """Where a checkpoint job puts its model folder (model_id.txt, written last, marks it complete)."""
        return self.key + "/model"

    @property
    def run_name(self) -> str:
        """A readable name, e.g. 'judgments iter-2 shard-07'."""
        return f"{self.stage} iter-{self.iteration} {self.shard}"


@dataclass
class JobResult:
    """What a finished job produced: its table and its statistics (cached with it)."""

    table: TableRef
    stats: dict[str, Any]
    cached: bool = False


class IterationPlan:
    """The jobs of iteration `iteration` (1-based) of a campaign, served by model M_t at model_path."""

    def __init__(self, config: CampaignConfig, iteration: int, model_path: str, model_id: str):
        self.config = config
        self.iteration = iteration
        self.settings: IterationConfig = config.iterations[iteration - 1]
        self.model_path = model_path
        self.model_id = model_id

    def _job(self, stage: str, shard: str, slice_: dict[str, Any], inputs: dict[str, list[TableRef]],
             shard_count: int = 1) -> Job:
        parts = {
            "stage": stage,
            "slice": slice_,
            "inputs": {name: [ref.digest for ref in refs] for name, refs in inputs.items()},
            "model_id": self.model_id if stage in MODEL_STAGES else None,
            "seed": self.config.seed,
            "code": code_version(),
        }
        key = cache_key(parts)
        return Job(
            stage=stage, iteration=self.iteration, shard=shard, cache_key=key,
            key=f"{self.config.name}/iter-{self.iteration}/{stage}/{shard}-{key}",
            model_path=self.model_path, model_id=self.model_id,
            inputs={name: [ref.uri for ref in refs] for name, refs in inputs.items()},
            shard_count=shard_count,
        )

    def _engine_slice(self) -> dict[str, Any]:
        inference = self.config.inference
        return {
            "backend": inference.backend,
            "verdict_mode": inference.verdict_mode,
            "max_model_len": inference.max_model_len,
            "batch_size": inference.batch_size if inference.backend == "transformers" else None,
            "chat_template": self.config.model.chat_template,
            "dtype": self.config.model.dtype,
        }

    def prompts_job(self, prompt_file_digest: str) -> Job:
        """Select this iteration's prompts from the prompt file."""
        slice_ = {"file": prompt_file_digest, "column": self.config.prompts.column,
                  "num_prompts": self.settings.num_prompts, "iteration": self.iteration}
        return self._job("prompts", "all", slice_, {})

    def responses_job(self, shard: int, prompts: TableRef) -> Job:
        """The actor's K responses for one shard of prompts."""
        slice_ = {"shard": shard, "shard_size": self.config.shard_size, "K": self.settings.num_responses,
                  "sampling": self.settings.actor_sampling.model_dump(), **self._engine_slice()}
        return self._job("responses", _shard(shard), slice_, {"prompts": [prompts]}, len(self.shards(prompts)))

    def judgments_job(self, shard: int, prompts: TableRef, responses: TableRef) -> Job:
        """The judge's N judgments of one shard's responses."""
        slice_ = {"N": self.settings.num_judgments, "sampling": self.settings.judge_sampling.model_dump(),
                  "template": JUDGE_TEMPLATE_HASH, **self._engine_slice()}
        return self._job("judgments", _shard(shard), slice_, {"prompts": [prompts], "responses": [responses]},
                         len(self.shards(prompts)))

    def meta_judgments_job(self, shard: int, prompts: TableRef, responses: TableRef, judgments: TableRef) -> Job:
        """The meta-judge's verdicts on one shard's judged responses."""
        slice_ = {"sampling": self.settings.meta_judge_sampling.model_dump(), "template": META_JUDGE_TEMPLATE_HASH,
                  **self._engine_slice()}
        inputs = {"prompts": [prompts], "responses": [responses], "judgments": [judgments]}
        return self._job("meta_judgments", _shard(shard), slice_, inputs, len(self.shards(prompts)))

    def judgment_elo_job(self, meta_judgments: list[TableRef], judgments: list[TableRef]) -> Job:
        """Elo of the judged responses' judgments over the whole iteration (positional weights need all)."""
        return self._job("judgment_elo", "all", {}, {"meta_judgments": meta_judgments, "judgments": judgments})

    def actor_pairs_job(self, prompts: TableRef, responses: list[TableRef], judgments: list[TableRef]) -> Job:
        """Length-controlled actor pairs of the iteration."""
        slice_ = {"rho": self.settings.rho, "max_chosen_chars": self.settings.max_chosen_response_chars}
        return self._job("actor_pairs", "all", slice_, {"prompts": [prompts], "responses": responses, "judgments": judgments})

    def judge_pairs_job(self, prompts: TableRef, responses: list[TableRef], judgments: list[TableRef],
                        judgment_elo: TableRef) -> Job:
        """Judge pairs of the iteration (highest vs lowest Elo, length filter)."""
        slice_ = {"max_chosen_chars": self.settings.max_chosen_judgment_chars}
        inputs = {"prompts": [prompts], "responses": responses, "judgments": judgments, "judgment_elo": [judgment_elo]}
        return self._job("judge_pairs", "all", slice_, inputs)

    def dpo_dataset_job(self, actor_pairs: TableRef, judge_pairs: TableRef | None) -> Job:
        """The DPO training set: actor pairs, plus judge pairs when this iteration trains the judge."""
        inputs = {"actor_pairs": [actor_pairs]}
        if judge_pairs is not None:
            inputs["judge_pairs"] = [judge_pairs]
        return self._job("dpo_dataset", "all", {"train_judge": bool(self.settings.train_judge)}, inputs)

    def checkpoint_job(self, dpo_dataset: TableRef) -> Job:
        """DPO of M_t into M_{t+1}: the table is TRL's training log, the model a folder beside it."""
        slice_ = {"dpo": self.settings.dpo.model_dump(), "dtype": self.config.model.dtype,
                  "chat_template": self.config.model.chat_template}
        return self._job("checkpoint", "all", slice_, {"dpo_dataset": [dpo_dataset]})

    def shards(self, prompts: TableRef) -> list[int]:
        """Shard indices of the iteration's prompts table."""
        return list(range(-(-prompts.rows // self.config.shard_size)))


def _shard(index: int) -> str:
    return f"shard-{index:04d}"


def finished(store: ArtifactStore, job: Job) -> JobResult | None:
    """The job's result when its marker and its table (and, for a trained checkpoint, its model folder's
    model_id.txt) are in the store; None otherwise: a deleted artifact means the job runs again, never a
    silently missing one."""
    if not (store.exists(job.marker_key) and store.exists(job.table_key)):
        return None
    marker = store.read_json(job.marker_key)
    trained = job.stage == "checkpoint" and not marker["stats"].get("kept_previous_model")
    if trained and not store.exists(f"{job.model_key}/{MODEL_DIGEST_FILE}"):
        return None
    return JobResult(table=TableRef(**marker["table"]), stats=marker["stats"], cached=True)


def complete(store: ArtifactStore, job: Job, table: pl.DataFrame, stats: StageStats) -> JobResult:
    """Write the job's table, then its marker (last): the job counts as done only once both exist."""
    ref = store.write_table(job.table_key, table)
    marker = {"job": asdict(job), "table": ref.as_dict(), "stats": stats.as_dict(), "code_version": code_version(),
              "finished_at": dt.datetime.now(dt.timezone.utc).isoformat()}
    store.write_json(job.marker_key, marker)
    return JobResult(table=ref, stats=stats.as_dict())


def write_manifest(store: ArtifactStore, config: CampaignConfig, jobs: list[Job], results: list[JobResult]) -> dict:
    """The stage's manifest.json beside its shards: rows, digests and cache keys per shard, the combined
    statistics, the template hashes and code version. Returns the combined statistics."""
    from metareward.stats import combine

    stage, iteration = jobs[0].stage, jobs[0].iteration
    combined = combine(stage, [result.stats for result in results])
    store.write_json(f"{config.name}/iter-{iteration}/{stage}/manifest.json", {
        "stage": stage,
        "iteration": iteration,
        "model_id": jobs[0].model_id,
        "rows": sum(result.table.rows for result in results),
        "shards": {job.shard: {**result.table.as_dict(), "cache_key": job.cache_key, "cached": result.cached}
                   for job, result in zip(jobs, results)},
        "stats": combined,
        "templates": {"judge": JUDGE_TEMPLATE_HASH, "meta_judge": META_JUDGE_TEMPLATE_HASH},
        "code_version": code_version(),
    })
    return combined


STAGE_ORDER = ("prompts", "responses", "judgments", "actor_pairs", "meta_judgments", "judgment_elo", "judge_pairs",
               "dpo_dataset", "checkpoint")
"""The stages of an iteration in the order the iteration flow runs them (paper Fig. 1)."""


def stage_manifests(store: ArtifactStore, campaign: str) -> dict[int, dict[str, dict]]:
    """Every stage manifest of a campaign in the store, by iteration and then stage (in STAGE_ORDER), each
    with its `key` added: what `metareward show` and MLflow tracking read, without Prefect or a model."""
    found: dict[int, dict[str, dict]] = {}
    for key in store.list(campaign):
        parts = key.split("/")
        if len(parts) != 4 or parts[3] != "manifest.json" or not parts[1].startswith("iter-"):
            continue
        manifest = store.read_json(key)
        found.setdefault(manifest["iteration"], {})[manifest["stage"]] = {**manifest, "key": key}
    return {
        iteration: {stage: stages[stage] for stage in STAGE_ORDER if stage in stages}
        for iteration, stages in sorted(found.items())
    }


def read_stage_table(store: ArtifactStore, manifest: dict, columns: list[str] | None = None) -> pl.DataFrame:
    """A stage's whole table (only `columns`, when given): its shards, as its manifest lists them,
    concatenated in shard order."""
    return read_tables(store, [shard["uri"] for _, shard in sorted(manifest["shards"].items())], columns)


def read_tables(store: ArtifactStore, uris: list[str], columns: list[str] | None = None) -> pl.DataFrame:
    """The concatenation of tables given by URI (only `columns`, when given)."""
    return pl.concat([store.read_table(uri, columns) for uri in uris], how="vertical")


def select_iteration_prompts(config: CampaignConfig, iteration: int) -> pl.DataFrame:
    """The prompts of iteration t: the prompt file in a seeded random order, iteration t taking the t-th
    block of num_prompts (disjoint across iterations while the file lasts, then wrapping around), in the
    order of the file within the block. Raises PromptFileError for an unusable file."""
    table = load_prompts(config.prompts.path, config.prompts.column).table
    count = config.iterations[iteration - 1].num_prompts or table.height
    order = np.random.default_rng(config.seed).permutation(table.height)
    start = sum((it.num_prompts or table.height) for it in config.iterations[: iteration - 1])
    picked = np.sort(order[(start + np.arange(min(count, table.height))) % table.height])
    return table[picked]


def preflight(config: CampaignConfig) -> None:
    """Everything that can fail before any model work, checked in seconds: the prompt file (iteration 1's
    prompts), the artifact root (bucket exists, endpoint reachable, writable), the seed model (a local
    folder, the builtin demo model, or a hub id), and vLLM's interpreter when the vllm backend starts
    servers, and MLflow when tracking is on. Raises PromptFileError, StoreError, ConfigError or TrackingError
    naming what to fix."""
    from metareward.config import ConfigError
    from metareward.models import BUILTIN_DEMO_MODEL, smollm2_gguf_path

    from metareward.tracking import check_tracking

    select_iteration_prompts(config, 1)
    ArtifactStore(config.artifact_root).check()
    check_tracking(config)
    model = config.model.path
    if model == BUILTIN_DEMO_MODEL:
        smollm2_gguf_path()
    elif (model.startswith((".", "/", "~")) or Path(model).exists()) and not (Path(model).expanduser() / "config.json").is_file():
        raise ConfigError(f"model.path {model}: no Hugging Face model folder there (config.json missing)")
    inference = config.inference
    if inference.backend == "vllm" and inference.base_url is None:
        from metareward.inference.vllm_backend import DEFAULT_VLLM_PYTHON

        python = Path(inference.vllm_python or os.environ.get("METAREWARD_VLLM_PYTHON", DEFAULT_VLLM_PYTHON))
        if not python.exists():
            raise ConfigError(f"inference.backend vllm: vLLM's Python {python} does not exist "
                              "(bash infra/setup.sh --vllm, or set inference.vllm_python)")


def file_digest(path: str | Path) -> str:
    """blake2b digest of a file's bytes (the prompt file's part of the prompts stage's key)."""
    digest = hashlib.blake2b(digest_size=8)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
