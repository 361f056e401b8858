"""Preference selection: length-controlled actor pairs (sec. 2.1), judged response and judge pairs (sec. 2.2)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SCORE_TOLERANCE = 1e-9
"""Scores are means of floats: values closer than this (relative to the score range) count as equal."""


def _as_finite(values: Sequence[float], name: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    if not np.all(np.isfinite(array)):
        bad = int(np.flatnonzero(~np.isfinite(array))[0])
        raise ValueError(f"{name}[{bad}] is {array[bad]}: drop unscored items before selection")
    return array


def _same_length(first: np.ndarray, lengths: Sequence[int], name: str) -> np.ndarray:
    lengths_array = np.asarray(lengths, dtype=np.int64)
    if lengths_array.shape != first.shape:
        raise ValueError(f"{name} has {first.size} entries but lengths has {lengths_array.size}")
    return lengths_array


def select_actor_pair(scores: Sequence[float], lengths: Sequence[int], rho: float) -> tuple[int, int] | None:
    """Indices (chosen, rejected) of the length-controlled actor pair of one prompt (paper sec. 2.1).

    Top tier: scores in [(1-ρ)S_max + ρS_min, S_max]; chosen = its shortest response.
    Bottom tier: scores in [S_min, (1-ρ)S_min + ρS_max]; rejected = its longest response.
    Equal lengths are resolved towards the better score for chosen (the worse for rejected), then the lower
    index, so the result is deterministic. ρ = 0 is pure score selection. Returns None when fewer than two
    responses are given or S_max == S_min (no preference). Raises ValueError for ρ outside [0, 0.5), where
    the tiers could overlap, for non-finite scores, or for mismatched lengths.
    """
    if not 0.0 <= rho < 0.5:
        raise ValueError(f"rho must be in [0, 0.5) so that the tiers do not overlap, got {rho}")
    score_array = _as_finite(scores, "scores")
    length_array = _same_length(score_array, lengths, "scores")
    if score_array.size < 2:
        return None
    s_max, s_min = float(score_array.max()), float(score_array.min())
    tolerance = SCORE_TOLERANCE * max(1.0, abs(s_max), abs(s_min))
    if s_max - s_min <= tolerance:
        return None
    top = np.flatnonzero(score_array >= (1 - rho) * s_max + rho * s_min - tolerance)
    bottom = np.flatnonzero(score_array <= (1 - rho) * s_min + rho * s_max + tolerance)
    # np.lexsort sorts by the last key first; ties then fall to the lower index (stable sort).
    chosen = top[np.lexsort((-score_array[top], length_array[top]))[0]]
    rejected = bottom[np.lexsort((score_array[bottom], -length_array[bottom]))[0]]
    return int(chosen), int(rejected)


def _random_argmax(values: np.ndarray, rng: np.random.Generator) -> int:
    tolerance = SCORE_TOLERANCE * max(1.0, float(np.abs(values).max()))
    best = np.flatnonzero(values >= values.max() - tolerance)
    return int(best[0]) if best.size == 1 else int(rng.choice(best))


def select_judged_response(variances: Sequence[float], rng: np.random.Generator) -> int:
    """Index of the response with the highest score variance (paper sec. 2.2); ties broken at random by rng.

    Raises ValueError for an empty or non-finite input: responses with fewer than two valid judgments
    have no variance and cannot be meta-judged, so the caller leaves them out.
    """
    variance_array = _as_finite(variances, "variances")
    if variance_array.size == 0:
        raise ValueError("variances is empty: a prompt needs at least one response with two valid judgments")
    return _random_argmax(variance_array, rng)


def select_judge_pair(
    elo: Sequence[float], lengths: Sequence[int], max_chosen_length: int | None, rng: np.random.Generator
) -> tuple[int, int] | None:
    """Indices (chosen, rejected) of the judge pair: highest and lowest Elo, ties at random (paper sec. 2.2).

    Returns None when fewer than two judgments are given, when all Elo scores are equal, or when the
    chosen judgment is longer than max_chosen_length characters (the paper's judge-length filter; None
    disables it).
    """
    elo_array = _as_finite(elo, "elo")
    length_array = _same_length(elo_array, lengths, "elo")
    if elo_array.size < 2:
        return None
    tolerance = SCORE_TOLERANCE * max(1.0, float(np.abs(elo_array).max()))
    if elo_array.max() - elo_array.min() <= tolerance:
        return None
    chosen = _random_argmax(elo_array, rng)
    rejected = _random_argmax(-elo_array, rng)
    if max_chosen_length is not None and length_array[chosen] > max_chosen_length:
        return None
    return chosen, rejected
