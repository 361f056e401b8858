"""Win rate of a trained model against a reference as AlpacaEval 2 computes it: per prompt, the evaluator's verdicts
in both orders (ties and identical answers ½), a bootstrap 95% CI over prompts, and the length-controlled win rate —
the preference regressed on the length difference, read where the lengths are equal."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import polars as pl

RIDGE = 1e-4
"""λ of the ridge (λ/2)‖β‖² on the length regression: it keeps the fit finite when one model wins every
comparison (unpenalised, the intercept runs to ±∞); such a model's LC win rate is then 0.9993 rather than 1."""

_NEWTON_STEPS = 50


@dataclass(frozen=True)
class WinRates:
    """Win rate and length-controlled win rate of the trained model (shares in 0..1), each with its bootstrap 95%
    CI, over `prompts` prompts that have at least one parsed verdict."""

    win_rate: float
    win_rate_ci: tuple[float, float]
    lc_win_rate: float
    lc_win_rate_ci: tuple[float, float]
    prompts: int

    def as_counts(self) -> dict[str, float]:
        """The figures as flat statistics (win_rate, win_rate_ci_low, …, lc_win_rate_ci_high, prompts_compared)."""
        return {"win_rate": self.win_rate, "win_rate_ci_low": self.win_rate_ci[0],
                "win_rate_ci_high": self.win_rate_ci[1], "lc_win_rate": self.lc_win_rate,
                "lc_win_rate_ci_low": self.lc_win_rate_ci[0], "lc_win_rate_ci_high": self.lc_win_rate_ci[1],
                "prompts_compared": float(self.prompts)}


def win_rates(comparisons: pl.DataFrame, bootstrap: int = 1000, seed: int = 0) -> WinRates | None:
    """Win rates from one row per comparison: `prompt_id`, `preference` (the trained model's share of the verdict:
    1 it won, 0 it lost, ½ identical answers; null or NaN when the verdict did not parse — left out),
    `trained_chars` and `reference_chars`.

    The win rate is the mean over prompts of each prompt's mean preference (its two orders: a split verdict is a
    tie, ½). The length-controlled win rate fits logit P(trained preferred) = θ + φ·tanh(Δ/σ) on the comparisons
    (fractional targets; Δ = trained − reference characters, σ its standard deviation over the compared prompts,
    AlpacaEval 2's length feature without its per-instruction term) and reports σ(θ), the win rate at Δ = 0.
    CIs: percentiles 2.5 and 97.5 of `bootstrap` resamples of prompts. None when no verdict parsed. Raises
    ValueError for bootstrap < 1."""
    if bootstrap < 1:
        raise ValueError(f"bootstrap must be at least 1 resample, got {bootstrap}")
    parsed = comparisons.filter(pl.col("preference").is_not_null() & pl.col("preference").is_not_nan())
    if parsed.is_empty():
        return None
    grouped = parsed.group_by("prompt_id", maintain_order=True).agg(
        "preference", (pl.col("trained_chars") - pl.col("reference_chars")).cast(pl.Float64).alias("delta"))
    preferences = [np.asarray(values, dtype=np.float64) for values in grouped["preference"]]
    deltas = [np.asarray(values, dtype=np.float64) for values in grouped["delta"]]
    spread = float(np.std(np.concatenate(deltas)))

    def estimate(indices: np.ndarray) -> tuple[float, float]:
        targets = np.concatenate([preferences[i] for i in indices])
        lengths = np.concatenate([deltas[i] for i in indices])
        feature = np.tanh(lengths / spread) if spread > 0 else np.zeros_like(lengths)
        return float(np.mean([preferences[i].mean() for i in indices])), length_controlled(targets, feature)

    point = estimate(np.arange(len(preferences)))
    rng = np.random.default_rng(seed)
    samples = np.array([estimate(rng.integers(0, len(preferences), len(preferences))) for _ in range(bootstrap)])
    low, high = np.percentile(samples, [2.5, 97.5], axis=0)
    return WinRates(point[0], (float(low[0]), float(high[0])), point[1], (float(low[1]), float(high[1])),
                    len(preferences))


def length_controlled(targets: np.ndarray, feature: np.ndarray) -> float:
    """σ(θ) of the ridge-penalised fractional logistic regression logit p = θ + φ·feature on targets in [0, 1]
    (Newton's method on the mean cross-entropy + (RIDGE/2)(θ² + φ²)): the preference at feature 0."""
    design = np.column_stack([np.ones_like(feature), feature])
    beta = np.zeros(2)
    for _ in range(_NEWTON_STEPS):
        predicted = 1.0 / (1.0 + np.exp(-(design @ beta)))
        gradient = design.T @ (predicted - targets) / len(targets) + RIDGE * beta
        weights = predicted * (1.0 - predicted)
        hessian = (design * weights[:, None]).T @ design / len(targets) + RIDGE * np.eye(2)
        step = np.linalg.solve(hessian, gradient)
        beta -= step
        if np.max(np.abs(step)) < 1e-10:
            break
    return float(1.0 / (1.0 + np.exp(-beta[0])))
