"""Win rate of a trained model against a reference as AlpacaEval 2 computes it (alpaca_eval 0.6.6's `get_winrate`
and `get_length_controlled_winrate` with the `length_controlled_minimal` GLM), plus our bootstrap CIs over prompts."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import polars as pl

LC_FOLDS = 5
"""AlpacaEval's cross-validation folds for the LC GLM's penalty strength (GroupKFold, one group per annotation)."""
LC_STRENGTHS = np.logspace(-4, 4, 10)
"""The inverse L1 strengths C the fit chooses among (LogisticRegressionCV's default grid, as AlpacaEval uses it)."""
_LC_RANDOM_STATE = 123


@dataclass(frozen=True)
class WinRates:
    """AlpacaEval 2's head-to-head figures of the trained model, as shares in 0..1 (AlpacaEval prints them ×100).

    win_rate: AlpacaEval's `win_rate`, the mean preference over parsed annotations (a preference is the trained
    answer's probability share, ½ for identical answers); win_rate_standard_error: its `standard_error` (pandas'
    sem); discrete_win_rate: its `discrete_win_rate` (each annotation rounded to a win, a loss or a draw);
    lc_win_rate: its `length_controlled_winrate` with the `length_controlled_minimal` GLM (held-out prompts have no
    AlpacaEval instruction difficulty), None where AlpacaEval's fit is not defined, `lc_undefined` saying why.
    The *_ci intervals are ours, not AlpacaEval's: percentiles 2.5 and 97.5 over bootstrap resamples of prompts (the
    LC's refitted at the penalty strength chosen on all annotations)."""

    win_rate: float
    win_rate_standard_error: float
    win_rate_ci: tuple[float, float]
    discrete_win_rate: float
    lc_win_rate: float | None
    lc_win_rate_ci: tuple[float, float] | None
    lc_undefined: str | None
    annotations: int
    wins: int
    losses: int
    draws: int
    prompts: int

    def as_counts(self) -> dict[str, float | str]:
        """The figures as flat statistics (win_rate, win_rate_standard_error, win_rate_ci_low, win_rate_ci_high,
        discrete_win_rate, lc_win_rate with its CI — or lc_win_rate_undefined, the reason —, annotations, wins,
        losses, draws, prompts_compared)."""
        counts: dict[str, float | str] = {
            "win_rate": self.win_rate, "win_rate_standard_error": self.win_rate_standard_error,
            "win_rate_ci_low": self.win_rate_ci[0], "win_rate_ci_high": self.win_rate_ci[1],
            "discrete_win_rate": self.discrete_win_rate, "annotations": float(self.annotations),
            "wins": float(self.wins), "losses": float(self.losses), "draws": float(self.draws),
            "prompts_compared": float(self.prompts)}
        if self.lc_win_rate is None:
            counts["lc_win_rate_undefined"] = self.lc_undefined or ""
        else:
            counts["lc_win_rate"] = self.lc_win_rate
            if self.lc_win_rate_ci is not None:
                counts["lc_win_rate_ci_low"], counts["lc_win_rate_ci_high"] = self.lc_win_rate_ci
        return counts


def win_rates(comparisons: pl.DataFrame, bootstrap: int = 1000, seed: int = 0) -> WinRates | None:
    """AlpacaEval 2's win rates from one row per annotation (both orders of every prompt): `prompt_id`,
    `preference` (the trained answer's share in 0..1; null or NaN when the verdict did not parse — left out, as
    AlpacaEval drops unparsed annotations), `trained_chars` and `reference_chars`.

    The LC win rate is undefined (None, with the reason) with fewer than LC_FOLDS annotations or when every
    annotation's length difference is the same (AlpacaEval divides by its standard deviation). The bootstrap CIs
    resample prompts with replacement `bootstrap` times (a resample whose LC is undefined is left out; each LC refit
    keeps the penalty strength chosen on all annotations — cross-validating every resample would cost 51 fits
    each). None when no
    verdict parsed; ValueError for bootstrap < 1."""
    if bootstrap < 1:
        raise ValueError(f"bootstrap must be at least 1 resample, got {bootstrap}")
    rows = comparisons.select(
        "prompt_id", pl.col("preference").fill_nan(None),
        (pl.col("trained_chars") - pl.col("reference_chars")).cast(pl.Float64).alias("delta"))
    parsed = rows.filter(pl.col("preference").is_not_null())
    if parsed.is_empty():
        return None
    preference, delta = parsed["preference"].to_numpy(), rows["delta"].to_numpy()
    spread = float(np.std(delta, ddof=1)) if delta.size > 1 else float("nan")
    feature = np.tanh(parsed["delta"].to_numpy() / spread) if spread > 0 else None
    undefined = _lc_undefined(preference.size, spread)
    strength = None if undefined else lc_strength(preference, feature)
    lc = None if undefined else length_controlled(preference, feature, strength)

    prompt_of = parsed["prompt_id"].to_numpy()
    prompt_ids, groups = np.unique(prompt_of, return_inverse=True)
    members = [np.flatnonzero(groups == group) for group in range(len(prompt_ids))]
    rng = np.random.default_rng(seed)
    win_samples, lc_samples = [], []
    for _ in range(bootstrap):
        chosen = np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))])
        win_samples.append(preference[chosen].mean())
        if lc is not None and np.ptp(feature[chosen]) > 0 and chosen.size >= LC_FOLDS:
            lc_samples.append(length_controlled(preference[chosen], feature[chosen], strength))
    return WinRates(
        win_rate=float(preference.mean()),
        win_rate_standard_error=float(np.std(preference, ddof=1) / np.sqrt(preference.size))
        if preference.size > 1 else float("nan"),
        win_rate_ci=_percentiles(win_samples),
        discrete_win_rate=float(np.mean(np.where(preference == 0.5, 0.5, np.round(preference)))),
        lc_win_rate=lc, lc_win_rate_ci=_percentiles(lc_samples) if lc is not None and lc_samples else None,
        lc_undefined=undefined, annotations=int(preference.size), wins=int((preference > 0.5).sum()),
        losses=int((preference < 0.5).sum()), draws=int((preference == 0.5).sum()), prompts=len(prompt_ids))


def length_controlled(preference: np.ndarray, feature: np.ndarray, strength: float | None = None) -> float:
    """AlpacaEval's length-controlled win rate from annotations' preferences in 0..1 and their length feature
    tanh(Δ/sd(Δ)): the logistic GLM logit p = w₀ + w₁·feature with no intercept term other than the baseline
    indicator w₀, fitted to the fractional targets (each annotation twice, as label 1 weighted p and label 0
    weighted 1 − p) under an L1 penalty of inverse strength `strength` (default: lc_strength's choice, as
    AlpacaEval's LogisticRegressionCV refits with it); returns σ(w₀), the preference at Δ = 0."""
    design, labels, weights = _doubled(preference, feature)
    chosen = lc_strength(preference, feature) if strength is None else strength
    coefficients = _fit(design, labels, weights, chosen).coef_[0]
    return float(1.0 / (1.0 + np.exp(-coefficients[0])))


def lc_strength(preference: np.ndarray, feature: np.ndarray) -> float:
    """The inverse L1 strength AlpacaEval's LC fit uses: the one of LC_STRENGTHS with the least log loss of the
    fractional targets summed over LC_FOLDS-fold cross-validation grouped by annotation (the first on a tie)."""
    from sklearn.model_selection import GroupKFold

    design, labels, weights = _doubled(preference, feature)
    groups = np.tile(np.arange(len(preference)), 2)
    losses = np.zeros(len(LC_STRENGTHS))
    for train, test in GroupKFold(n_splits=LC_FOLDS).split(design, labels, groups):
        target = np.where(labels[test] == 1, weights[test], 1.0 - weights[test])
        for index, strength in enumerate(LC_STRENGTHS):
            predicted = _fit(design[train], labels[train], weights[train], strength).predict_proba(design[test])[:, 1]
            losses[index] += _log_loss(target, predicted)
    return float(LC_STRENGTHS[int(np.argmin(losses))])


def _doubled(preference: np.ndarray, feature: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(design [1, feature], label, weight) with every annotation twice: label 1 weighted p, label 0 weighted 1 − p."""
    design = np.column_stack([np.ones_like(feature), feature])
    return (np.concatenate([design, design]), np.concatenate([np.ones(len(design)), np.zeros(len(design))]),
            np.concatenate([preference, 1.0 - preference]))


def _fit(design: np.ndarray, labels: np.ndarray, weights: np.ndarray, strength: float):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=strength, l1_ratio=1.0, solver="liblinear", fit_intercept=False,
                               random_state=_LC_RANDOM_STATE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit(design, labels, sample_weight=weights)


def _log_loss(target: np.ndarray, predicted: np.ndarray) -> float:
    """Mean cross-entropy of fractional targets, predictions clipped as AlpacaEval clips them (1e-15)."""
    predicted = np.clip(predicted, 1e-15, 1 - 1e-15)
    return float(-np.mean(target * np.log(predicted) + (1 - target) * np.log(1 - predicted)))


def _lc_undefined(annotations: int, spread: float) -> str | None:
    if annotations < LC_FOLDS:
        return (f"{annotations} parsed annotation(s): AlpacaEval's length-controlled fit needs at least {LC_FOLDS} "
                f"(its {LC_FOLDS}-fold cross-validation)")
    if not spread > 0:
        return "every answer pair has the same length difference: AlpacaEval's length feature divides by its spread"
    return None


def _percentiles(samples: list[float]) -> tuple[float, float]:
    low, high = np.percentile(samples, [2.5, 97.5])
    return float(low), float(high)
