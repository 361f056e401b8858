"""Actor pairs with length control (sec. 2.1), judged response and judge pairs (sec. 2.2)."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from metareward.paper.selection import select_actor_pair, select_judge_pair, select_judged_response

SCORES = [4.0, 3.5, 2.0, 1.0, 3.9]
LENGTHS = [300, 100, 500, 400, 200]


def test_rho_zero_is_pure_score_selection():
    # S_max = 4.0 (index 0), S_min = 1.0 (index 3); lengths play no part.
    assert select_actor_pair(SCORES, LENGTHS, rho=0.0) == (0, 3)


def test_length_control_hand_computed():
    # ρ = 0.3: top tier ≥ 0.7·4 + 0.3·1 = 3.1 → {0: 300, 1: 100, 4: 200} → shortest is 1.
    #          bottom tier ≤ 0.7·1 + 0.3·4 = 1.9 → {3} → rejected 3.
    assert select_actor_pair(SCORES, LENGTHS, rho=0.3) == (1, 3)
    # ρ = 0.4: top ≥ 0.6·4 + 0.4·1 = 2.8 → {0, 1, 4} → 1; bottom ≤ 0.6·1 + 0.4·4 = 2.2 → {2: 500, 3: 400} → 2.
    assert select_actor_pair(SCORES, LENGTHS, rho=0.4) == (1, 2)


def test_tier_boundary_tolerates_float_means():
    # ρ = 0.1, S_max = 4, S_min = 2: the top tier starts at exactly 3.8, which floats compute as
    # 3.8000000000000003; the mean score of judgments (4, 4, 4, 4, 3) is 3.8 and belongs to the tier.
    assert (1 - 0.1) * 4.0 + 0.1 * 2.0 > 3.8
    boundary = float(np.mean([4, 4, 4, 4, 3]))
    assert select_actor_pair([4.0, boundary, 2.0], [900, 10, 5], rho=0.1) == (1, 2)


def test_no_pair_when_all_scores_equal_or_too_few():
    assert select_actor_pair([3.0, 3.0, 3.0], [1, 2, 3], rho=0.0) is None
    assert select_actor_pair([3.0, 3.0 + 1e-13], [1, 2], rho=0.0) is None
    assert select_actor_pair([5.0], [10], rho=0.0) is None
    assert select_actor_pair([], [], rho=0.0) is None


def test_equal_lengths_prefer_better_score_then_lower_index():
    # Top tier {0: 5.0, 1: 4.9} both length 10 → the better score; bottom {2, 3} both length 7 → the worse.
    assert select_actor_pair([5.0, 4.9, 1.1, 1.0], [10, 10, 7, 7], rho=0.1) == (0, 3)


def test_invalid_inputs_are_rejected():
    with pytest.raises(ValueError, match="rho"):
        select_actor_pair([1.0, 2.0], [1, 2], rho=0.5)
    with pytest.raises(ValueError, match="rho"):
        select_actor_pair([1.0, 2.0], [1, 2], rho=-0.1)
    with pytest.raises(ValueError, match="lengths"):
        select_actor_pair([1.0, 2.0], [1], rho=0.0)
    with pytest.raises(ValueError, match=r"scores\[1\]"):
        select_actor_pair([1.0, float("nan")], [1, 2], rho=0.0)


@given(
    st.lists(st.tuples(st.integers(0, 20).map(lambda x: x / 4), st.integers(1, 3000)), min_size=2, max_size=12),
    st.floats(0.0, 0.49),
)
def test_chosen_shortest_in_top_tier_and_rejected_longest_in_bottom_tier(items, rho):
    scores = [score for score, _ in items]
    lengths = [length for _, length in items]
    pair = select_actor_pair(scores, lengths, rho)
    s_max, s_min = max(scores), min(scores)
    if s_max == s_min:
        assert pair is None
        return
    chosen, rejected = pair
    top = [i for i, s in enumerate(scores) if s >= (1 - rho) * s_max + rho * s_min - 1e-9]
    bottom = [i for i, s in enumerate(scores) if s <= (1 - rho) * s_min + rho * s_max + 1e-9]
    assert chosen in top and rejected in bottom
    assert lengths[chosen] == min(lengths[i] for i in top)
    assert lengths[rejected] == max(lengths[i] for i in bottom)
    assert scores[chosen] > scores[rejected]
    if rho == 0.0:
        assert scores[chosen] == s_max and scores[rejected] == s_min


def test_judged_response_is_highest_variance():
    rng = np.random.default_rng(0)
    assert select_judged_response([0.1, 2.25, 0.0, 1.0], rng) == 1


def test_judged_response_ties_are_random_and_seeded():
    variances = [1.0, 0.5, 1.0, 1.0]
    picks = [select_judged_response(variances, np.random.default_rng(seed)) for seed in range(200)]
    assert set(picks) == {0, 2, 3}
    again = [select_judged_response(variances, np.random.default_rng(seed)) for seed in range(200)]
    assert picks == again
    with pytest.raises(ValueError, match="empty"):
        select_judged_response([], np.random.default_rng(0))


def test_judge_pair_is_max_and_min_elo():
    elo = [0.3, -1.2, 2.0, 0.1]
    assert select_judge_pair(elo, [10, 20, 30, 40], None, np.random.default_rng(0)) == (2, 1)


def test_judge_pair_length_filter():
    elo = [0.3, -1.2, 2.0, 0.1]
    lengths = [10, 20, 1101, 40]
    # Paper A.3, iteration 1: chosen judgment must not exceed 1100 characters; the pair is dropped.
    assert select_judge_pair(elo, lengths, 1100, np.random.default_rng(0)) is None
    assert select_judge_pair(elo, lengths, 1101, np.random.default_rng(0)) == (2, 1)


def test_judge_pair_none_when_equal_or_single():
    assert select_judge_pair([0.0, 0.0, 0.0], [1, 2, 3], None, np.random.default_rng(0)) is None
    assert select_judge_pair([0.0], [5], None, np.random.default_rng(0)) is None


def test_judge_pair_ties_at_random():
    elo = [1.0, 1.0, -1.0, -1.0]
    pairs = {select_judge_pair(elo, [1, 1, 1, 1], None, np.random.default_rng(seed)) for seed in range(100)}
    assert pairs == {(0, 2), (0, 3), (1, 2), (1, 3)}
