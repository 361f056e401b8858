"""Statistics every stage returns: rows, requests, skips, parse failures, tokens, time, stage-specific counts."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class StageStats:
    """What one stage did. Model stages fill tokens and seconds; selection stages fill `counts`."""

    stage: str
    rows: int = 0
    requests: int = 0
    skipped_prompts: int = 0
    dropped_duplicates: int = 0
    parse_failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    counts: dict[str, float] = field(default_factory=dict)

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

    def merge(self, other: StageStats) -> StageStats:
        """The sum of two shards' statistics of the same stage."""
        merged = StageStats(self.stage)
        for name in ("rows", "requests", "skipped_prompts", "dropped_duplicates", "parse_failures",
                     "prompt_tokens", "completion_tokens", "seconds"):
            setattr(merged, name, getattr(self, name) + getattr(other, name))
        merged.counts = {key: self.counts.get(key, 0) + other.counts.get(key, 0)
                         for key in self.counts.keys() | other.counts.keys()}
        return merged
