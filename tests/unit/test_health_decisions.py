"""The health gate's decisions (pure: no Prefect): typed answers, the record kept in the store and the data it holds
for, and what each decision does."""

from __future__ import annotations

import pytest

from metareward.artifacts.store import ArtifactStore
from metareward.paper.report import HealthCheck
from metareward.pipeline.health_gate import (
    CHOICES,
    Decision,
    decided,
    decision_key,
    decisions_markdown,
    parse_choice,
    record_decision,
    recorded_decision,
)

FAILED = HealthCheck("judge top-score share", 0.95, 0.9, "max_top_score_share", True, "top-score share 95.0% …")
PASSED = HealthCheck("judge parse rate", 0.8, 0.2, "min_parse_rate", False, "")


@pytest.mark.parametrize(("answer", "expected"), [
    ("keep_model", ("keep_model", "")),
    ("  drop the judge looks saturated", ("drop_judge_pairs", "the judge looks saturated")),
    ("3 scores all 5", ("keep_model", "scores all 5")),
    ("C", ("continue", "")),
    ("s", ("stop", "")),
    ("5", None), ("0", None), ("", None), ("maybe", None),
])
def test_a_typed_answer_names_one_choice_by_name_prefix_or_number_with_an_optional_note(answer, expected):
    assert parse_choice(answer) == expected


def test_a_kept_decision_holds_for_the_tables_it_was_taken_on_and_no_others(tmp_path):
    store = ArtifactStore(str(tmp_path))
    data = {"actor_pairs": ["a1"], "judge_pairs": ["j1"]}
    decision = decided("drop_judge_pairs", 2, "the Prefect UI", data, [FAILED, PASSED], note=" saturated ")
    uri = record_decision(store, "camp", decision)
    assert uri.endswith(decision_key("camp", 2)) and decision_key("camp", 2) == "camp/iter-2/health/decision.json"
    assert recorded_decision(store, "camp", 2, data) == decision
    assert recorded_decision(store, "camp", 2) == decision
    assert recorded_decision(store, "camp", 2, {"actor_pairs": ["a2"], "judge_pairs": ["j1"]}) is None
    assert recorded_decision(store, "camp", 1) is None
    # Only the failed checks are kept, the note trimmed.
    assert decision.checks == [{"metric": "judge top-score share", "value": 0.95, "threshold": 0.9,
                                "setting": "max_top_score_share"}]
    assert decision.note == "saturated" and decision.drops_judge_pairs and not decision.keeps_model
    table = decisions_markdown(store, "camp", 3)
    assert "| 2 | drop_judge_pairs | the Prefect UI | saturated | judge top-score share 95.0% (threshold 90.0%) |" \
        in table and "| 1 |" not in table


def test_a_decision_is_one_of_the_four_choices():
    assert CHOICES == ("continue", "drop_judge_pairs", "keep_model", "stop")
    with pytest.raises(ValueError, match="not one of"):
        Decision(1, "retrain", "x", {})
    assert decided("keep_model", 1, "x", {}, []).keeps_model
