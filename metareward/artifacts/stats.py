"""Statistics every stage returns (rows, requests, skips, parse failures, tokens, time, stage-specific counts) and
their combination over a stage's shards."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class StageStats:
    """What one stage did. Model stages fill tokens and seconds (and engine_seconds: seconds times the engines
    serving them); selection stages fill `counts`."""

    stage: str
    rows: int = 0
    requests: int = 0
    skipped_prompts: int = 0
    dropped_duplicates: int = 0
    parse_failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    engine_seconds: float = 0.0
    counts: dict[str, Any] = field(default_factory=dict)

    def add_model_time(self, seconds: float, engines: int) -> None:
        """Count time spent waiting on the model, served by `engines` engines at once: per-engine
        throughput is completion_tokens / engine_seconds (what benchmarks/projection.py scales)."""
        self.seconds += seconds
        self.engine_seconds += seconds * engines

    @property
    def parse_failure_rate(self) -> float:
        """Share of produced rows whose verdict did not parse (0 when the stage parses nothing)."""
        return self.parse_failures / self.rows if self.rows else 0.0

    @property
    def tokens_per_second(self) -> float:
        """Generated tokens per second of the stage's model time."""
        return self.completion_tokens / self.seconds if self.seconds else 0.0

    def as_dict(self) -> dict:
        """Every field plus the derived rates, flat, for manifests, Prefect artifacts and MLflow."""
        flat = {key: value for key, value in asdict(self).items() if key != "counts"}
        return {**flat, **self.counts, "parse_failure_rate": self.parse_failure_rate,
                "tokens_per_second": self.tokens_per_second}


def combine(stage: str, shards: list[dict[str, Any]]) -> dict[str, Any]:
    """One stage's statistics over its shards (StageStats.as_dict of each): counts summed, rates recomputed,
    text values (a checkpoint's model_uri, model_id) kept, plus mean score and mean length where the
    stage recorded them."""
    total: dict[str, Any] = {"stage": stage, "shards": len(shards)}
    for shard in shards:
        for key, value in shard.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in _DERIVED:
                total[key] = total.get(key, 0) + value
            elif isinstance(value, str) and key != "stage":
                total[key] = value  # e.g. a checkpoint's model_uri and model_id
    rows = total.get("rows", 0)
    total["parse_failure_rate"] = total.get("parse_failures", 0) / rows if rows else 0.0
    seconds = total.get("seconds", 0.0)
    total["tokens_per_second"] = total.get("completion_tokens", 0) / seconds if seconds else 0.0
    if total.get("valid_scores"):
        total["mean_score"] = total["score_sum"] / total["valid_scores"]
    if rows and "chars_sum" in total:
        total["mean_chars"] = total["chars_sum"] / rows
    return total


_DERIVED = {"parse_failure_rate", "tokens_per_second", "mean_score", "mean_chars"}
