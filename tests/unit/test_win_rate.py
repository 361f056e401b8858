"""Win rates computed by hand, the length-controlled win rate under a known length bias, and the evaluator's
comparisons in both orders on a scripted backend."""

import re

import numpy as np
import polars as pl
import pytest

from metareward.inference.roles import compare_answers
from metareward.paper.prompts import EVALUATOR_SYSTEM
from metareward.paper.win_rate import length_controlled, win_rates
from metareward.pipeline.summary import win_rate_text
from tests.support import ScriptedBackend


def comparisons(rows):
    """(prompt_id, preference, trained_chars, reference_chars) rows as the win-rate stage's table."""
    return pl.DataFrame(rows, schema={"prompt_id": pl.String, "preference": pl.Float64, "trained_chars": pl.Int32,
                                      "reference_chars": pl.Int32}, orient="row")


def test_win_rate_is_alpaca_evals_mean_preference_over_parsed_annotations():
    table = comparisons([
        ("won", 0.9, 10, 12), ("won", 0.7, 10, 12),
        ("split", 1.0, 10, 13), ("split", 0.0, 10, 13),
        ("identical", 0.5, 10, 10), ("identical", 0.5, 10, 10),  # identical answers: ½ without a call
        ("lost", 0.2, 10, 14), ("lost", 0.4, 10, 14),
        ("half-parsed", 0.6, 10, 15), ("half-parsed", None, 10, 15),
        ("unparsed", None, 10, 16), ("unparsed", float("nan"), 10, 16),
    ])
    rates = win_rates(table, bootstrap=200, seed=1)
    parsed = np.array([0.9, 0.7, 1.0, 0.0, 0.5, 0.5, 0.2, 0.4, 0.6])
    assert (rates.annotations, rates.prompts) == (9, 5)
    assert rates.win_rate == pytest.approx(parsed.mean())
    assert rates.win_rate_standard_error == pytest.approx(parsed.std(ddof=1) / 3)
    # Rounded to a win, a loss or (exactly ½) a draw.
    assert rates.discrete_win_rate == pytest.approx((1 + 1 + 1 + 0 + 0.5 + 0.5 + 0 + 0 + 1) / 9)
    assert (rates.wins, rates.losses, rates.draws) == (4, 3, 2)
    low, high = rates.win_rate_ci
    assert 0.0 <= low <= rates.win_rate <= high <= 1.0 and high - low > 0.1
    counts = rates.as_counts()
    assert counts["win_rate"] == rates.win_rate and counts["prompts_compared"] == 5.0
    assert counts["lc_win_rate"] == rates.lc_win_rate and "lc_win_rate_undefined" not in counts


def test_length_controlled_win_rate_is_undefined_where_alpaca_evals_fit_is():
    few = win_rates(comparisons([("a", 1.0, 1, 2), ("a", 0.0, 3, 2), ("b", 1.0, 5, 2), ("b", 0.5, 5, 5)]))
    assert few.lc_win_rate is None and "at least 5" in few.lc_undefined
    assert few.as_counts()["lc_win_rate_undefined"] == few.lc_undefined and "lc_win_rate" not in few.as_counts()
    same = win_rates(comparisons([(str(i), 1.0, 10, 10) for i in range(6)]))
    assert same.lc_win_rate is None and "same length difference" in same.lc_undefined
    assert "LC undefined (every answer pair" in win_rate_text(same.as_counts())


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


def test_length_controlled_fit_recovers_a_known_baseline_weight():
    feature = np.linspace(-1, 1, 401)
    targets = 1 / (1 + np.exp(-(0.8 + 1.5 * feature)))  # fractional targets, noiseless
    assert length_controlled(targets, feature) == pytest.approx(1 / (1 + np.exp(-0.8)), abs=2e-3)


def test_metareward_and_alpaca_evals_own_functions_agree(tmp_path, monkeypatch):
    """alpaca_eval 0.6.6's get_winrate and get_length_controlled_winrate (length_controlled_minimal) on the same
    annotations: win rate and standard error to 1e-9 pp, LC within 0.5 pp (the issue's bound; seen: < 1e-3 pp)."""
    import pandas as pd
    from alpaca_eval.metrics import get_length_controlled_winrate, glm_winrate

    # The one file AlpacaEval downloads for this GLM (instruction difficulties, unused by its formula): offline.
    stand_in = tmp_path / "df_gamed.csv"
    rng = np.random.default_rng(7)
    for prompts in (5, 12, 40, 150):
        rows = []
        for i in range(prompts):
            trained, reference = int(rng.integers(10, 900)), int(rng.integers(10, 900))
            for _ in (True, False):
                share = float(1 / (1 + np.exp(-(rng.normal(0.3, 1.5) + 0.003 * (trained - reference)))))
                rows.append((f"p{i:04d}", None if rng.random() < 0.05 else share, trained, reference))
        ours = win_rates(comparisons(rows), bootstrap=5)
        annotations = pd.DataFrame({
            "preference": [None if share is None else 1 + share for _, share, _, _ in rows],
            "output_1": ["x" * reference for *_, reference in rows], "output_2": ["x" * t for _, _, t, _ in rows],
            "generator_1": "reference", "generator_2": "trained", "annotator": "local", "index": range(len(rows))})
        pd.DataFrame({"model": "none", "index": range(len(rows)), "instruction_difficulty": 0.0}).to_csv(
            stand_in, index=False)
        monkeypatch.setattr(glm_winrate, "hf_hub_download", lambda **_: str(stand_in))
        theirs = get_length_controlled_winrate(annotations, glm_name="length_controlled_minimal",
                                               save_weights_dir=None)
        assert 100 * ours.win_rate == pytest.approx(theirs["win_rate"], abs=1e-9)
        assert 100 * ours.win_rate_standard_error == pytest.approx(theirs["standard_error"], abs=1e-9)
        assert 100 * ours.discrete_win_rate == pytest.approx(theirs["discrete_win_rate"], abs=1e-9)
        assert ours.annotations == theirs["n_total"]
        assert 100 * ours.lc_win_rate == pytest.approx(theirs["length_controlled_winrate"], abs=0.5)


_OUTPUTS = re.compile(r'"model_identifier": "m",\n        "output": """(.*)"""\n    },'
                      r'.*"output": """(.*)"""\n    }', re.S)


def evaluator_outputs(request_messages):
    """(output of model m, output of model M) in an evaluator chat."""
    return _OUTPUTS.search(request_messages[-1]["content"]).groups()


def pairs(rows):
    return pl.DataFrame(rows, schema=["prompt_id", "prompt", "trained", "reference"], orient="row")


def test_forced_evaluator_reads_both_orders_probabilities():
    # The scripted evaluator gives the longer answer 0.8 when shown first, 0.7 when shown second; it never sees
    # identical answers, and reports neither identifier for the answer "mute".
    def probabilities(request):
        first, second = evaluator_outputs(request.messages)
        assert first != second and request.assistant_prefix == "" and request.choices == ("m", "M")
        if "mute" in (first, second):
            return None
        return (0.8, 0.2) if len(first) > len(second) else (0.3, 0.7)

    backend = ScriptedBackend(lambda *_: [], probabilities=probabilities)
    table, stats = compare_answers(
        pairs([("p1", "Q1", "a long trained answer", "short"), ("p2", "Q2", "terse", "a long reference answer"),
               ("p3", "Q3", "same", "same"), ("p4", "Q4", "mute", "anything")]),
        backend, "forced", max_tokens=16, seed=0, iteration=2, model_id="trained", evaluator_id="judge")
    assert len(backend.choice_requests) == 6 and stats.requests == 6
    assert all(r.messages[0] == {"role": "system", "content": EVALUATOR_SYSTEM} for r in backend.choice_requests)
    assert table["prompt_id"].to_list() == ["p1", "p1", "p2", "p2", "p3", "p3", "p4", "p4"]
    assert table["trained_first"].to_list() == [True, False] * 4
    assert table["verdict"].to_list() == ["m", "M", "M", "m", None, None, None, None]
    # The trained answer's share: P(m) when it is shown first, P(M) when second.
    assert table["preference"].to_list() == [0.8, 0.7, 0.3, 0.2, 0.5, 0.5, None, None]
    assert table["text"][0] == "P(m)=0.800 P(M)=0.200" and table["text"][6] == ""
    assert stats.parse_failures == 2
    assert table["identical"].to_list() == [False] * 4 + [True] * 2 + [False] * 2
    assert stats.counts["identical_answers"] == 1
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
    assert win_rates(table, bootstrap=10).win_rate == pytest.approx((1.0 + 0.0 + 0.0) / 3)
