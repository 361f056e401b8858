"""What the paper reports per iteration — judge score distribution, meta-judge biases (Table 5), lengths, pairs,
Elo spread — and the health checks that stop a campaign before it trains on collapsed data."""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl


def score_distribution(judgments: pl.DataFrame) -> dict[str, float]:
    """Valid judge scores (null and NaN are missing): count, mean, share of the maximum score (5), and the share
    of each integer score 0..5 (decimals such as 4.5 are counted in their own `share_other`)."""
    scores = judgments["score"].fill_nan(None).drop_nulls()
    total = scores.len()
    result = {"valid": float(total), "mean": float(scores.mean()) if total else float("nan")}
    for value in range(6):
        result[f"share_{value}"] = float((scores == value).sum() / total) if total else 0.0
    # Counted, not 1 − the sum of the other shares (which leaves float noise such as 1.1e-16 for none).
    result["share_other"] = float((~scores.is_in([float(value) for value in range(6)])).sum() / total) if total else 0.0
    return result


def meta_judge_bias(meta_judgments: pl.DataFrame, judgments: pl.DataFrame) -> dict[str, float]:
    """The meta-judge's biases as the paper's Table 5 defines them, over battles with a parsed winner.

    Score bias, over battles whose two judgments have different scores: `higher_win` (the higher-score
    judgment won) and `lower_win` (the lower-score one won). Positional bias: `position_a_same_score`,
    `position_a_diff_score` and `position_a_all`, the share of wins by the judgment shown first. Shares
    are in [0, 1]; NaN where a category has no battle. `battles` counts the battles used. A NaN score is
    missing, as null is: its battles count for position only.
    """
    scores = judgments.lazy().select("judgment_id", pl.col("score").fill_nan(None))
    battles = (
        meta_judgments.lazy().filter(pl.col("winner").is_not_null())
        .select("first_id", "second_id", "winner")
        .join(scores.rename({"judgment_id": "first_id", "score": "first_score"}), on="first_id", how="left")
        .join(scores.rename({"judgment_id": "second_id", "score": "second_score"}), on="second_id", how="left")
        .select(
            (pl.col("winner") == "A").alias("a_won"),
            (pl.col("first_score") == pl.col("second_score")).alias("same_score"),
            pl.when(pl.col("winner") == "A").then(pl.col("first_score")).otherwise(pl.col("second_score"))
            .alias("winner_score"),
            pl.when(pl.col("winner") == "A").then(pl.col("second_score")).otherwise(pl.col("first_score"))
            .alias("loser_score"),
        )
    )
    # One pass over the battles (an iteration has millions): each share is a mean of booleans over the battles of
    # its category — a missing score (same_score null) leaves a battle out of both — null where there is none.
    different, same = ~pl.col("same_score"), pl.col("same_score")
    shares = battles.select(
        pl.len().cast(pl.Float64).alias("battles"),
        (pl.col("winner_score") > pl.col("loser_score")).filter(different).mean().alias("higher_win"),
        (pl.col("winner_score") < pl.col("loser_score")).filter(different).mean().alias("lower_win"),
        pl.col("a_won").filter(same).mean().alias("position_a_same_score"),
        pl.col("a_won").filter(different).mean().alias("position_a_diff_score"),
        pl.col("a_won").mean().alias("position_a_all"),
    ).collect().row(0, named=True)
    return {name: float("nan") if value is None else float(value) for name, value in shares.items()}


def iteration_report(tables: dict[str, pl.DataFrame]) -> dict[str, float]:
    """What the paper reports per iteration, from the iteration's own tables (keyed by stage name; absent
    stages are left out): judge score distribution and mean, parse-failure rates of judge and meta-judge,
    mean response and judgment lengths in characters (Table 1's length), pair counts, the mean Elo spread
    of the judged responses, and the meta-judge's biases as Table 5 defines them. Keys group by role
    ("judge/…", "meta_judge/…", …), the way MLflow groups metrics."""
    report: dict[str, float] = {}
    if (responses := tables.get("responses")) is not None and responses.height:
        report["actor/responses"] = float(responses.height)
        report["actor/response_mean_chars"] = float(responses["n_chars"].mean())
        report["actor/response_mean_tokens"] = float(responses["n_tokens"].mean())
    if (judgments := tables.get("judgments")) is not None and judgments.height:
        distribution = score_distribution(judgments)
        report["judge/judgments"] = float(judgments.height)
        report["judge/parse_failure_rate"] = 1.0 - distribution["valid"] / judgments.height
        report["judge/score_mean"] = distribution["mean"]
        for name in [f"share_{value}" for value in range(6)] + ["share_other"]:
            report[f"judge/score_{name}"] = distribution[name]
        report["judge/judgment_mean_chars"] = float(judgments["n_chars"].mean())
    if (meta := tables.get("meta_judgments")) is not None and meta.height:
        report["meta_judge/battles"] = float(meta.height)
        report["meta_judge/parse_failure_rate"] = float(meta["winner"].is_null().mean())
        if judgments is not None:
            bias = meta_judge_bias(meta, judgments)
            for name in ("higher_win", "lower_win", "position_a_same_score", "position_a_diff_score",
                         "position_a_all"):
                report[f"meta_judge/{name}"] = bias[name]
    if (elo := tables.get("judgment_elo")) is not None and elo.height:
        spread = elo.group_by("response_id").agg((pl.col("elo").max() - pl.col("elo").min()).alias("spread"))
        report["meta_judge/elo_spread_mean"] = float(spread["spread"].mean())
    for stage, name in (("actor_pairs", "actor"), ("judge_pairs", "judge"), ("dpo_dataset", "dpo")):
        if (pairs := tables.get(stage)) is not None:
            report[f"pairs/{name}"] = float(pairs.height)
    if (comparisons := tables.get("win_rate")) is not None and comparisons.height:
        asked = comparisons.filter(~pl.col("identical"))
        report["eval/comparisons"] = float(asked.height)
        if asked.height:
            report["eval/parse_failure_rate"] = float(asked["preference"].is_null().mean())
    if (examples := tables.get("sft_data")) is not None and examples.height:
        report["train/sft_target_score_mean"] = float(examples["score"].mean())
        report["train/sft_target_mean_chars"] = float(examples["completion_chars"].mean())
    return report


class HealthCheckError(RuntimeError):
    """An iteration's data failed a health check whose action is "stop"."""


@dataclass(frozen=True)
class HealthCheck:
    """One health check on an iteration's data: its measured value, the threshold and whether it failed."""

    metric: str
    value: float
    threshold: float
    setting: str
    failed: bool
    problem: str

    def __str__(self) -> str:
        bound = "minimum" if self.setting == "min_parse_rate" else "maximum"
        return f"{self.metric} {self.value:.1%} ({bound} {self.threshold:.1%}){': FAILED' if self.failed else ''}"


def health_checks(health, stages: dict[str, dict]) -> list[HealthCheck]:
    """The checks of config.health (HealthConfig) that apply to an iteration's combined stage statistics
    (manifests.write_manifest): those with a threshold and data to measure."""
    checks = []
    judgments = stages.get("judgments", {})
    valid, rows = judgments.get("valid_scores", 0), judgments.get("rows", 0)
    if health.max_top_score_share is not None and valid:
        share = judgments.get("top_scores", 0) / valid
        checks.append(HealthCheck(
            "judge top-score share", share, health.max_top_score_share, "max_top_score_share",
            share >= health.max_top_score_share,
            f"top-score share {share:.1%} of valid judge scores is 5, threshold {health.max_top_score_share:.1%} "
            "(health.max_top_score_share)"))
    if health.min_parse_rate is not None and rows:
        rate = valid / rows
        checks.append(HealthCheck(
            "judge parse rate", rate, health.min_parse_rate, "min_parse_rate", rate < health.min_parse_rate,
            f"judge parse rate {rate:.1%} is below {health.min_parse_rate:.1%} (health.min_parse_rate)"))
    meta = stages.get("meta_judgments", {})
    decided = meta.get("winner_a", 0) + meta.get("winner_b", 0)
    if health.max_position_a_share is not None and decided:
        share = meta["winner_a"] / decided
        checks.append(HealthCheck(
            "meta-judge position-A share", share, health.max_position_a_share, "max_position_a_share",
            share >= health.max_position_a_share,
            f"meta-judge position-A share {share:.1%}, threshold {health.max_position_a_share:.1%} "
            "(health.max_position_a_share)"))
    return checks


def health_problems(health, stages: dict[str, dict]) -> list[str]:
    """The failed checks of health_checks, each naming the metric, its value, the threshold and the setting."""
    return [check.problem for check in health_checks(health, stages) if check.failed]
