"""Regex parsing of the judge's "Score: X" and the meta-judge's "Winner: Judgement A|B" (paper sec. 2.1, 2.2)."""

from __future__ import annotations

import math
import re

_NUMBER = r"\d+(?:\.\d+)?|\.\d+"

# "Score: 4", "**Score:** 4", "Score: **4.5**", "score: <3>", "Score: 4/5", "Total score: 4 points".
# The lookbehind keeps "subscore"/"rescore" out; what follows the number does not matter.
_SCORE = re.compile(
    rf"(?<![a-z])score\s*\**\s*[:：]\s*\**\s*[<\[(]?\s*(?P<value>{_NUMBER})\s*[>\])]?"
    rf"(?:\s*(?:/|out\s+of)\s*(?P<scale>{_NUMBER}))?",
    re.IGNORECASE,
)

# "Winner: Judgement A", "Winner: [Judgment B]", "**Winner:** Judgement A". A copy of the template's
# "Winner: [Judgement A | Judgement B]" names no winner, hence the lookahead on "|".
_WINNER = re.compile(
    r"(?<![a-z])winner\s*\**\s*[:：]\s*\**\s*\[?\s*\**\s*judge?ment\s+(?P<letter>[ab])\b(?!\s*\|)",
    re.IGNORECASE,
)


def parse_score(text: str, max_score: float = 5.0) -> float | None:
    """The score of the last "Score: X" in a judgment, or None.

    X is an integer or a decimal, optionally in markdown bold, angle brackets, or followed by "/5" or
    "out of 5". None when no such line exists, when the last one is outside [0, max_score], or when it
    states a different scale ("Score: 8/10" is not read as 8 on a 5-point scale).
    """
    matches = list(_SCORE.finditer(text))
    if not matches:
        return None
    last = matches[-1]
    value = float(last["value"])
    scale = last["scale"]
    if scale is not None and not math.isclose(float(scale), max_score):
        return None
    if not 0.0 <= value <= max_score:
        return None
    return value


def parse_winner(text: str) -> str | None:
    """"A" or "B" from the last "Winner: Judgement A|B" (either spelling, brackets optional), else None."""
    matches = list(_WINNER.finditer(text))
    if not matches:
        return None
    return matches[-1]["letter"].upper()


def without_score(text: str) -> str:
    """The judgment without the "Score: X" that parse_score reads (its last), for a meta-judge that is to weigh the
    reasoning rather than the number: a line that starts with it is removed whole; on a line of reasoning ("Poor.
    Score: 1") the line is cut where the score begins. The text unchanged when it states no score."""
    matches = list(_SCORE.finditer(text))
    if not matches:
        return text
    last = matches[-1]
    score = last.start()
    start = text.rfind("\n", 0, score) + 1
    # The match runs on over the whitespace after the number, newlines included: the line ends after the number.
    end = text.find("\n", last.end("scale") if last["scale"] is not None else last.end("value"))
    rest = "" if end == -1 else text[end + 1:]
    head = text[start:score]
    kept = text[:start] + ("" if head.strip(" \t*_#>-") == "" else head.rstrip() + "\n")
    return (kept + rest).rstrip()


_IDENTIFIER = re.compile(r"^[\s\"'`*\[(]*(?P<identifier>[mM])[\s\"'`*\])]*\.?\s*$")


def parse_model_identifier(text: str) -> str | None:
    """"m" or "M" when the evaluator's answer is just that identifier (paper A.2 asks for "m or M and nothing
    else"; quotes, brackets, markdown and a final period are tolerated), else None."""
    match = _IDENTIFIER.match(text)
    return match["identifier"] if match else None
