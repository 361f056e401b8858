"""Judge agreement with labelled rankings (sec. 3.4), the rankings loader and the AlpacaEval format, by hand."""

import json
import math

import polars as pl
import pytest

from metareward.pipeline.evaluation import (
    alpaca_eval_outputs,
    evaluate_judge_agreement,
    judge_agreement,
    load_labelled_rankings,
)


def test_agreement_ties_and_spearman_by_hand():
    table = pl.DataFrame({
        "prompt": ["p1"] * 3 + ["p2"] * 2,
        "rank": [1, 2, 3, 1, 2],
        "score": [4.0, 4.0, 1.0, 2.0, 3.0],
    })
    result = judge_agreement(table, bootstrap=200)
    # p1 pairs (1,2): predicted tie → 0.5; (1,3): 4 > 1 agrees → 1; (2,3): agrees → 1.
    # p2 pair (1,2): 2 < 3 disagrees → 0.  Agreement = 2.5 / 4; without ties = 2 / 3.
    assert result["agreement"].value == pytest.approx(2.5 / 4)
    assert result["agreement_without_ties"].value == pytest.approx(2 / 3)
    # Spearman: p1 ranks (1,2,3) vs scores (4,4,1) → ρ(goodness, score) = 0.866…; p2 → -1; mean.
    assert result["spearman"].value == pytest.approx((math.sqrt(3) / 2 - 1) / 2)
    low, high = result["agreement"].low, result["agreement"].high
    assert 0.0 <= low <= result["agreement"].value <= high <= 1.0


def test_labelled_rankings_loader(tmp_path):
    good = tmp_path / "r.jsonl"
    good.write_text('{"prompt": "p", "response": "a", "rank": 1}\n{"prompt": "p", "response": "b", "rank": 2}\n')
    assert load_labelled_rankings(good)["rank"].to_list() == [1.0, 2.0]
    bad = tmp_path / "b.csv"
    bad.write_text("prompt,response\np,a\n")
    with pytest.raises(ValueError, match=r"b.csv: no 'rank' column"):
        load_labelled_rankings(bad)


def test_alpaca_eval_format():
    assert alpaca_eval_outputs(["Q"], ["A"], "m2") == [{"instruction": "Q", "output": "A", "generator": "m2"}]


def test_nan_scores_are_missing_like_nulls():
    base = {"prompt": ["p1"] * 3 + ["p2"] * 2, "rank": [1, 2, 3, 1, 2]}
    with_nan = judge_agreement(pl.DataFrame({**base, "score": [4.0, float("nan"), 1.0, 2.0, 3.0]}), bootstrap=50)
    with_null = judge_agreement(pl.DataFrame({**base, "score": [4.0, None, 1.0, 2.0, 3.0]}), bootstrap=50)
    # p1 keeps (1,3): agrees → 1; p2 (1,2) disagrees → 0.
    assert with_nan["agreement"].value == with_null["agreement"].value == pytest.approx(0.5)
    assert with_nan["spearman"].value == pytest.approx(with_null["spearman"].value)


@pytest.mark.parametrize("bootstrap", [0, -3, True, 2.5])
def test_bootstrap_below_one_is_rejected_before_any_work(bootstrap):
    table = pl.DataFrame({"prompt": ["p"] * 2, "rank": [1, 2], "score": [4.0, 1.0]})
    with pytest.raises(ValueError, match="bootstrap must be a positive number of resamples"):
        judge_agreement(table, bootstrap=bootstrap)
    with pytest.raises(ValueError, match="bootstrap"):
        # Before the config is read or a model loaded: neither argument is looked at.
        evaluate_judge_agreement(None, "no-such-rankings.jsonl", bootstrap=bootstrap)


@pytest.mark.parametrize("rank,accepted", [("1", True), (None, False), (True, False), ("best", False)])
def test_a_rank_is_a_number_or_text_that_reads_as_one(tmp_path, rank, accepted):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"prompt": "p", "response": "a", "rank": 2}) + "\n"
                    + json.dumps({"prompt": "p", "response": "b", "rank": rank}) + "\n")
    if accepted:
        assert load_labelled_rankings(path)["rank"].to_list() == [2.0, 1.0]
    else:
        with pytest.raises(ValueError, match=r"r.jsonl: row 2: 'rank' must be a number"):
            load_labelled_rankings(path)
