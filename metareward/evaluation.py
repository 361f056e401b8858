"""What the paper reports per iteration: score distribution, meta-judge biases (Table 5), judge agreement
with labelled rankings (sec. 3.4, Table 7), and the health checks that stop a campaign on collapsed data."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager
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
    return report


def score_distribution_figure(scores: dict[str, Sequence[float]], title: str = "Judge score distribution"):
    """A matplotlib figure of judge scores like the paper's Fig. 5: per label (e.g. an iteration), a
    histogram of valid scores and their Gaussian kernel density estimate on [0, 5]. Labels with fewer than
    two distinct scores get a histogram only (a KDE needs spread)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from scipy.stats import gaussian_kde

    figure = Figure(figsize=(7, 4), dpi=110)
    axes = figure.subplots()
    grid = np.linspace(0, 5, 501)
    bins = np.arange(-0.125, 5.25, 0.25)
    for index, (label, values) in enumerate(scores.items()):
        values = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=float)
        if not values.size:
            continue
        color = f"C{index}"
        axes.hist(values, bins=bins, density=True, alpha=0.25, color=color)
        if np.unique(values).size > 1:
            axes.plot(grid, gaussian_kde(values)(grid), color=color, label=f"{label} (mean {values.mean():.2f})")
        else:
            axes.plot([], [], color=color, label=f"{label} (all {values[0]:g})")
    axes.set(xlabel="judge score", ylabel="density", xlim=(0, 5), title=title)
    axes.legend(loc="upper left")
    figure.tight_layout()
    return figure


class EvaluationInputError(ValueError):
    """An evaluation input file that cannot be used; the message names the file, the row or the column."""


def load_labelled_rankings(path: str | Path) -> pl.DataFrame:
    """A labelled-ranking file (JSONL, Parquet or CSV): one row per response with columns `prompt`,
    `response` and `rank` (1 = best; equal ranks are ties), OASST-style. Raises EvaluationInputError naming the file
    and the missing column or the bad row."""
    path = Path(path)
    readers = {".jsonl": pl.read_ndjson, ".parquet": pl.read_parquet, ".csv": pl.read_csv}
    if not path.is_file():
        raise EvaluationInputError(f"{path}: no such labelled-rankings file")
    if path.suffix not in readers:
        raise EvaluationInputError(f"{path}: use .jsonl, .parquet or .csv for labelled rankings")
    table = readers[path.suffix](path)
    missing = [column for column in ("prompt", "response", "rank") if column not in table.columns]
    if missing:
        raise EvaluationInputError(f"{path}: missing column(s) {missing}; expected prompt, response, rank (1 = best)")
    bad = table.with_row_index("row", offset=1).filter(pl.col("rank").cast(pl.Float64, strict=False).is_null())
    if bad.height:
        raise EvaluationInputError(f"{path}: row {bad['row'][0]}: rank must be a number, got {bad['rank'][0]!r}")
    return table.with_columns(pl.col("rank").cast(pl.Float64))


@dataclass(frozen=True)
class Estimate:
    """A statistic with its bootstrap 95% confidence interval (percentile method, resampling prompts)."""

    value: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float]:
        """{"value", "ci_low", "ci_high"}: how estimates are written to JSON and returned by tasks."""
        return {"value": self.value, "ci_low": self.low, "ci_high": self.high}


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
        raise EvaluationInputError("no prompt with a scored response: nothing to compare with the reference ranking")

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


def judge_labelled_responses(rankings: pl.DataFrame, backend, num_judgments: int, sampling, seed: int,
                             verdict_mode: str) -> pl.DataFrame:
    """The judge's scores of labelled responses (load_labelled_rankings' table): each response judged
    num_judgments times with the paper's judge prompt (A.1), its score the mean of the valid ones (null when
    none parsed). Returns the rankings with `score` and `valid_judgments` added, ready for judge_agreement."""
    from metareward.roles import judge_responses
    from metareward.tables import content_id

    labelled = rankings.with_columns(
        pl.col("prompt").map_elements(content_id, return_dtype=pl.String).alias("prompt_id"),
    ).with_columns(
        pl.struct("prompt_id", "response").map_elements(lambda row: content_id(row["prompt_id"], row["response"]),
                                                        return_dtype=pl.String).alias("response_id"),
    )
    prompts = labelled.select("prompt_id", "prompt").unique("prompt_id", maintain_order=True)
    responses = labelled.select("prompt_id", "response_id", pl.col("response").alias("text")).unique(
        "response_id", maintain_order=True)
    judgments, _ = judge_responses(responses, prompts, backend, num_judgments, sampling, seed, verdict_mode,
                                   iteration=0, model_id="evaluation")
    scores = judgments.group_by("response_id").agg(pl.col("score").mean(), pl.col("score").count()
                                                   .alias("valid_judgments"))
    return labelled.join(scores, on="response_id", how="left").drop("prompt_id", "response_id")


def answer_prompts(prompts: Sequence[str], backend, sampling, seed: int) -> list[str]:
    """One answer per prompt from the model behind `backend` (the actor's plain chat prompt, as in
    generate_responses), in prompt order; a prompt too long for the context gets an empty answer."""
    from metareward.roles import generate_responses
    from metareward.tables import content_id

    ids = [content_id(prompt) for prompt in prompts]
    table = pl.DataFrame({"prompt_id": ids, "prompt": list(prompts)}).unique("prompt_id", maintain_order=True)
    answers, _ = generate_responses(table, backend, 1, sampling, seed, iteration=0, model_id="evaluation")
    by_prompt = dict(zip(answers["prompt_id"], answers["text"]))
    return [by_prompt.get(prompt_id, "") for prompt_id in ids]


def alpaca_eval_outputs(prompts: Sequence[str], outputs: Sequence[str], generator: str) -> list[dict[str, str]]:
    """Model answers in AlpacaEval's output format: [{"instruction", "output", "generator"}, …]."""
    if len(prompts) != len(outputs):
        raise ValueError(f"{len(prompts)} prompts but {len(outputs)} outputs")
    return [{"instruction": p, "output": o, "generator": generator} for p, o in zip(prompts, outputs)]


@dataclass(frozen=True)
class AlpacaEvalExport:
    """What export_alpaca_eval wrote: the outputs, and the content digest of the model that answered."""

    outputs: list[dict[str, str]]
    model_digest: str


@contextmanager
def _evaluated_model(config, model_path: str | None):
    """(model URI, its content digest, a started backend serving it) for model_path (default: the seed
    model), the model resolved to a local folder once; the backend is closed on exit."""
    from metareward.inference import create_backend
    from metareward.models import model_digest, resolve_model

    model = model_path or config.model.path
    local = resolve_model(model)
    backend = create_backend(config.model, config.inference, local, seed=config.seed)
    try:
        yield model, model_digest(local), backend
    finally:
        backend.close()


def evaluate_judge_agreement(config, rankings_path: str | Path, model_path: str | None = None,
                             num_judgments: int | None = None, bootstrap: int = 1000) -> dict[str, Estimate]:
    """Judge agreement (sec. 3.4) of model_path (default: the campaign's seed model) with a labelled-ranking
    file, judging with the last iteration's judge sampling and verdict mode, N = num_judgments (default:
    the last iteration's). Logged to MLflow as an evaluation run when tracking is on."""
    settings = config.iterations[-1]
    num_judgments = num_judgments or settings.num_judgments
    rankings = load_labelled_rankings(rankings_path)
    with _evaluated_model(config, model_path) as (model, digest, backend):
        scored = judge_labelled_responses(rankings, backend, num_judgments, settings.judge_sampling, config.seed,
                                          config.inference.verdict_mode)
    estimates = judge_agreement(scored, bootstrap=bootstrap, seed=config.seed)
    metrics = {f"agreement/{name}{suffix}": value for name, estimate in estimates.items()
               for suffix, value in (("", estimate.value), ("_ci_low", estimate.low), ("_ci_high", estimate.high))}
    metrics["agreement/valid_judgment_rate"] = float(scored["valid_judgments"].fill_null(0).sum()) / (
        scored.height * num_judgments)
    _log_evaluation(config, "judge-agreement", model, digest, metrics, rankings_path, scored)
    return estimates


def export_alpaca_eval(config, prompts_path: str | Path, output_path: str | Path, model_path: str | None = None,
                       generator: str | None = None, column: str = "prompt") -> AlpacaEvalExport:
    """Answers of model_path (default: the seed model) to a prompt file, written as AlpacaEval's model
    outputs JSON (instruction, output, generator) for AlpacaEval 2 / Arena-Hard; sampling is the last
    iteration's actor sampling. Logged to MLflow as an evaluation run when tracking is on."""
    import json

    from metareward.tables import load_prompts

    prompts = load_prompts(prompts_path, column).table["prompt"].to_list()
    with _evaluated_model(config, model_path) as (model, digest, backend):
        answers = answer_prompts(prompts, backend, config.iterations[-1].actor_sampling, config.seed)
    outputs = alpaca_eval_outputs(prompts, answers, generator or f"{config.name}-{digest}")
    Path(output_path).write_text(json.dumps(outputs, indent=2, ensure_ascii=False), encoding="utf-8")
    lengths = [len(answer) for answer in answers]
    _log_evaluation(config, "alpaca-eval-export", model, digest,
                    {"export/answers": float(len(answers)), "export/mean_chars": float(np.mean(lengths)) if lengths else 0.0,
                     "export/empty_answers": float(sum(not answer for answer in answers))},
                    prompts_path, pl.DataFrame(outputs))
    return AlpacaEvalExport(outputs, digest)


def _log_evaluation(config, kind: str, model: str, digest: str, metrics: dict[str, float], input_path,
                    results: pl.DataFrame) -> None:
    if config.tracking.enabled:
        from metareward.tracking import Tracker

        Tracker(config).log_evaluation(kind, model, digest, metrics, str(input_path), results)


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
