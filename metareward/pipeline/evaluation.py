"""Evaluating a model outside the iterations: judge agreement with labelled rankings (paper sec. 3.4, Table 7)
with bootstrap confidence intervals, and answers in AlpacaEval's format."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
from scipy.stats import spearmanr

from metareward.pipeline.input_files import InputFileError, load_prompts, read_rows


class EvaluationInputError(InputFileError):
    """An evaluation input file that cannot be used; the message names the file, the row or the column."""


def load_labelled_rankings(path: str | Path) -> pl.DataFrame:
    """A labelled-ranking file (JSONL, Parquet or CSV): one row per response with columns `prompt`,
    `response` and `rank` (1 = best; equal ranks are ties), OASST-style. Raises EvaluationInputError naming the
    file and the line, the missing column or the bad row, and when no prompt has two responses of different
    ranks (nothing to compare)."""
    table = read_rows(path, ("prompt", "response"), "labelled-rankings file", EvaluationInputError,
                      hint="expected prompt, response, rank (1 = best)", numbers=("rank",))
    if not table.group_by("prompt").agg(pl.col("rank").n_unique() > 1)["rank"].any():
        raise EvaluationInputError(f"{path}: nothing to compare: no prompt has two responses of different ranks "
                                   "(agreement compares a judge's order of a prompt's responses with the reference's)")
    return table


@dataclass(frozen=True)
class Estimate:
    """A statistic with its bootstrap 95% confidence interval (percentile method, resampling prompts)."""

    value: float
    low: float
    high: float

    def as_dict(self) -> dict[str, float]:
        """{"value", "ci_low", "ci_high"}: how estimates are written to JSON and returned by tasks."""
        return {"value": self.value, "ci_low": self.low, "ci_high": self.high}


def check_bootstrap(bootstrap: int) -> None:
    """Raise ValueError unless bootstrap is a positive number of resamples (a CI needs at least one)."""
    if isinstance(bootstrap, bool) or not isinstance(bootstrap, int) or bootstrap < 1:
        raise ValueError(f"bootstrap must be a positive number of resamples, got {bootstrap!r}")


def judge_agreement(table: pl.DataFrame, bootstrap: int = 1000, seed: int = 0) -> dict[str, Estimate]:
    """Agreement of predicted scores with reference ranks (paper sec. 3.4, Table 7).

    `table` has one row per response: `prompt`, `rank` (reference, 1 = best) and `score` (the mean of the
    judge's N valid scores). For every pair of responses of a prompt that the reference orders strictly:
    agreement counts 1 when the predicted scores order them the same way, 0.5 for a predicted tie, 0
    otherwise; `agreement_without_ties` leaves predicted ties out. `spearman` is the mean over prompts of
    the Spearman correlation between scores and reference ranks (prompts where either side is constant
    are left out). A null or NaN score is missing. Confidence intervals resample prompts with replacement
    `bootstrap` times; ValueError for bootstrap < 1, before anything is computed.
    """
    check_bootstrap(bootstrap)
    per_prompt = []
    scored = table.filter(pl.col("score").is_not_null() & pl.col("score").is_not_nan())
    for _, group in scored.group_by("prompt", maintain_order=True):
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

    def statistics(prompts: list) -> tuple[float, float, float]:
        credits = np.concatenate([credit for credit, _, _ in prompts])
        decided = np.concatenate([decided for _, decided, _ in prompts])
        rhos = np.array([rho for _, _, rho in prompts])
        return (
            float(credits.mean()) if credits.size else np.nan,
            float(credits[decided].mean()) if decided.any() else np.nan,
            float(np.nanmean(rhos)) if np.isfinite(rhos).any() else np.nan,
        )

    return bootstrap_estimates(per_prompt, statistics, ("agreement", "agreement_without_ties", "spearman"),
                               bootstrap, seed)


def bootstrap_estimates(groups: Sequence, statistics: Callable[[list], Sequence[float]], names: Sequence[str],
                        bootstrap: int, seed: int) -> dict[str, Estimate]:
    """Each of the statistics (`statistics(groups)` returns one value per name) with its bootstrap 95% CI: the
    groups (prompts) resampled with replacement `bootstrap` times (numpy's generator seeded with `seed`), the
    percentiles 2.5 and 97.5 of the resamples' values, NaN ones left out. ValueError for bootstrap < 1."""
    check_bootstrap(bootstrap)
    groups = list(groups)
    point = statistics(groups)
    rng = np.random.default_rng(seed)
    samples = np.array([statistics([groups[k] for k in rng.integers(0, len(groups), len(groups))])
                        for _ in range(bootstrap)], dtype=float)
    with warnings.catch_warnings():  # a statistic NaN in every resample has a NaN interval, said by its value
        warnings.simplefilter("ignore", RuntimeWarning)
        return {name: Estimate(float(point[k]), float(np.nanpercentile(samples[:, k], 2.5)),
                               float(np.nanpercentile(samples[:, k], 97.5))) for k, name in enumerate(names)}


def judge_labelled_responses(rankings: pl.DataFrame, backend, num_judgments: int, sampling, seed: int,
                             verdict_mode: str) -> pl.DataFrame:
    """The judge's scores of labelled responses (load_labelled_rankings' table): each response judged
    num_judgments times with the paper's judge prompt (A.1), its score the mean of the valid ones (null when
    none parsed). Returns the rankings with `score` and `valid_judgments` added, ready for judge_agreement."""
    from metareward.artifacts.tables import content_id
    from metareward.inference.roles import judge_responses

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
    from metareward.artifacts.tables import content_id
    from metareward.inference.roles import generate_responses

    ids = [content_id(prompt) for prompt in prompts]
    table = pl.DataFrame({"prompt_id": ids, "prompt": list(prompts)}).unique("prompt_id", maintain_order=True)
    answers, _ = generate_responses(table, backend, 1, sampling, seed, iteration=0, model_id="evaluation")
    by_prompt = dict(zip(answers["prompt_id"], answers["text"], strict=True))
    return [by_prompt.get(prompt_id, "") for prompt_id in ids]


def alpaca_eval_outputs(prompts: Sequence[str], outputs: Sequence[str], generator: str) -> list[dict[str, str]]:
    """Model answers in AlpacaEval's output format: [{"instruction", "output", "generator"}, …]."""
    if len(prompts) != len(outputs):
        raise ValueError(f"{len(prompts)} prompts but {len(outputs)} outputs")
    return [{"instruction": p, "output": o, "generator": generator} for p, o in zip(prompts, outputs, strict=True)]


@dataclass(frozen=True)
class EvaluationResult:
    """One finished evaluation of a model: which kind, the model (URI and content digest), its metrics, the
    input file it read and its per-row results — what tracking.log_evaluation records as an MLflow run."""

    kind: str
    model_uri: str
    model_digest: str
    metrics: dict[str, float]
    input_path: str
    rows: pl.DataFrame


@contextmanager
def evaluated_model(config, model_path: str | None):
    """(model URI, its content digest, a started backend serving it) for model_path (default: the seed
    model), the model resolved to a local folder once; the backend is closed on exit."""
    from metareward.inference.engines import create_backend
    from metareward.training.models import model_digest, resolve_model

    model = model_path or config.model.path
    local = resolve_model(model)
    backend = create_backend(config.model, config.inference, local, seed=config.seed)
    try:
        yield model, model_digest(local), backend
    finally:
        backend.close()


def default_model_name(campaign: str, digest: str) -> str:
    """CAMPAIGN-DIGEST: the name an exported model's answers carry unless the user gives one (AlpacaEval's
    generator, Arena-Hard's model id)."""
    return f"{campaign}-{digest}"


def evaluate_judge_agreement(config, rankings_path: str | Path, model_path: str | None = None,
                             num_judgments: int | None = None,
                             bootstrap: int = 1000) -> tuple[dict[str, Estimate], EvaluationResult]:
    """Judge agreement (sec. 3.4) of model_path (default: the campaign's seed model) with a labelled-ranking
    file, judging with the last iteration's judge sampling and verdict mode, N = num_judgments (default:
    the last iteration's). Returns the estimates and the evaluation (metrics, scored rows) to log. A bootstrap
    below 1 raises ValueError before any model is loaded."""
    check_bootstrap(bootstrap)
    settings = config.iterations[-1]
    num_judgments = num_judgments or settings.num_judgments
    rankings = load_labelled_rankings(rankings_path)
    with evaluated_model(config, model_path) as (model, digest, backend):
        scored = judge_labelled_responses(rankings, backend, num_judgments, settings.judge_sampling, config.seed,
                                          config.inference.verdict_mode)
    estimates = judge_agreement(scored, bootstrap=bootstrap, seed=config.seed)
    metrics = {f"agreement/{name}{suffix}": value for name, estimate in estimates.items()
               for suffix, value in (("", estimate.value), ("_ci_low", estimate.low), ("_ci_high", estimate.high))}
    metrics["agreement/valid_judgment_rate"] = float(scored["valid_judgments"].fill_null(0).sum()) / (
        scored.height * num_judgments)
    return estimates, EvaluationResult("judge-agreement", model, digest, metrics, str(rankings_path), scored)


def export_alpaca_eval(config, prompts_path: str | Path, output_path: str | Path, model_path: str | None = None,
                       generator: str | None = None, column: str = "prompt") -> EvaluationResult:
    """Answers of model_path (default: the seed model) to a prompt file, written as AlpacaEval's model
    outputs JSON (instruction, output, generator) for AlpacaEval 2 (Arena-Hard reads its own format:
    arena_hard.export_arena_hard); sampling is the last iteration's actor sampling. Returns the evaluation to log,
    its rows the outputs written."""
    prompts = load_prompts(prompts_path, column, "--column").table["prompt"].to_list()
    with evaluated_model(config, model_path) as (model, digest, backend):
        answers = answer_prompts(prompts, backend, config.iterations[-1].actor_sampling, config.seed)
    outputs = alpaca_eval_outputs(prompts, answers, generator or default_model_name(config.name, digest))
    Path(output_path).write_text(json.dumps(outputs, indent=2, ensure_ascii=False), encoding="utf-8")
    lengths = [len(answer) for answer in answers]
    metrics = {"export/answers": float(len(answers)), "export/mean_chars": float(np.mean(lengths)) if lengths else 0.0,
               "export/empty_answers": float(sum(not answer for answer in answers))}
    return EvaluationResult("alpaca-eval-export", model, digest, metrics, str(prompts_path),
                            pl.DataFrame(outputs, schema={"instruction": pl.String, "output": pl.String,
                                                          "generator": pl.String}))
