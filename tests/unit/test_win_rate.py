"""Win rates computed by hand, the length-controlled win rate under a known length bias, and the evaluator's
comparisons in both orders on a scripted backend."""

import re

import numpy as np
import polars as pl
import pytest

from metareward.inference.roles import compare_answers
from metareward.paper.prompts import EVALUATOR_SYSTEM
from metareward.paper.win_rate import length_controlled, win_rates
from tests.support import ScriptedBackend


def comparisons(rows):
    """(prompt_id, preference, trained_chars, reference_chars) rows as the win-rate stage's table."""
    return pl.DataFrame(rows, schema={"prompt_id": pl.String, "preference": pl.Float64, "trained_chars": pl.Int32,
                                      "reference_chars": pl.Int32}, orient="row")


def test_win_rate_by_hand_ties_half_and_unparsed_left_out():
    table = comparisons([
        ("won", 1.0, 10, 10), ("won", 1.0, 10, 10),
        ("split", 1.0, 10, 10), ("split", 0.0, 10, 10),          # a split verdict is a tie
        ("identical", 0.5, 10, 10), ("identical", 0.5, 10, 10),  # identical answers: ½ without a call
        ("lost", 0.0, 10, 10), ("lost", 0.0, 10, 10),
        ("half-parsed", 1.0, 10, 10), ("half-parsed", None, 10, 10),
        ("unparsed", None, 10, 10), ("unparsed", float("nan"), 10, 10),
    ])
    rates = win_rates(table, bootstrap=200, seed=1)
    assert rates.prompts == 5
    assert rates.win_rate == pytest.approx((1 + 0.5 + 0.5 + 0 + 1) / 5)
    # Equal lengths everywhere: the LC fit is the intercept alone, the mean preference over comparisons (the
    # ridge shrinks it by < 1e-3).
    assert rates.lc_win_rate == pytest.approx(5 / 9, abs=1e-3)
    for value, (low, high) in ((rates.win_rate, rates.win_rate_ci), (rates.lc_win_rate, rates.lc_win_rate_ci)):
        assert 0.0 <= low <= value <= high <= 1.0 and high - low > 0.1
    counts = rates.as_counts()
    assert counts["win_rate"] == rates.win_rate and counts["prompts_compared"] == 5.0


def test_no_parsed_verdict_gives_no_win_rate_and_bootstrap_must_resample():
    assert win_rates(comparisons([("a", None, 1, 2), ("a", float("nan"), 1, 2)])) is None
    with pytest.raises(ValueError, match="bootstrap"):
        win_rates(comparisons([("a", 1.0, 1, 2)]), bootstrap=0)


def test_length_controlled_win_rate_removes_a_length_bias():
    # An evaluator that prefers longer answers and sees no other difference: P(trained wins) = σ(2·tanh(Δ/σ_Δ)),
    # with the trained model mostly the longer one. Raw win rate well above ½; at equal length, ½.
    rng = np.random.default_rng(0)
    delta = rng.normal(150, 200, size=3000).round()
    spread = delta.std()
    wins = rng.random(delta.size) < 1 / (1 + np.exp(-2 * np.tanh(delta / spread)))
    table = comparisons([(str(i), float(w), int(500 + d), 500)
                         for i, (w, d) in enumerate(zip(wins, delta, strict=True))])
    rates = win_rates(table, bootstrap=50, seed=0)
    assert rates.win_rate > 0.65
    assert rates.lc_win_rate == pytest.approx(0.5, abs=0.04)
    assert rates.lc_win_rate_ci[0] < 0.5 < rates.lc_win_rate_ci[1]


def test_length_controlled_fit_recovers_a_known_intercept():
    feature = np.linspace(-1, 1, 401)
    targets = 1 / (1 + np.exp(-(0.8 + 1.5 * feature)))  # fractional targets, noiseless
    assert length_controlled(targets, feature) == pytest.approx(1 / (1 + np.exp(-0.8)), abs=1e-3)
    # One model wins every comparison: the ridge keeps the fit finite.
    assert 0.99 < length_controlled(np.ones(50), np.linspace(-1, 1, 50)) < 1.0


_OUTPUTS = re.compile(r'"model_identifier": "m",\n        "output": """(.*)"""\n    },'
                      r'.*"output": """(.*)"""\n    }', re.S)


def evaluator_outputs(request_messages):
    """(output of model m, output of model M) in an evaluator chat."""
    return _OUTPUTS.search(request_messages[-1]["content"]).groups()


def pairs(rows):
    return pl.DataFrame(rows, schema=["prompt_id", "prompt", "trained", "reference"], orient="row")


def test_forced_evaluator_compares_both_orders():
    # The scripted evaluator always prefers the longer answer; it never sees identical answers.
    def longer(request):
        first, second = evaluator_outputs(request.messages)
        assert first != second and request.assistant_prefix == "" and request.temperature == 0.0
        return 0 if len(first) > len(second) else 1

    backend = ScriptedBackend(lambda *_: [], choose_request=longer)
    table, stats = compare_answers(
        pairs([("p1", "Q1", "a long trained answer", "short"), ("p2", "Q2", "terse", "a long reference answer"),
               ("p3", "Q3", "same", "same")]),
        backend, "forced", max_tokens=16, seed=0, iteration=2, model_id="trained", evaluator_id="judge")
    assert len(backend.choice_requests) == 4 and stats.requests == 4
    assert all(r.messages[0] == {"role": "system", "content": EVALUATOR_SYSTEM} for r in backend.choice_requests)
    assert table["prompt_id"].to_list() == ["p1", "p1", "p2", "p2", "p3", "p3"]
    assert table["trained_first"].to_list() == [True, False] * 3
    assert table["verdict"].to_list() == ["m", "M", "M", "m", None, None]
    assert table["preference"].to_list() == [1.0, 1.0, 0.0, 0.0, 0.5, 0.5]
    assert table["identical"].to_list() == [False] * 4 + [True] * 2 and stats.counts["identical_answers"] == 1
    assert stats.counts["first_position_share"] == 0.5  # m, M, M, m
    assert (table["trained_chars"][0], table["reference_chars"][0]) == (len("a long trained answer"), len("short"))
    assert set(table["evaluator_id"]) == {"judge"} and set(table["model_id"]) == {"trained"}
    # The trained answer is output m when shown first, output M when shown second.
    shown = [evaluator_outputs(r.messages) for r in backend.choice_requests]
    assert shown[:2] == [("a long trained answer", "short"), ("short", "a long trained answer")]


def test_free_evaluator_parses_its_answer_and_counts_failures():
    answers = iter(["m", "The best model is M", " M ", "**m**"])
    backend = ScriptedBackend(lambda prompt, n, seed: [next(answers)])
    table, stats = compare_answers(pairs([("p1", "Q1", "x", "y"), ("p2", "Q2", "u", "v")]), backend, "free",
                                   max_tokens=7, seed=0, iteration=1, model_id="t", evaluator_id="e")
    assert [(r.max_tokens, r.temperature) for r in backend.requests] == [(7, 0.0)] * 4
    assert table["verdict"].to_list() == ["m", None, "M", "m"]
    # p1: trained first, "m" → won; second order unparsed. p2: trained first, "M" → lost; trained second, "m"
    # (the reference) → lost.
    assert table["preference"].to_list() == [1.0, None, 0.0, 0.0]
    assert stats.parse_failures == 1 and stats.counts["first_position_share"] == pytest.approx(2 / 3)
    assert win_rates(table, bootstrap=10).win_rate == pytest.approx((1.0 + 0.0) / 2)
