"""From judged tables to preference data: rewards, actor pairs, judged responses, Elo of judgments, judge pairs."""

from __future__ import annotations

import numpy as np
import polars as pl

from metareward.artifacts.stats import StageStats
from metareward.artifacts.tables import (
    ACTOR_PAIRS,
    DPO_DATASET,
    JUDGE_PAIRS,
    JUDGMENT_ELO,
    content_seed,
    validate_table,
)
from metareward.paper.elo import agreed_battles, battle_matrices, elo_scores_batch, order_wins, positional_weights
from metareward.paper.prompts import render_judge_prompt
from metareward.paper.selection import select_actor_pair, select_judge_pair, select_judged_response

BATTLE_RULES = ("weighted", "both_orders_agree", "both_orders_or_tie")
"""How a pair of judgments' two verdicts (one per order) become battle wins: the paper's weighted wins; a win only
when both orders agree, a split counting for neither; or as NeMo-Aligner counts them, a split being a tie."""


JUDGED_RESPONSES = ("highest_variance", "all")
"""Which responses' judgments are meta-judged: the paper's highest-variance one per prompt, or every one."""


def _message(role: str, content: pl.Expr) -> pl.Expr:
    return pl.concat_list(pl.struct(pl.lit(role).alias("role"), content.alias("content")))


def _length_filtered(pair: tuple[int, int] | None, lengths: list[int], max_chosen_chars: int | None,
                     stats: StageStats) -> tuple[int, int] | None:
    """The pair unless there is none or its chosen side is longer than max_chosen_chars (paper A.3);
    counts which of the two happened in stats.counts ("no_pair", "chosen_too_long")."""
    reason = None
    if pair is None:
        reason = "no_pair"
    elif max_chosen_chars is not None and lengths[pair[0]] > max_chosen_chars:
        reason = "chosen_too_long"
    if reason is None:
        return pair
    stats.counts[reason] = stats.counts.get(reason, 0) + 1
    return None


def score_responses(judgments: pl.DataFrame) -> pl.DataFrame:
    """Per response: its reward `score` = mean of the valid judgment scores (paper sec. 2.1), `score_var`
    = their population variance (sec. 2.2), `n_valid` and `n_judgments`. A response without a valid score
    has score null and n_valid 0."""
    return (
        judgments.group_by("prompt_id", "response_id")
        .agg(
            pl.col("score").mean().alias("score"),
            pl.col("score").var(ddof=0).alias("score_var"),
            pl.col("score").count().cast(pl.Int32).alias("n_valid"),
            pl.len().cast(pl.Int32).alias("n_judgments"),
        )
        .sort("prompt_id", "response_id")
    )


def select_actor_pairs(
    responses: pl.DataFrame,
    scores: pl.DataFrame,
    prompts: pl.DataFrame,
    rho: float,
    max_chosen_chars: int | None,
    iteration: int,
    model_id: str,
) -> tuple[pl.DataFrame, StageStats]:
    """Actor preference pairs (paper sec. 2.1): per prompt, select_actor_pair over its scored responses
    with length control ρ, then drop pairs whose chosen response is longer than max_chosen_chars (A.3).
    Counts prompts without a pair (all scores equal, fewer than two scored responses) and dropped pairs.
    The pairs are in TRL's conversational format."""
    stats = StageStats("actor_pairs")
    scored = (
        responses.join(scores.select("response_id", "score"), on="response_id")
        .filter(pl.col("score").is_not_null())
        .sort("prompt_id", "sample_idx")
        .group_by("prompt_id", maintain_order=True)
        .agg("response_id", "text", "score", "n_chars")
    )
    picked = []
    for prompt_id, response_ids, texts, response_scores, lengths in scored.iter_rows():
        pair = _length_filtered(select_actor_pair(response_scores, lengths, rho), lengths, max_chosen_chars, stats)
        if pair is None:
            continue
        chosen, rejected = pair
        picked.append(
            (prompt_id, texts[chosen], texts[rejected], response_ids[chosen], response_ids[rejected],
             response_scores[chosen], response_scores[rejected], lengths[chosen], lengths[rejected])
        )
    stats.counts["prompts_without_scored_response"] = prompts.height - scored.height
    columns = {"prompt_id": pl.String, "chosen_text": pl.String, "rejected_text": pl.String,
               "chosen_id": pl.String, "rejected_id": pl.String, "chosen_score": pl.Float64,
               "rejected_score": pl.Float64, "chosen_chars": pl.Int32, "rejected_chars": pl.Int32}
    table = (
        pl.DataFrame(picked, schema=columns, orient="row")
        .join(prompts.select("prompt_id", "prompt"), on="prompt_id", how="left", maintain_order="left")
        .select(
            "prompt_id",
            _message("user", pl.col("prompt")).alias("prompt"),
            _message("assistant", pl.col("chosen_text")).alias("chosen"),
            _message("assistant", pl.col("rejected_text")).alias("rejected"),
            "chosen_id", "rejected_id",
            "chosen_score", "rejected_score", "chosen_chars", "rejected_chars",
            pl.lit(iteration, pl.Int32).alias("iteration"),
            pl.lit(model_id, pl.String).alias("model_id"),
        )
    )
    table = validate_table(table.cast(dict(ACTOR_PAIRS)), ACTOR_PAIRS, "actor_pairs")
    stats.rows = table.height
    return table, stats


def select_judged_responses(scores: pl.DataFrame, seed: int, which: str = "highest_variance") -> pl.DataFrame:
    """Per prompt, the response whose valid scores have the highest variance (paper sec. 2.2), ties broken
    at random with a generator seeded by (seed, prompt_id); with which="all", every response. Only responses
    with at least two valid judgments take part (one judgment has no variance and no pair to meta-judge).
    Columns prompt_id, response_id, score_var."""
    if which not in JUDGED_RESPONSES:
        raise ValueError(f"which must be one of {JUDGED_RESPONSES}, got {which!r}")
    eligible = scores.filter(pl.col("n_valid") >= 2)
    if which == "all":
        return eligible.select("prompt_id", "response_id", "score_var").sort("prompt_id", "response_id")
    candidates = (
        eligible
        .sort("prompt_id", "response_id")
        .group_by("prompt_id", maintain_order=True)
        .agg("response_id", "score_var")
    )
    picked = []
    for prompt_id, response_ids, variances in candidates.iter_rows():
        index = select_judged_response(variances, np.random.default_rng(content_seed(seed, "judged", prompt_id)))
        picked.append((prompt_id, response_ids[index], variances[index]))
    return pl.DataFrame(picked, schema={"prompt_id": pl.String, "response_id": pl.String, "score_var": pl.Float64},
                        orient="row")


def meta_judged_judgments(judgments: pl.DataFrame, judged: pl.DataFrame) -> tuple[pl.DataFrame, int]:
    """The judgments the meta-judge compares: the valid ones (a score) of the judged responses (table with
    response_id), each text once per response — a judgment that repeats an earlier one's text word for word (by
    sample_idx) is left out, since the meta-judge has nothing to tell apart in two identical judgments and they make
    no judge pair (NeMo-Aligner does not meta-judge such a pair either) — and how many were left out that way."""
    valid = judgments.join(judged.select("response_id"), on="response_id", how="semi").filter(
        pl.col("score").is_not_null()).sort("response_id", "sample_idx")
    distinct = valid.unique(["response_id", "text"], keep="first", maintain_order=True)
    return distinct, valid.height - distinct.height


def rank_judgments(
    meta_judgments: pl.DataFrame, judgments: pl.DataFrame, iteration: int, model_id: str,
    positional: bool = True, battle_rule: str = "weighted",
) -> tuple[pl.DataFrame, StageStats]:
    """Elo of every meta-judged judgment (paper sec. 2.2).

    win_1st / win_2nd are counted over the whole table given — pass the whole iteration, as the paper
    does — and give the positional weights (ω1, ω2), or ω1 = ω2 = ½ when `positional` is false; each
    response's battles make its battle matrix, and one batched fit gives the Elo scores. battle_rule
    "both_orders_agree" counts a battle only for a judgment that won it in both orders, a split (each won one
    order) for neither; "both_orders_or_tie" (NeMo-Aligner's rule) counts a split as a tie, one win each way
    (elo.agreed_battles; the weights do not apply to either). The statistics carry win_first, win_second, and w1, w2
    under the weighted rule or, under the others, the pairs whose orders agreed (agreed_battles), split
    (split_battles) or were not both decided (undecided_battles: a tie, an unparsed verdict, a missing order).
    """
    if battle_rule not in BATTLE_RULES:
        raise ValueError(f"battle_rule must be one of {BATTLE_RULES}, got {battle_rule!r}")
    stats = StageStats("rank_judgments")
    verdicts = meta_judgments.select(
        "prompt_id", "response_id", "first_id", "second_id",
        pl.when(pl.col("winner") == "A").then(1).when(pl.col("winner") == "B").then(-1).otherwise(0).alias("r"),
    )
    win_first = int((verdicts["r"] == 1).sum())
    win_second = int((verdicts["r"] == -1).sum())
    w1, w2 = positional_weights(win_first, win_second) if positional else (0.5, 0.5)
    stats.counts.update(win_first=win_first, win_second=win_second)
    if battle_rule == "weighted":
        stats.counts.update(w1=w1, w2=w2)

    ranked = (
        pl.concat([verdicts.select("response_id", judgment_id="first_id"),
                   verdicts.select("response_id", judgment_id="second_id")])
        .unique()
        .join(judgments.select("judgment_id", "sample_idx", "score"), on="judgment_id")
        .sort("response_id", "sample_idx")
        .with_columns(
            pl.col("response_id").rank("dense").cast(pl.Int64).sub(1).alias("group"),
            pl.int_range(pl.len()).over("response_id").alias("index"),
        )
    )
    if ranked.is_empty():
        return validate_table(pl.DataFrame(schema=JUDGMENT_ELO), JUDGMENT_ELO, "judgment_elo"), stats
    index_of = ranked.select("judgment_id", "group", "index")
    battles = verdicts.join(index_of, left_on="first_id", right_on="judgment_id").join(
        index_of.select("judgment_id", second_index="index"), left_on="second_id", right_on="judgment_id"
    )
    sizes = ranked.group_by("group").agg(pl.len()).sort("group")["len"].to_numpy()
    rows = tuple(battles[column].to_numpy() for column in ("group", "index", "second_index", "r"))
    if battle_rule != "weighted":
        *_, wins_low, wins_high = order_wins(*rows)
        agreed = int(((wins_low == 2) | (wins_high == 2)).sum())
        split = int(((wins_low == 1) & (wins_high == 1)).sum())
        stats.counts.update(agreed_battles=agreed, split_battles=split,
                            undecided_battles=len(wins_low) - agreed - split)
        rows = agreed_battles(*rows, split_is_tie=battle_rule == "both_orders_or_tie")
        w1 = w2 = 1.0
    matrices = battle_matrices(*rows, len(sizes), int(sizes.max()), w1, w2)
    elo = elo_scores_batch(matrices, sizes)
    wins = pl.concat([
        verdicts.filter(pl.col("r") == 1).group_by(judgment_id="first_id").agg(pl.len().alias("wins_first")),
        verdicts.filter(pl.col("r") == -1).group_by(judgment_id="second_id").agg(pl.len().alias("wins_second")),
    ], how="diagonal").group_by("judgment_id").agg(pl.col("wins_first").sum(), pl.col("wins_second").sum())
    table = (
        ranked.with_columns(pl.Series("elo", elo[ranked["group"].to_numpy(), ranked["index"].to_numpy()]))
        .join(meta_judgments.select("response_id", "prompt_id").unique(), on="response_id")
        .join(wins, on="judgment_id", how="left")
        .select(
            "prompt_id", "response_id", "judgment_id", "score", "elo",
            pl.col("wins_first").fill_null(0).cast(pl.Int32), pl.col("wins_second").fill_null(0).cast(pl.Int32),
            pl.lit(iteration, pl.Int32).alias("iteration"), pl.lit(model_id, pl.String).alias("model_id"),
        )
        .sort("prompt_id", "response_id", "judgment_id")
    )
    table = validate_table(table, JUDGMENT_ELO, "judgment_elo")
    stats.rows = table.height
    stats.counts["elo_spread_mean"] = float(
        table.group_by("response_id").agg((pl.col("elo").max() - pl.col("elo").min()).alias("s"))["s"].mean()
    )
    return table, stats


def select_judge_pairs(
    judgment_elo: pl.DataFrame,
    judgments: pl.DataFrame,
    responses: pl.DataFrame,
    prompts: pl.DataFrame,
    max_chosen_chars: int | None,
    seed: int,
    iteration: int,
    model_id: str,
) -> tuple[pl.DataFrame, StageStats]:
    """Judge preference pairs (paper sec. 2.2): per judged response, highest vs lowest Elo (ties at random,
    seeded by (seed, response_id)); pairs whose chosen judgment is longer than max_chosen_chars are dropped
    (A.3), and so are pairs of two word-for-word identical judgments, which teach nothing (counted as
    identical_texts; meta_judged_judgments keeps them from being ranked in the first place). The pair's prompt is
    the judge prompt of that response, chosen/rejected the judgment texts."""
    stats = StageStats("judge_pairs")
    grouped = (
        judgment_elo.join(judgments.select("judgment_id", "text", "n_chars"), on="judgment_id")
        .sort("response_id", "judgment_id")
        .group_by("prompt_id", "response_id", maintain_order=True)
        .agg("judgment_id", "text", "elo", "n_chars")
    )
    picked = []
    for prompt_id, response_id, judgment_ids, texts, elos, lengths in grouped.iter_rows():
        rng = np.random.default_rng(content_seed(seed, "judge-pair", response_id))
        # The length filter is applied here rather than by select_judge_pair so that its drops are counted.
        pair = _length_filtered(select_judge_pair(elos, lengths, None, rng), lengths, max_chosen_chars, stats)
        if pair is None:
            continue
        if texts[pair[0]] == texts[pair[1]]:
            stats.counts["identical_texts"] = stats.counts.get("identical_texts", 0) + 1
            continue
        chosen, rejected = pair
        picked.append((prompt_id, response_id, texts[chosen], texts[rejected], judgment_ids[chosen],
                       judgment_ids[rejected], elos[chosen], elos[rejected], lengths[chosen], lengths[rejected]))
    columns = {"prompt_id": pl.String, "response_id": pl.String, "chosen_text": pl.String,
               "rejected_text": pl.String, "chosen_id": pl.String, "rejected_id": pl.String,
               "chosen_elo": pl.Float64, "rejected_elo": pl.Float64, "chosen_chars": pl.Int32,
               "rejected_chars": pl.Int32}
    pairs = (
        pl.DataFrame(picked, schema=columns, orient="row")
        .join(prompts.select("prompt_id", "prompt"), on="prompt_id", how="left", maintain_order="left")
        .join(responses.select("response_id", response="text"), on="response_id", how="left", maintain_order="left")
    )
    judge_prompts = [render_judge_prompt(p, r) for p, r in zip(pairs["prompt"], pairs["response"], strict=True)]
    table = pairs.with_columns(pl.Series("judge_prompt", judge_prompts, dtype=pl.String)).select(
        "prompt_id", "response_id",
        _message("user", pl.col("judge_prompt")).alias("prompt"),
        _message("assistant", pl.col("chosen_text")).alias("chosen"),
        _message("assistant", pl.col("rejected_text")).alias("rejected"),
        "chosen_id", "rejected_id", "chosen_elo", "rejected_elo", "chosen_chars", "rejected_chars",
        pl.lit(iteration, pl.Int32).alias("iteration"), pl.lit(model_id, pl.String).alias("model_id"),
    )
    table = validate_table(table.cast(dict(JUDGE_PAIRS)), JUDGE_PAIRS, "judge_pairs")
    stats.rows = table.height
    return table, stats


def build_dpo_dataset(
    actor_pairs: pl.DataFrame, judge_pairs: pl.DataFrame | None, train_judge: bool
) -> tuple[pl.DataFrame, StageStats]:
    """The iteration's DPO data: actor pairs, plus judge pairs when the schedule trains the judge (paper
    sec. 3.1: iterations 1–2); `kind` says which. self_rewarding campaigns pass no judge pairs."""
    stats = StageStats("dpo_dataset")
    common = ["prompt_id", "prompt", "chosen", "rejected"]
    parts = [actor_pairs.select(*common, pl.lit("actor").alias("kind"), "iteration", "model_id")]
    if train_judge and judge_pairs is not None:
        parts.append(judge_pairs.select(*common, pl.lit("judge").alias("kind"), "iteration", "model_id"))
    table = validate_table(pl.concat(parts).cast(dict(DPO_DATASET)), DPO_DATASET, "dpo_dataset")
    stats.rows = table.height
    stats.counts.update(
        actor_pairs=int((table["kind"] == "actor").sum()), judge_pairs=int((table["kind"] == "judge").sum())
    )
    return table, stats
