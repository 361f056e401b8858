"""What a training reports: TRL's per-step log as a table of the stage, the first and last value of each metric,
and the result (the kept model's folder, its digest, counts)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

TRAINING_METRICS = {
    "dpo": ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "learning_rate",
            "grad_norm", "epoch"),
    "sft": ("loss", "mean_token_accuracy", "learning_rate", "grad_norm", "epoch"),
}
"""What TRL logs every step of each kind of training, kept in the stage's table."""

AFTER_TRAINING = {"dpo": ("loss", "rewards/accuracies", "rewards/margins"), "sft": ("loss", "mean_token_accuracy")}
"""What the trained model scores on its own training set, kept as {name}_after in the stage's statistics."""


def log_schema(kind: str) -> pl.Schema:
    """A training stage's table: one row per logged step with TRL's metrics of that kind ("dpo", "sft")."""
    return pl.Schema({"step": pl.Int64, **{name.replace("/", "_"): pl.Float64 for name in TRAINING_METRICS[kind]}})


TRAINING_LOG = log_schema("dpo")
"""The checkpoint stage's table: one row per logged DPO step (TRL's loss, rewards/…, learning rate)."""
SFT_LOG = log_schema("sft")
"""The seed SFT stage's table: one row per logged SFT step (loss, token accuracy, learning rate)."""


def training_log_table(history: list[dict[str, Any]], kind: str = "dpo") -> pl.DataFrame:
    """TRL's log_history as a table with log_schema(kind) (the final summary entry left out)."""
    rows = [
        {"step": int(entry.get("step", index + 1)),
         **{name.replace("/", "_"): float(entry[name]) if name in entry else None for name in TRAINING_METRICS[kind]}}
        for index, entry in enumerate(history)
        if "loss" in entry
    ]
    return pl.DataFrame(rows, schema=log_schema(kind))


@dataclass
class TrainingResult:
    """The new checkpoint folder (complete: model_id.txt written last), its digest, TRL's log and counts."""

    checkpoint: Path
    model_id: str
    log_history: list[dict[str, Any]]
    pairs_trained: int
    pairs_too_long: int
    seconds: float
    summary: dict[str, float] = field(default_factory=dict)
    resumed_from_step: int = 0
    """The step of the checkpoint the training resumed from (0: it started from M_t)."""
    reference_reused: bool = False
    """Whether DPO read the reference log-probs kept beside its checkpoints instead of computing them."""


def summarize_log(history: list[dict[str, Any]], kind: str = "dpo") -> dict[str, float]:
    """First and last value of each metric TRL logged (loss, rewards/…), e.g. {'loss_first': …}."""
    summary: dict[str, float] = {}
    for name in TRAINING_METRICS[kind]:
        values = [entry[name] for entry in history if name in entry and "train_runtime" not in entry]
        if values:
            key = name.replace("/", "_")
            summary[f"{key}_first"], summary[f"{key}_last"] = float(values[0]), float(values[-1])
    return summary
