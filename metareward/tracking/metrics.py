"""An iteration's metrics as MLflow shows them: one name per quantity, grouped by what it means in the paper —
actor/, judge/, meta_judge/, pairs/, train/, eval/ — and, out of the charts, each stage's bookkeeping."""

from __future__ import annotations

from typing import Any

import polars as pl

from metareward.paper.report import iteration_report

PAPER_GROUPS = ("actor/", "judge/", "meta_judge/", "pairs/", "train/", "eval/")
"""The groups a campaign run also gets, at step = iteration, so that iterations compare as curves."""

STATISTICS: dict[tuple[str, str], str] = {
    ("prompts", "rows"): "actor/prompts",
    ("prompts", "empty_prompts"): "actor/prompts_empty_in_file",
    ("prompts", "duplicate_prompts"): "actor/prompts_duplicated_in_file",
    ("responses", "dropped_duplicates"): "actor/identical_responses_dropped",
    ("responses", "skipped_prompts"): "actor/prompts_too_long",
    ("judgments", "skipped_prompts"): "judge/prompts_too_long",
    ("meta_judgments", "skipped_prompts"): "meta_judge/prompts_too_long",
    ("meta_judgments", "identical_judgments"): "meta_judge/identical_judgments_not_compared",
    ("judgment_elo", "agreed_battles"): "meta_judge/pairs_agreed_in_both_orders",
    ("judgment_elo", "split_battles"): "meta_judge/pairs_split_between_orders",
    ("judgment_elo", "rows"): "meta_judge/ranked_judgments",
    ("judgment_elo", "win_first"): "meta_judge/wins_first",
    ("judgment_elo", "win_second"): "meta_judge/wins_second",
    ("judgment_elo", "w1"): "meta_judge/positional_weight_first",
    ("judgment_elo", "w2"): "meta_judge/positional_weight_second",
    ("actor_pairs", "no_pair"): "pairs/actor_prompts_without_pair",
    ("actor_pairs", "chosen_too_long"): "pairs/actor_chosen_too_long",
    ("actor_pairs", "prompts_without_scored_response"): "pairs/actor_prompts_without_valid_score",
    ("judge_pairs", "no_pair"): "pairs/judge_responses_without_pair",
    ("judge_pairs", "chosen_too_long"): "pairs/judge_chosen_too_long",
    ("judge_pairs", "identical_texts"): "pairs/judge_chosen_identical_to_rejected",
    ("checkpoint", "pairs_trained"): "train/pairs_trained",
    ("checkpoint", "pairs_too_long"): "train/pairs_too_long",
    ("checkpoint", "epochs_trained"): "train/epochs_trained",
    ("checkpoint", "epochs_scheduled"): "train/epochs_scheduled",
    ("checkpoint", "resumed_from_step"): "train/resumed_from_step",
    ("checkpoint", "loss_after"): "train/loss_after_training",
    ("checkpoint", "rewards_accuracies_after"): "train/rewards_accuracies_after_training",
    ("checkpoint", "rewards_margins_after"): "train/rewards_margins_after_training",
    ("sft_data", "rows"): "train/sft_examples",
    ("sft", "pairs_trained"): "train/examples_trained",
    ("sft", "pairs_too_long"): "train/examples_too_long",
    ("sft", "epochs_trained"): "train/epochs_trained",
    ("sft", "epochs_scheduled"): "train/epochs_scheduled",
    ("sft", "resumed_from_step"): "train/resumed_from_step",
    ("sft", "loss_after"): "train/loss_after_training",
    ("sft", "mean_token_accuracy_after"): "train/mean_token_accuracy_after_training",
    ("eval_prompts", "rows"): "eval/prompts",
    ("eval_answers", "skipped_prompts"): "eval/prompts_too_long_for_the_trained_model",
    ("reference_answers", "skipped_prompts"): "eval/prompts_too_long_for_the_reference",
    **{("win_rate", name): f"eval/{name}" for name in (
        "win_rate", "win_rate_standard_error", "win_rate_ci_low", "win_rate_ci_high", "discrete_win_rate",
        "lc_win_rate", "lc_win_rate_ci_low", "lc_win_rate_ci_high", "annotations", "prompts_compared",
        "identical_answers", "unanswered_prompts", "trained_mean_chars", "reference_mean_chars",
        "first_position_share")},
}
"""Stage statistics that mean something in the paper's terms, and their metric names."""

BOOKKEEPING = {"compute_seconds": "seconds", "shards": "shards", "requests": "requests",
               "prompt_tokens": "prompt_tokens", "completion_tokens": "completion_tokens",
               "tokens_per_second": "tokens_per_second"}
"""Statistics kept for every stage in its run's stages.json (the model-call ones for stages that call it)."""

_MODEL_CALLS = {"requests", "prompt_tokens", "completion_tokens", "tokens_per_second"}

SIGNIFICANT_DIGITS = 12
"""Digits a metric keeps. Means over polars groups sum in whatever order the groups come, so the same tables can
give values that differ in the last bits; MLflow keeps a point that is logged again (after an outage cut an
attempt short) as one only when its value is equal."""


def iteration_metrics(stages: dict[str, dict[str, Any]], tables: dict[str, pl.DataFrame]) -> dict[str, float]:
    """Every metric of an iteration from its stages' combined statistics and its report tables (see
    report.iteration_report): the paper's quantities under their groups, each to SIGNIFICANT_DIGITS, so that the
    same tables give the same values."""
    metrics = dict(iteration_report(tables))
    for (name, statistic), metric in STATISTICS.items():
        value = stages.get(name, {}).get(statistic)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics[metric] = float(value)
    return {name: float(f"{value:.{SIGNIFICANT_DIGITS}g}") for name, value in metrics.items()}


def stage_bookkeeping(stages: dict[str, dict[str, Any]], uses_model: dict[str, bool]) -> dict[str, dict[str, float]]:
    """Each stage's bookkeeping (BOOKKEEPING: seconds, shards, and for the stages that call the model — `uses_model`
    says which — requests, tokens, tok/s), by stage: the iteration run's stages.json, kept out of its charts."""
    return {name: {label: float(stats[statistic]) for statistic, label in BOOKKEEPING.items()
                   if isinstance(stats.get(statistic), (int, float))
                   and (statistic not in _MODEL_CALLS or uses_model.get(name) and stats.get("requests"))}
            for name, stats in stages.items()}


def paper_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics of PAPER_GROUPS: what the campaign run plots over iterations."""
    return {name: value for name, value in metrics.items() if name.startswith(PAPER_GROUPS)}
