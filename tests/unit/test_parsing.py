"""parse_score / parse_winner: every format the judge and meta-judge prompts invite, and what must not parse."""

from hypothesis import given
from hypothesis import strategies as st

from metareward.paper.parsing import parse_model_identifier, parse_score, parse_winner, without_score
from metareward.paper.prompts import JUDGE_TEMPLATE, META_JUDGE_TEMPLATE


def test_plain_score_as_the_prompt_asks():
    assert parse_score("The response is relevant and complete.\nScore: 4") == 4.0


def test_markdown_and_decorated_scores():
    assert parse_score("**Score:** 4") == 4.0
    assert parse_score("**Score: 3**") == 3.0
    assert parse_score("Score: **5**") == 5.0
    assert parse_score("Score: <2>") == 2.0
    assert parse_score("score: 1") == 1.0
    assert parse_score("Total score: 3 points") == 3.0


def test_scale_suffixes():
    assert parse_score("Score: 4/5") == 4.0
    assert parse_score("Score: 4 / 5.") == 4.0
    assert parse_score("Score: 3 out of 5") == 3.0
    # A different scale is not silently read on ours.
    assert parse_score("Score: 8/10") is None
    assert parse_score("Score: 3/10") is None


def test_decimal_scores_like_the_paper_observed():
    assert parse_score("Score: 4.5") == 4.5
    assert parse_score("Score: 4.75 (almost perfect)") == 4.75
    assert parse_score("Score: .5") == 0.5


def test_trailing_text_and_last_line_wins():
    assert parse_score("Score: 2\nOn reflection, it deserves more.\nScore: 4\nThanks!") == 4.0
    assert parse_score("Score: 4\nScore: 9") is None  # the last one decides, and it is off the scale


def test_out_of_range_absent_or_not_a_score():
    assert parse_score("Score: 6") is None
    assert parse_score("Score: -1") is None
    assert parse_score("I would give it four points.") is None
    assert parse_score("Subscore: 3") is None
    assert parse_score("") is None
    assert parse_score("Score: 7", max_score=10) == 7.0


def test_template_itself_has_no_score():
    # A judge that merely echoes the format line has not scored.
    assert parse_score(JUDGE_TEMPLATE) is None


@given(st.integers(0, 5), st.sampled_from(["", "**", "*"]), st.text(alphabet="abc .,\n", max_size=30))
def test_any_valid_integer_score_parses(score, emphasis, trailing):
    text = f"Justification.\n{emphasis}Score:{emphasis} {score}\n{trailing}"
    assert parse_score(text) == float(score)


@given(st.floats(0, 5, allow_nan=False).map(lambda x: round(x, 2)))
def test_any_valid_decimal_score_parses(score):
    assert parse_score(f"Score: {score:.2f}") == float(f"{score:.2f}")


def test_winner_formats():
    assert parse_winner("Winner: Judgement A") == "A"
    assert parse_winner("Winner: Judgment B") == "B"
    assert parse_winner("Winner: [Judgement B]") == "B"
    assert parse_winner("**Winner:** Judgement A") == "A"
    assert parse_winner("Winner: judgement b.") == "B"


def test_winner_last_one_wins_and_failures():
    assert parse_winner("Winner: Judgement A\nActually, no.\nWinner: Judgement B") == "B"
    assert parse_winner("Winner: [Judgement A | Judgement B]") is None
    assert parse_winner(META_JUDGE_TEMPLATE) is None
    assert parse_winner("Judgement A is better.") is None
    assert parse_winner("Winner: Judgement C") is None
    assert parse_winner("Winner: Judgement Apple") is None
    assert parse_winner("") is None


def test_a_judgment_without_its_score_line_keeps_its_reasoning():
    assert without_score("Relevant and complete.\nScore: 4") == "Relevant and complete."
    assert without_score("Good.\n**Score:** 3 points\nThanks.") == "Good.\nThanks."
    assert without_score("Score: 1 at first.\nOn reflection:\nScore: 5") == "Score: 1 at first.\nOn reflection:"
    assert without_score("No verdict here.") == "No verdict here."
    assert without_score("Poor. Score: 1") == "Poor."
    assert without_score("Weak overall.\nThe answer is off topic. Score: 2/5\nSorry.") == (
        "Weak overall.\nThe answer is off topic.\nSorry.")
    assert without_score("Score: 3") == ""
    assert parse_score(without_score("Fine.\nScore: 4")) is None


def test_removing_the_score_keeps_the_line_after_it():
    # The score pattern runs on over the whitespace after the number, newline included: the line that follows
    # used to be taken for the rest of the score's line and dropped with it.
    assert without_score("Fine.\nScore: 4\nThe line after.\nLast.") == "Fine.\nThe line after.\nLast."
    assert without_score("Score: 4 \nThe line after.") == "The line after."
    assert without_score("Poor. Score: 1\nThe line after.") == "Poor.\nThe line after."
    assert without_score("Score: <3>\nThe line after.") == "The line after."
    assert without_score("Score: 2/5\nThe line after.") == "The line after."
    # A score whose number is on the next line: both of its lines go, the one after them stays.
    assert without_score("Fine.\nScore:\n4\nThe line after.") == "Fine.\nThe line after."


def test_the_evaluators_identifier_is_m_or_M_and_nothing_else():
    for text, expected in [("m", "m"), ("M", "M"), (" M\n", "M"), ('"m"', "m"), ("**M**", "M"), ("[m]", "m"),
                           ("M.", "M"), ("Mm", None), ("model m", None), ("", None), ("The best is M", None)]:
        assert parse_model_identifier(text) == expected, text
