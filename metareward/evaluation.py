"""What the paper reports per iteration: score distribution, meta-judge biases (Table 5), judge agreement
with labelled rankings (sec. 3.4, Table 7), and the health checks that stop a campaign on collapsed data."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
from scipy.stats import spearmanr


def score_distribution(judgments: pl.DataFrame) -> dict[str, float]:
    """Valid judge scores: count, mean, share of the maximum score (5), and the share of each integer
    score 0..5 (decimals such as 4.5 are counted in their own `score_other` share)."""
    scores = judgments["score"].drop_nulls()
    total = scores.len()
    result = {"valid": float(total), "mean": float(scores.mean()) if total else float("nan")}
    for value in range(6):
        result[f"share_{value}"] = float((scores == value).sum() / total) if total else 0.0
    result["share_other"] = 1.0 - sum(result[f"share_{value}"] for value in range(6)) if total else 0.0
    return result


def meta_judge_bias(meta_judgments: pl.DataFrame, judgments: pl.DataFrame) -> dict[str, float]:
    """The meta-judge's biases as the paper's Table 5 defines them, over battles with a parsed winner.

    Score bias, over battles whose two judgments have different scores: `higher_win` (the higher-score
    judgment won) and `lower_win` (the lower-score one won). Positional bias: `position_a_same_score`,
    `position_a_diff_score` and `position_a_all`, the share of wins by the judgment shown first. Shares
    are in [0, 1]; NaN where a category has no battle. `battles` counts the battles used.
    """
    scores = judgments.select("judgment_id", "score")
    battles = (
        meta_judgments.filter(pl.col("winner").is_not_null())
        .join(scores.rename({"judgment_id": "first_id", "score": "first_score"}), on="first_id", how="left")
        .join(scores.rename({"judgment_id": "second_id", "score": "second_score"}), on="second_id", how="left")
        .with_columns(
            (pl.col("winner") == "A").alias("a_won"),
            (pl.col("first_score") == pl.col("second_score")).alias("same_score"),
            pl.when(pl.col("winner") == "A").then(pl.col("first_score")).otherwise(pl.col("second_score"))
            .alias("winner_score"),
            pl.when(pl.col("winner") == "A").then(pl.col("second_score")).otherwise(pl.col("first_score"))
            .alias("loser_score"),
        )
    )
    different = battles.filter(~pl.col("same_score"))
    same = battles.filter(pl.col("same_score"))

    def share(frame: pl.DataFrame, expression: pl.Expr) -> float:
        return float(frame.select(expression.mean()).item()) if frame.height else float("nan")

    return {
        "battles": float(battles.height),
        "higher_win": share(different, pl.col("winner_score") > pl.col("loser_score")),
        "lower_win": share(different, pl.col("winner_score") < pl.col("loser_score")),
        "position_a_same_score": share(same, pl.col("a_won")),
        "position_a_diff_score": share(different, pl.col("a_won")),
        "position_a_all": share(battles, pl.col("a_won")),
    }


def load_labelled_rankings(path: str | Path) -> pl.DataFrame:
    """A labelled-ranking file (JSONL, Parquet or CSV): one row per response with columns `prompt`,
    `response` and `rank` (1 = best; equal ranks are ties), OASST-style. Raises ValueError naming the file
    and the missing column or the bad row."""
    path = Path(path)
    readers = {".jsonl": pl.read_ndjson, ".parquet": pl.read_parquet, ".csv": pl.read_csv}
    if path.suffix not in readers:
        raise ValueError(f"{path}: use .jsonl, .parquet or .csv for labelled rankings")
    table = readers[path.suffix](path)
    missing = [column for column in ("prompt", "response", "rank") if column not in table.columns]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing}; expected prompt, response, rank (1 = best)")
    bad = table.with_row_index("row", offset=1).filter(pl.col("rank").cast(pl.Float64, strict=False).is_null())
    if bad.height:
        raise ValueError(f"{path}: row {bad['row'][0]}: rank must be a number, got {bad['rank'][0]!r}")
    return table.with_columns(pl.col("rank").cast(pl.Float64))


@dataclass(frozen=True)
class Estimate:
    """A statistic with its bootstrap 95% confidence interval (percentile method, resampling prompts)."""

    value: float
    low: float
    high: float


def judge_agreement(table: pl.DataFrame, bootstrap: int = 1000, seed: int = 0) -> dict[str, Estimate]:
    """Agreement of predicted scores with reference ranks (paper sec. 3.4, Table 7).

    `table` has one row per response: `prompt`, `rank` (reference, 1 = best) and `score` (the mean of the
    judge's N valid scores). For every pair of responses of a prompt that the reference orders strictly:
    agreement counts 1 when the predicted scores order them the same way, 0.5 for a predicted tie, 0
    otherwise; `agreement_without_ties` leaves predicted ties out. `spearman` is the mean over prompts of
    the Spearman correlation between scores and reference ranks (prompts where either side is constant
    are left out). Confidence intervals resample prompts with replacement.
    """
    per_prompt = []
    for _, group in table.filter(pl.col("score").is_not_null()).group_by("prompt", maintain_order=True):
        ranks, scores = group["rank"].to_numpy(), group["score"].to_numpy()
        i, j = np.triu_indices(len(ranks), k=1)
        ordered = ranks[i] != ranks[j]
        # Reference prefers the lower rank; predicted agreement is in the same direction.
        reference = np.sign(ranks[j] - ranks[i])[ordered]
        predicted = np.sign(scores[i] - scores[j])[ordered]
        credit = np.where(predicted == 0, 0.5, (predicted == reference).astype(float))
        spearman = np.nan
        if len(set(ranks)) > 1 and len(set(scores)) > 1:
            spearman = -spearmanr(ranks, scores).statistic
        per_prompt.append((credit, predicted != 0, spearman))

    if not per_prompt:
        raise ValueError("no prompt with a scored response: nothing to compare with the reference ranking")

    def statistics(indices: Sequence[int]) -> tuple[float, float, float]:
        credits = np.concatenate([per_prompt[k][0] for k in indices])
        decided = np.concatenate([per_prompt[k][1] for k in indices])
        rhos = np.array([per_prompt[k][2] for k in indices])
        return (
            float(credits.mean()) if credits.size else np.nan,
            float(credits[decided].mean()) if decided.any() else np.nan,
            float(np.nanmean(rhos)) if np.isfinite(rhos).any() else np.nan,
        )

    point = statistics(list(range(len(per_prompt))))
    rng = np.random.default_rng(seed)
    samples = np.array([statistics(rng.integers(0, len(per_prompt), len(per_prompt))) for _ in range(bootstrap)])
    names = ("agreement", "agreement_without_ties", "spearman")
    return {
        name: Estimate(point[k], float(np.nanpercentile(samples[:, k], 2.5)), float(np.nanpercentile(samples[:, k], 97.5)))
        for k, name in enumerate(names)
    }


def alpaca_eval_outputs(prompts: Sequence[str], outputs: Sequence[str], generator: str) -> list[dict[str, str]]:
    """Model answers in AlpacaEval's output format: [{"instruction", "output", "generator"}, …]."""
    if len(prompts) != len(outputs):
        raise ValueError(f"{len(prompts)} prompts but {len(outputs)} outputs")
    return [{"instruction": p, "output": o, "generator": generator} for p, o in zip(prompts, outputs)]


class HealthCheckError(RuntimeError):
    """An iteration's data failed a health check whose action is "stop"."""


def health_problems(health, stages: dict[str, dict]) -> list[str]:
    """The failed checks of config.health (HealthConfig) on an iteration's combined stage statistics
    (pipeline.write_manifest), each naming the metric, its value, the threshold and the setting."""
    problems = []
    judgments = stages.get("judgments", {})
    valid, rows = judgments.get("valid_scores", 0), judgments.get("rows", 0)
    if health.max_top_score_share is not None and valid:
        share = judgments.get("top_scores", 0) / valid
        if share >= health.max_top_score_share:
            problems.append(f"top-score share {share:.1%} of valid judge scores is 5, threshold "
                            f"{health.max_top_score_share:.1%} (health.max_top_score_share)")
    if health.min_parse_rate is not None and rows:
        rate = valid / rows
        if rate < health.min_parse_rate:
            problems.append(f"judge parse rate {rate:.1%} is below {health.min_parse_rate:.1%} "
                            "(health.min_parse_rate)")
    meta = stages.get("meta_judgments", {})
    decided = meta.get("winner_a", 0) + meta.get("winner_b", 0)
    if health.max_position_a_share is not None and decided:
        share = meta["winner_a"] / decided
        if share >= health.max_position_a_share:
            problems.append(f"meta-judge position-A share {share:.1%}, threshold {health.max_position_a_share:.1%} "
                            "(health.max_position_a_share)")
    return problems
