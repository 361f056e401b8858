"""Positional weights, battle matrices and the Elo fit (paper sec. 2.2), against hand-computed cases."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize

from metareward.paper.elo import (
    agreed_battles,
    battle_matrices,
    battle_matrix,
    elo_scores,
    elo_scores_batch,
    order_wins,
    positional_weights,
)


def test_positional_weights_hand_computed():
    # win_1st = 3, win_2nd = 1: ω1 = 1/4, ω2 = 3/4 — a win in the favoured first position is worth less.
    assert positional_weights(3, 1) == (0.25, 0.75)
    assert positional_weights(0, 0) == (0.5, 0.5)
    assert positional_weights(0, 4) == (1.0, 0.0)
    with pytest.raises(ValueError):
        positional_weights(-1, 2)


@given(st.integers(0, 10_000), st.integers(0, 10_000))
def test_positional_weights_sum_to_one(win_first, win_second):
    w1, w2 = positional_weights(win_first, win_second)
    assert math.isclose(w1 + w2, 1.0)
    assert 0.0 <= w1 <= 1.0 and 0.0 <= w2 <= 1.0


def test_battle_matrix_hand_computed():
    results = {(0, 1): 1, (1, 0): -1, (0, 2): 1, (2, 0): 1, (1, 2): 0, (2, 1): -1}
    B = battle_matrix(results, 3, w1=0.25, w2=0.75)
    # (0,1)=1: B01 += ω1; (1,0)=-1 (0 won in second place): B01 += ω2; (0,2)=1: B02 += ω1;
    # (2,0)=1: B20 += ω1; (1,2)=0: nothing; (2,1)=-1 (1 won in second place): B12 += ω2.
    expected = np.array([[0.0, 1.0, 0.25], [0.0, 0.0, 0.75], [0.25, 0.0, 0.0]])
    np.testing.assert_allclose(B, expected)


def test_battle_matrix_rejects_bad_battles():
    with pytest.raises(ValueError):
        battle_matrix({(0, 0): 1}, 2, 0.5, 0.5)
    with pytest.raises(ValueError):
        battle_matrix({(0, 2): 1}, 2, 0.5, 0.5)
    with pytest.raises(ValueError):
        battle_matrix({(0, 1): 2}, 2, 0.5, 0.5)


def test_battle_matrices_batched_equals_single():
    rng = np.random.default_rng(3)
    n_groups, n = 4, 5
    rows = [(g, m, k) for g in range(n_groups) for m in range(n) for k in range(n) if m != k]
    verdicts = rng.choice([1, -1, 0], size=len(rows))
    group, first, second = (np.array(column) for column in zip(*rows, strict=True))
    batched = battle_matrices(group, first, second, verdicts, n_groups, n, 0.4, 0.6)
    for g in range(n_groups):
        single = {(m, k): int(v) for (gg, m, k), v in zip(rows, verdicts, strict=True) if gg == g}
        np.testing.assert_allclose(batched[g], battle_matrix(single, n, 0.4, 0.6))


def test_two_judgments_closed_form():
    # B01 = 3, B10 = 1: the MLE has σ(ε0 − ε1) = 3/4, so ε0 − ε1 = log 3; mean zero → ±log(3)/2.
    elo = elo_scores(np.array([[0.0, 3.0], [1.0, 0.0]]))
    np.testing.assert_allclose(elo, [math.log(3) / 2, -math.log(3) / 2], atol=1e-5)


def test_three_judgments_closed_form():
    # Symmetry gives ε1 = ε2; stationarity for judgment 0: 2σ(−x)·2 = σ(x)·2 with x = ε0 − ε1, so e^x = 2.
    B = np.array([[0.0, 2.0, 2.0], [1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])
    x = math.log(2)
    np.testing.assert_allclose(elo_scores(B), [2 * x / 3, -x / 3, -x / 3], atol=1e-5)


def _negative_log_likelihood(B):
    def value(elo):
        difference = elo[:, None] - elo[None, :]
        return -(B * -np.logaddexp(0.0, -difference)).sum()

    return value


def test_agrees_with_a_generic_optimiser():
    rng = np.random.default_rng(0)
    B = rng.random((7, 7))
    np.fill_diagonal(B, 0.0)
    reference = minimize(_negative_log_likelihood(B), np.zeros(7), method="BFGS", options={"gtol": 1e-12}).x
    np.testing.assert_allclose(elo_scores(B), reference - reference.mean(), atol=1e-4)


def test_never_losing_judgment_is_finite_and_best():
    # Judgment 0 wins every battle and never loses: the unpenalised maximum would be +∞.
    B = np.array([[0.0, 1.0, 1.0], [0.0, 0.0, 0.5], [0.0, 0.5, 0.0]])
    elo = elo_scores(B)
    assert np.all(np.isfinite(elo))
    assert elo[0] > elo[1] + 5 and math.isclose(elo[1], elo[2], abs_tol=1e-6)
    assert abs(elo.sum()) < 1e-6


def test_no_battles_gives_all_zero():
    np.testing.assert_allclose(elo_scores(np.zeros((4, 4))), np.zeros(4), atol=1e-12)


def test_invalid_matrices():
    with pytest.raises(ValueError):
        elo_scores(np.zeros((2, 3)))
    with pytest.raises(ValueError):
        elo_scores(np.array([[0.0, -1.0], [1.0, 0.0]]))


matrices = st.integers(2, 8).flatmap(
    lambda n: st.lists(st.floats(0, 3, allow_nan=False), min_size=n * n, max_size=n * n).map(
        lambda values: np.array(values).reshape(n, n) * (1 - np.eye(n))
    )
)


@settings(max_examples=60, deadline=None)
@given(matrices, st.randoms(use_true_random=False))
def test_elo_is_invariant_to_relabelling(B, random):
    n = B.shape[0]
    permutation = np.array(random.sample(range(n), n))
    elo = elo_scores(B)
    permuted = elo_scores(B[np.ix_(permutation, permutation)])
    np.testing.assert_allclose(permuted, elo[permutation], atol=1e-6)
    assert abs(elo.sum()) < 1e-6 * max(1.0, np.abs(elo).max())


@settings(max_examples=40, deadline=None)
@given(matrices, st.floats(-5, 5))
def test_likelihood_is_invariant_to_adding_a_constant(B, constant):
    elo = elo_scores(B)
    likelihood = _negative_log_likelihood(B)
    assert math.isclose(likelihood(elo), likelihood(elo + constant), rel_tol=1e-9, abs_tol=1e-9)


def test_batched_with_padding_agrees_with_per_prompt():
    rng = np.random.default_rng(1)
    sizes = rng.integers(2, 12, size=50)
    n = int(sizes.max())
    padded = np.zeros((50, n, n))
    singles = []
    for p, size in enumerate(sizes):
        B = rng.random((size, size)) * (rng.random((size, size)) < 0.6)
        np.fill_diagonal(B, 0.0)
        padded[p, :size, :size] = B
        singles.append(elo_scores(B))
    batched = elo_scores_batch(padded, sizes)
    for p, size in enumerate(sizes):
        np.testing.assert_allclose(batched[p, :size], singles[p], atol=1e-7)
        assert np.all(np.isnan(batched[p, size:]))


def test_batched_rejects_entries_beyond_size():
    B = np.ones((1, 3, 3))
    with pytest.raises(ValueError, match="beyond"):
        elo_scores_batch(B, [2])


def test_agreed_battles_count_a_win_only_when_both_orders_agree():
    # Judgments 0, 1, 2 of one response: 0 beats 1 in both orders; 0 and 2 split; 1 and 2 were judged in one
    # order only; 1 vs 2 of another response (group 1) — 2 wins shown second, then ties shown first.
    group = [0, 0, 0, 0, 0, 1, 1]
    first = [0, 1, 0, 2, 1, 1, 2]
    second = [1, 0, 2, 0, 2, 2, 1]
    verdict = [1, -1, 1, 1, -1, -1, 0]
    pairs = list(zip(*order_wins(group, first, second, verdict), strict=True))
    assert pairs == [(0, 0, 1, 2, 0), (0, 0, 2, 1, 1), (0, 1, 2, 0, 1), (1, 1, 2, 0, 1)]
    rows = list(zip(*agreed_battles(group, first, second, verdict), strict=True))
    assert rows == [(0, 0, 1, 1)]
    matrices = battle_matrices(*agreed_battles(group, first, second, verdict), 2, 3, 1.0, 1.0)
    assert matrices[0].tolist() == [[0, 1, 0], [0, 0, 0], [0, 0, 0]] and not matrices[1].any()
    # Judgment 2 wins in both orders against 1: counted for 2.
    assert list(zip(*agreed_battles([0, 0], [1, 2], [2, 1], [-1, 1]), strict=True)) == [(0, 1, 2, -1)]
    assert [a.size for a in agreed_battles([], [], [], [])] == [0, 0, 0, 0]


def test_a_split_is_a_tie_under_nemo_aligners_rule():
    # NeMo-Aligner's self-rewarding trainer: both verdicts name the same position (each judgment won once) — a tie,
    # one win each way; an agreed pair is one win; a pair with an order missing or unparsed, nothing.
    group = [0, 0, 0, 0, 0]
    first = [0, 1, 0, 2, 1]
    second = [1, 0, 2, 0, 2]
    verdict = [1, -1, 1, 1, -1]
    tied = battle_matrices(*agreed_battles(group, first, second, verdict, split_is_tie=True), 1, 3, 1.0, 1.0)
    assert tied[0].tolist() == [[0, 1, 1], [0, 0, 0], [1, 0, 0]]
    strict = battle_matrices(*agreed_battles(group, first, second, verdict), 1, 3, 1.0, 1.0)
    assert strict[0].tolist() == [[0, 1, 0], [0, 0, 0], [0, 0, 0]]
    # A tie moves no one: two judgments that only split keep an Elo of 0 each.
    splits = agreed_battles([0, 0], [0, 1], [1, 0], [1, 1], split_is_tie=True)
    np.testing.assert_allclose(elo_scores(battle_matrices(*splits, 1, 2, 1.0, 1.0)[0]), 0.0, atol=1e-9)
    # Position A named in one order and the other unparsed: neither agreed nor split, no battle under either rule.
    assert agreed_battles([0, 0], [0, 1], [1, 0], [1, 0], split_is_tie=True)[0].size == 0
