"""Meta-judge arithmetic (paper sec. 2.2): positional weights, battle matrices and the Elo (Bradley-Terry) fit."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

RIDGE = 1e-6
"""λ of the ridge −λ/2·‖ε‖² added to the log-likelihood: it keeps the maximiser unique and finite when a
judgment never loses (unpenalised, its Elo would run to +∞); a never-losing judgment ends near log(1/λ) ≈ 14.
On data where the unpenalised maximum exists, ε moves by O(λ)."""

_GRADIENT_TOLERANCE = 1e-10
_MAX_NEWTON_STEPS = 100


def positional_weights(win_first: int, win_second: int) -> tuple[float, float]:
    """(ω1, ω2) = (win_2nd, win_1st) / (win_1st + win_2nd); (0.5, 0.5) when both counts are 0.

    A win in the position the meta-judge favours is worth less. Raises ValueError for negative counts.
    """
    if win_first < 0 or win_second < 0:
        raise ValueError(f"win counts must be non-negative, got win_first={win_first}, win_second={win_second}")
    total = win_first + win_second
    if total == 0:
        return 0.5, 0.5
    return win_second / total, win_first / total


def battle_matrix(results: Mapping[tuple[int, int], int], n: int, w1: float, w2: float) -> np.ndarray:
    """The n×n battle matrix B[m, k] = ω1·[r^{mk} = 1] + ω2·[r^{km} = −1].

    results[(m, k)] = r^{mk} is the verdict of the battle with judgment m shown first ("Judgment A") and k
    second: 1 if m won, −1 if k won, 0 for a tie or an unparsed verdict. Missing battles count as 0.
    Raises ValueError for an index outside 0..n−1, a self-battle or a verdict outside {1, −1, 0}.
    """
    matrix = np.zeros((n, n), dtype=np.float64)
    for (first, second), verdict in results.items():
        if not (0 <= first < n and 0 <= second < n) or first == second:
            raise ValueError(f"battle ({first}, {second}) is not a pair of different judgments among {n}")
        if verdict == 1:
            matrix[first, second] += w1
        elif verdict == -1:
            matrix[second, first] += w2
        elif verdict != 0:
            raise ValueError(f"verdict of battle ({first}, {second}) must be 1, -1 or 0, got {verdict}")
    return matrix


def battle_matrices(
    group: np.ndarray,
    first: np.ndarray,
    second: np.ndarray,
    verdict: np.ndarray,
    n_groups: int,
    n: int,
    w1: float,
    w2: float,
) -> np.ndarray:
    """battle_matrix for many prompts at once, from one row per battle: shape (n_groups, n, n).

    Row i is a battle of prompt group[i] with judgment first[i] shown first, second[i] second, and
    verdict[i] = r ∈ {1, −1, 0}. Duplicate battles add up, as in battle_matrix.
    """
    group, first, second, verdict = (np.asarray(a, dtype=np.int64) for a in (group, first, second, verdict))
    if np.any((verdict != 1) & (verdict != -1) & (verdict != 0)):
        raise ValueError("verdicts must be 1, -1 or 0")
    if np.any(first == second) or np.any((first < 0) | (first >= n) | (second < 0) | (second >= n)):
        raise ValueError(f"every battle must be a pair of different judgments among {n}")
    matrices = np.zeros((n_groups, n, n), dtype=np.float64)
    first_won = verdict == 1
    second_won = verdict == -1
    np.add.at(matrices, (group[first_won], first[first_won], second[first_won]), w1)
    np.add.at(matrices, (group[second_won], second[second_won], first[second_won]), w2)
    return matrices


def order_wins(group: np.ndarray, first: np.ndarray, second: np.ndarray,
               verdict: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Both orders of each pair of judgments added up. Rows as battle_matrices takes them (one per battle); returns
    one row per pair (m, n), m < n, of a group with a battle in either order: (group, m, n, wins_m, wins_n), wins_m
    the orders (0–2) m won and wins_n those n won. A tie, an unparsed verdict or a missing order is a win for
    neither, so (1, 1) is a split — each won in one order — and only (2, 0) and (0, 2) agree."""
    group, first, second, verdict = (np.asarray(a, dtype=np.int64) for a in (group, first, second, verdict))
    low, high = np.minimum(first, second), np.maximum(first, second)
    shown_first = first == low
    low_won = np.where(shown_first, verdict == 1, verdict == -1)
    high_won = np.where(shown_first, verdict == -1, verdict == 1)
    pairs, pair_of = np.unique(np.stack([group, low, high], axis=1).reshape(-1, 3), axis=0, return_inverse=True)
    pair_of = pair_of.reshape(-1)
    wins_low = np.bincount(pair_of, weights=low_won, minlength=len(pairs)).astype(np.int64)
    wins_high = np.bincount(pair_of, weights=high_won, minlength=len(pairs)).astype(np.int64)
    return pairs[:, 0], pairs[:, 1], pairs[:, 2], wins_low, wins_high


def agreed_battles(group: np.ndarray, first: np.ndarray, second: np.ndarray, verdict: np.ndarray,
                   split_is_tie: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Battles under agreement of both orders, for battle_matrices with ω1 = ω2 = 1: a pair of judgments (m, n) of a
    group is won by m when m won both orders (r^{mn} = 1 and r^{nm} = −1), by n when n won both (order_wins). A split
    — each won one order — counts for neither, or with split_is_tie as a tie, one win each way (B[m, n] and B[n, m]
    each + 1), as NeMo-Aligner's self-rewarding trainer counts a pair whose two verdicts name the same position.
    Anything else (a tie or unparsed verdict, a missing order) counts for neither. Rows as battle_matrices takes
    them: (group, first, second, verdict) with first < second, verdict 1 (first won) or −1 (second won); a tied pair
    gives one row of each."""
    pair_group, low, high, wins_low, wins_high = order_wins(group, first, second, verdict)
    tied = split_is_tie & (wins_low == 1) & (wins_high == 1)
    low_won = (wins_low == 2) | tied
    high_won = (wins_high == 2) | tied
    won = [np.ones(int(low_won.sum()), dtype=np.int64), -np.ones(int(high_won.sum()), dtype=np.int64)]
    return (np.concatenate([pair_group[low_won], pair_group[high_won]]), np.concatenate([low[low_won], low[high_won]]),
            np.concatenate([high[low_won], high[high_won]]), np.concatenate(won))


def elo_scores(B: np.ndarray) -> np.ndarray:
    """argmax_ε Σ_{m,n} B_mn log σ(ε_m − ε_n) − (λ/2)‖ε‖², natural-log units, mean zero.

    λ = RIDGE (1e-6) makes the maximiser unique and finite even when a judgment never loses; the ridge
    also centres ε, since the likelihood alone only fixes differences. Raises ValueError for a matrix that
    is not square or has negative or non-finite entries.
    """
    matrix = np.asarray(B, dtype=np.float64)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"B must be a square matrix, got shape {matrix.shape}")
    return elo_scores_batch(matrix[None])[0]


def elo_scores_batch(B: np.ndarray, sizes: Sequence[int] | None = None) -> np.ndarray:
    """elo_scores for many prompts in one call: B has shape (P, n, n), the result (P, n).

    Prompts with fewer judgments are padded: sizes[p] is the number of real judgments of prompt p (rows and
    columns beyond it must be zero) and their Elo entries come back as NaN. Solved by damped Newton steps
    on all prompts at once; agrees with elo_scores per prompt.
    """
    matrices = np.asarray(B, dtype=np.float64)
    if matrices.ndim != 3 or matrices.shape[1] != matrices.shape[2]:
        raise ValueError(f"B must have shape (P, n, n), got {matrices.shape}")
    if not np.all(np.isfinite(matrices)) or np.any(matrices < 0):
        raise ValueError("battle matrices must have finite, non-negative entries")
    n_prompts, n, _ = matrices.shape
    real = np.ones((n_prompts, n), dtype=bool)
    if sizes is not None:
        sizes_array = np.asarray(sizes, dtype=np.int64)
        if sizes_array.shape != (n_prompts,) or np.any(sizes_array < 0) or np.any(sizes_array > n):
            raise ValueError(f"sizes must be {n_prompts} counts between 0 and {n}")
        real = np.arange(n)[None, :] < sizes_array[:, None]
        outside = ~(real[:, :, None] & real[:, None, :])
        if np.any(matrices[outside] != 0):
            raise ValueError("battle matrices have non-zero entries beyond their prompt's size")
    elo = _newton(matrices)
    return np.where(real, elo, np.nan)


def _objective(matrices: np.ndarray, elo: np.ndarray) -> np.ndarray:
    difference = elo[:, :, None] - elo[:, None, :]
    log_sigmoid = -np.logaddexp(0.0, -difference)
    return (matrices * log_sigmoid).sum(axis=(1, 2)) - 0.5 * RIDGE * (elo**2).sum(axis=1)


def _gradient_and_hessian(matrices: np.ndarray, elo: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    difference = elo[:, :, None] - elo[:, None, :]
    # d/dε_m of B_mk log σ(ε_m − ε_k) is B_mk σ(ε_k − ε_m); the pair (m, k) pulls m up and k down.
    lose_probability = 1.0 / (1.0 + np.exp(difference))
    pull = matrices * lose_probability
    gradient = pull.sum(axis=2) - pull.sum(axis=1) - RIDGE * elo
    curvature = matrices * lose_probability * (1.0 - lose_probability)
    symmetric = curvature + curvature.transpose(0, 2, 1)
    # Negative Hessian: a weighted graph Laplacian plus the ridge, positive definite.
    negative_hessian = -symmetric
    diagonal = np.arange(elo.shape[1])
    negative_hessian[:, diagonal, diagonal] = symmetric.sum(axis=2) + RIDGE
    return gradient, negative_hessian


def _newton(matrices: np.ndarray) -> np.ndarray:
    n_prompts, n, _ = matrices.shape
    elo = np.zeros((n_prompts, n))
    active = np.ones(n_prompts, dtype=bool)
    for _ in range(_MAX_NEWTON_STEPS):
        subset = matrices[active]
        current = elo[active]
        gradient, negative_hessian = _gradient_and_hessian(subset, current)
        step = np.linalg.solve(negative_hessian, gradient[:, :, None])[:, :, 0]
        # Backtracking: halve each prompt's step until its objective does not decrease (Newton on a
        # logistic likelihood can overshoot when a judgment (almost) never loses).
        start = _objective(subset, current)
        scale = np.ones(len(current))
        for _ in range(40):
            trial = current + scale[:, None] * step
            worse = _objective(subset, trial) < start - 1e-12 * np.abs(start)
            if not worse.any():
                break
            scale[worse] *= 0.5
        current = current + scale[:, None] * step
        elo[active] = current
        converged = np.abs(gradient).max(axis=1) < _GRADIENT_TOLERANCE
        still_active = np.flatnonzero(active)[~converged]
        active = np.zeros(n_prompts, dtype=bool)
        active[still_active] = True
        if not active.any():
            break
    return elo
