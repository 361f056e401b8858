"""What MLflow is given of an iteration, read from the artifact store and computed here, so that the tracker only
talks to MLflow: the stages' manifests, their metrics, their tables as dataset specs, the training curves, the
judge scores the figures draw, and the digest that says whether the iteration was logged already."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import polars as pl

from metareward.artifacts.store import ArtifactStore
from metareward.pipeline.manifests import read_stage_table, stage_manifests
from metareward.pipeline.stages import stage
from metareward.tracking.metrics import iteration_metrics, paper_metrics, stage_bookkeeping
from metareward.tracking.tracked_datasets import stage_dataset

LINKED_PAIRS = {"pairs/actor": "actor_pairs", "pairs/judge": "judge_pairs", "pairs/dpo": "dpo_dataset"}
"""Pair counts linked to M_{t+1} and the table they count (train/… metrics link to the training table): the model
page lists those tables."""

SCORE_COLUMNS = ["response_id", "score"]
"""The judgment columns the score figures read."""


@dataclass
class TrainingPoint:
    """One value of TRL's log: `train/{column}` at a trainer step; `last` marks the last step's points, which are
    linked to the trained model and its training set."""

    name: str
    value: float
    step: int
    last: bool


@dataclass
class IterationRecord:
    """Everything logged of iteration t (only the stages a flow run finished), computed from the store."""

    iteration: int
    manifests: dict[str, dict]
    """Stage manifests by stage, in the registry's order."""
    metrics: dict[str, float]
    """Every metric of the iteration run (tracking.metrics.iteration_metrics)."""
    datasets: dict[str, dict]
    """Stage tables as dataset specs (tracked_datasets.stage_dataset), for the stages MLflow shows as datasets."""
    checkpoint: dict | None
    """The manifest of the stage that trained a model (the seed's SFT or the checkpoint), when it finished."""
    logged_key: str | None
    """A digest of every logged stage's cache keys, once trained: the run is logged again only when it changes."""
    training_curve: list[TrainingPoint] = field(default_factory=list)
    bookkeeping: dict[str, dict[str, float]] = field(default_factory=dict)
    """Each stage's seconds, shards, requests, tokens and tok/s (tracking.metrics.stage_bookkeeping)."""
    judgments: pl.DataFrame | None = None
    """The iteration's judge scores (SCORE_COLUMNS), when it judged."""
    earlier_judgments: dict[int, pl.DataFrame] = field(default_factory=dict)
    """The judge scores of the campaign's earlier iterations in the store, by iteration (for the campaign figure)."""

    @property
    def training_set(self) -> str:
        """The stage whose table the iteration trained on: the SFT examples (iteration 0) or the DPO set."""
        return "sft_data" if self.iteration == 0 else "dpo_dataset"

    def linked_dataset(self, metric: str) -> dict | None:
        """The dataset a metric is linked to (with the trained model): the training set for train/…, the table a
        pair count counts; None for the others."""
        name = self.training_set if metric.startswith("train/") else LINKED_PAIRS.get(metric, "")
        return self.datasets.get(name)

    @property
    def paper_metrics(self) -> dict[str, float]:
        """The metrics the campaign run plots at step = iteration (none for the seed's SFT, which has its own run)."""
        return paper_metrics(self.metrics) if self.iteration > 0 else {}


def iteration_record(store: ArtifactStore, campaign: str, iteration: int, stages: list[str],
                     already_logged: str | None = None) -> IterationRecord | None:
    """Iteration t's record from the store's manifests of `stages` (those a flow run finished: another config of the
    same campaign may have left manifests of later stages). None when none of them has a manifest, or when the
    iteration trained and its logged_key is `already_logged` (nothing read beyond the manifests then)."""
    every_iteration = stage_manifests(store, campaign)
    manifests = {name: manifest for name, manifest in every_iteration.get(iteration, {}).items() if name in stages}
    if not manifests:
        return None
    trainer = next((name for name in manifests if stage(name).writes_model), None)
    checkpoint = manifests.get(trainer) if trainer else None
    key = logged_key(manifests) if checkpoint else None
    if key and key == already_logged:
        return None
    tables = {name: read_stage_table(store, manifest, list(stage(name).report_columns))
              for name, manifest in manifests.items() if stage(name).report_columns}
    statistics = {name: manifest["stats"] for name, manifest in manifests.items()}
    metrics = iteration_metrics(statistics, tables)
    record = IterationRecord(
        iteration=iteration, manifests=manifests, metrics=metrics, checkpoint=checkpoint,
        datasets={name: stage_dataset(campaign, store, manifest) for name, manifest in manifests.items()
                  if stage(name).dataset_context},
        logged_key=key, bookkeeping=stage_bookkeeping(statistics, {name: stage(name).uses_model for name in manifests}))
    if checkpoint:
        record.training_curve = training_points(read_stage_table(store, checkpoint))
    if "judgments" in tables:
        record.judgments = tables["judgments"].select(SCORE_COLUMNS)
        record.earlier_judgments = {earlier: read_stage_table(store, stages_of["judgments"], SCORE_COLUMNS)
                                    for earlier, stages_of in every_iteration.items()
                                    if earlier < iteration and "judgments" in stages_of}
    return record


def training_points(curves: pl.DataFrame) -> list[TrainingPoint]:
    """TRL's log (one row per logged step) as train/… points by step, in step order; nulls left out."""
    if not curves.height:
        return []
    last = curves["step"].max()
    return [TrainingPoint(f"train/{column}", float(value), int(row["step"]), row["step"] == last)
            for row in curves.sort("step").iter_rows(named=True)
            for column, value in row.items() if column != "step" and value is not None]


def logged_key(manifests: dict[str, dict]) -> str:
    """A digest of the cache keys of every stage logged: a re-run that adds stages (an evaluation after the
    checkpoint) logs again, one that adds nothing does not."""
    keys = sorted((name, shard["cache_key"]) for name, manifest in manifests.items()
                  for shard in manifest["shards"].values())
    return hashlib.blake2b(json.dumps(keys).encode(), digest_size=8).hexdigest()
