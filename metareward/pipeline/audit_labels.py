"""A person's labels on an iteration's audited judgments (`metareward audit label`): read and checked against the
audit's label template, kept in the store beside the audit, and the judge's agreement with them, with bootstrap 95%
CIs over prompts as `evaluate agreement` computes them."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import polars as pl

from metareward.artifacts.store import ArtifactStore
from metareward.pipeline.audit import audit_keys
from metareward.pipeline.evaluation import Estimate, bootstrap_estimates, judge_agreement
from metareward.pipeline.input_files import InputFileError
from metareward.pipeline.manifests import stage_manifests

VERDICT_LABELS = {"right": True, "wrong": False}
"""A label that says whether the judgment is right; any other label is the 0–5 score it should have given."""


def load_labels(path: str | Path, template: pl.DataFrame) -> pl.DataFrame:
    """The labelled rows of `path` (CSV, or JSONL with the same fields: judgment_id, label — right / wrong, or a
    0–5 score), joined to the audit's template (prompt_id, response_id, judge_score). Rows with an empty label are
    skipped (a person may label some judgments only). InputFileError naming the file, row and field for a missing
    column, a judgment that is not in the audit, a judgment labelled twice, a label that is neither right / wrong nor
    a score in [0, 5], and a file with no label at all."""
    path = Path(path)
    try:
        table = (pl.read_ndjson(path) if path.suffix in (".jsonl", ".json") else pl.read_csv(path, infer_schema=False))
    except (OSError, pl.exceptions.PolarsError) as error:
        raise InputFileError(f"{path}: cannot read the labels ({error})") from None
    missing = [column for column in ("judgment_id", "label") if column not in table.columns]
    if missing:
        raise InputFileError(f"{path}: no column {', '.join(missing)} (the label template has judgment_id, prompt_id, "
                             "response_id, judge_score, label)")
    table = table.select(pl.col("judgment_id").cast(pl.String), pl.col("label").cast(pl.String).str.strip_chars()
                         .str.to_lowercase()).with_row_index("row", offset=2 if path.suffix == ".csv" else 1)
    table = table.filter(pl.col("label").is_not_null() & (pl.col("label") != ""))
    if not table.height:
        raise InputFileError(f"{path}: no judgment is labelled (fill the label column with right, wrong or a 0–5 "
                             "score)")
    unknown = table.join(template, on="judgment_id", how="anti")
    if unknown.height:
        row = unknown.row(0, named=True)
        raise InputFileError(f"{path}: row {row['row']}, judgment_id {row['judgment_id']!r} is not one of the audited "
                             f"judgments (its label template lists them){_more(unknown)}")
    repeated = table.filter(~pl.col("judgment_id").is_first_distinct())
    if repeated.height:
        row = repeated.row(0, named=True)
        raise InputFileError(f"{path}: row {row['row']}, judgment_id {row['judgment_id']!r} is labelled twice")
    score = pl.col("label").cast(pl.Float64, strict=False)
    bad = table.filter(~pl.col("label").is_in(list(VERDICT_LABELS)) & (score.is_null() | ~score.is_between(0, 5)))
    if bad.height:
        row = bad.row(0, named=True)
        raise InputFileError(f"{path}: row {row['row']}, field label {row['label']!r} is neither right / wrong nor a "
                             f"score from 0 to 5{_more(bad)}")
    return table.join(template.drop("label", strict=False), on="judgment_id").with_columns(
        pl.col("judge_score").cast(pl.Float64, strict=False).fill_nan(None),
        pl.col("label").replace_strict(VERDICT_LABELS, default=None, return_dtype=pl.Boolean).alias("judge_right"),
        score.alias("label_score"))


def _more(rows: pl.DataFrame) -> str:
    return f" ({rows.height - 1} more such row(s))" if rows.height > 1 else ""


def label_agreement(labels: pl.DataFrame, bootstrap: int = 1000, seed: int = 0) -> dict[str, Estimate]:
    """The judge's agreement with a person's labels (load_labels), each with a bootstrap 95% CI resampling prompts:
    `agreement`, the share of labelled judgments the person agrees with (marked right, or given the judge's own
    score); `right_share` over the right / wrong labels; `score_exact` and `score_abs_error` over the score labels
    (an invalid judge score is never exact, and is left out of the error); and, where one response has judgments
    the person scored differently, `order_agreement` of the judge's scores with the person's order (evaluate
    agreement's statistic, per response). Statistics without their labels are left out."""
    agrees = pl.coalesce(pl.col("judge_right"), (pl.col("judge_score") == pl.col("label_score")).fill_null(False))
    table = labels.with_columns(agrees.alias("agrees"), (pl.col("judge_score") - pl.col("label_score")).abs()
                                .alias("abs_error"))
    by_prompt = [group for _, group in table.group_by("prompt_id", maintain_order=True)]

    def statistics(groups: list[pl.DataFrame]) -> tuple[float, ...]:
        rows = pl.concat(groups)
        verdicts, scores = rows.filter(pl.col("judge_right").is_not_null()), rows.filter(pl.col("label_score")
                                                                                         .is_not_null())
        return (float(rows["agrees"].mean()), _mean(verdicts["judge_right"]), _mean(scores["agrees"]),
                _mean(scores["abs_error"]))

    estimates = bootstrap_estimates(by_prompt, statistics, ("agreement", "right_share", "score_exact",
                                                            "score_abs_error"), bootstrap, seed)
    estimates = {name: estimate for name, estimate in estimates.items() if not np.isnan(estimate.value)}
    scored = table.filter(pl.col("label_score").is_not_null())
    ordered = scored.group_by("response_id").agg(pl.col("label_score").n_unique() > 1)["label_score"].any()
    if scored.height and ordered:
        ranking = scored.select(pl.col("response_id").alias("prompt"), (5 - pl.col("label_score")).alias("rank"),
                                pl.col("judge_score").alias("score"))
        estimates["order_agreement"] = judge_agreement(ranking, bootstrap, seed)["agreement"]
    return estimates


def _mean(values: pl.Series) -> float:
    """The mean of the values that are there (nulls left out); NaN when there is none."""
    mean = values.cast(pl.Float64).mean()
    return float("nan") if mean is None else float(mean)


def keep_labels(store: ArtifactStore, campaign: str, iteration: int, labels: pl.DataFrame,
                estimates: dict[str, Estimate]) -> str:
    """Keep the labels (audit/labels.csv) and the agreement (audit/agreement.json) beside iteration t's audit;
    returns the labels' URI."""
    keys = audit_keys(campaign, iteration)
    buffer = io.BytesIO()
    labels.drop("row").write_csv(buffer)
    store.write_bytes(keys["labels"], buffer.getvalue())
    store.write_json(keys["agreement"],
                     {"labels": labels.height, **{name: estimate.as_dict() for name, estimate in estimates.items()}})
    return store.uri(keys["labels"])


def agreement_by_iteration(store: ArtifactStore, campaign: str) -> dict[int, dict]:
    """The agreement kept for each labelled iteration of the campaign (keep_labels), by iteration."""
    found = {}
    for iteration in stage_manifests(store, campaign):
        key = audit_keys(campaign, iteration)["agreement"]
        if store.exists(key):
            found[iteration] = store.read_json(key)
    return found
