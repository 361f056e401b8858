"""A person's labels on an audit: read and checked against the label template, and the judge's agreement with them
(hand-computed cases)."""

from __future__ import annotations

import re

import polars as pl
import pytest

from metareward.pipeline.audit_labels import label_agreement, load_labels
from metareward.pipeline.input_files import InputFileError

TEMPLATE = pl.DataFrame({
    "judgment_id": ["j1", "j2", "j3", "j4", "j5", "j6"], "prompt_id": ["p1", "p1", "p2", "p2", "p2", "p2"],
    "response_id": ["r1", "r1", "r2", "r2", "r2", "r3"], "judge_score": ["5.0", "4.0", "5.0", "3.0", "2.0", ""],
    "label": [""] * 6})


def _labels(tmp_path, rows: str, name: str = "labels.csv"):
    path = tmp_path / name
    path.write_text(rows)
    return path


def test_agreement_counts_right_labels_and_exact_scores_and_orders_each_responses_judgments(tmp_path):
    path = _labels(tmp_path, "judgment_id,label\nj1,right\nj2,4\nj3, Wrong\nj4,1\nj5,0\nj6,\n")
    labels = load_labels(path, TEMPLATE)
    assert labels.height == 5  # j6 has no label: skipped
    estimates = label_agreement(labels, bootstrap=200, seed=1)
    # Agreed with: j1 (right), j2 (4 = 4); not: j3 (wrong), j4 (3 != 1), j5 (2 != 0).
    assert estimates["agreement"].value == pytest.approx(2 / 5)
    assert estimates["right_share"].value == pytest.approx(1 / 2)
    assert estimates["score_exact"].value == pytest.approx(1 / 3)
    assert estimates["score_abs_error"].value == pytest.approx((0 + 2 + 2) / 3)
    # r2's judgments j4 (person 1, judge 3) and j5 (person 0, judge 2) are ordered the same way.
    assert estimates["order_agreement"].value == pytest.approx(1.0)
    for estimate in estimates.values():
        assert estimate.low <= estimate.value <= estimate.high


def test_only_the_statistics_of_the_labels_given_are_reported(tmp_path):
    estimates = label_agreement(load_labels(_labels(tmp_path, "judgment_id,label\nj1,right\nj3,right\n"), TEMPLATE),
                                bootstrap=50)
    assert set(estimates) == {"agreement", "right_share"} and estimates["agreement"].value == 1.0


def test_an_invalid_judge_score_is_never_exact(tmp_path):
    estimates = label_agreement(load_labels(_labels(tmp_path, "judgment_id,label\nj6,3\n"), TEMPLATE), bootstrap=20)
    assert estimates["score_exact"].value == 0.0 and "score_abs_error" not in estimates


def test_jsonl_labels_are_read_too(tmp_path):
    path = _labels(tmp_path, '{"judgment_id": "j1", "label": "wrong"}\n', "labels.jsonl")
    assert label_agreement(load_labels(path, TEMPLATE), bootstrap=10)["right_share"].value == 0.0


@pytest.mark.parametrize(("rows", "message"), [
    ("judgment_id,mark\nj1,right\n", "no column label"),
    ("judgment_id,label\nj1,right\nj9,wrong\n", "row 3, judgment_id 'j9' is not one of the audited judgments"),
    ("judgment_id,label\nj1,right\nj1,wrong\n", "row 3, judgment_id 'j1' is labelled twice"),
    ("judgment_id,label\nj1,maybe\nj2,7\n", "row 2, field label 'maybe' is neither right / wrong nor a score from 0 "
                                             "to 5 (1 more such row(s))"),
    ("judgment_id,label\nj1,\n", "no judgment is labelled"),
])
def test_bad_labels_name_the_file_row_and_field(tmp_path, rows, message):
    path = _labels(tmp_path, rows)
    with pytest.raises(InputFileError, match=re.escape(message)) as error:
        load_labels(path, TEMPLATE)
    assert str(path) in str(error.value)
