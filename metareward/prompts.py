"""The judge (paper A.1) and meta-judge (paper Fig. 2) prompts, word for word, their rendering and content hashes."""

from __future__ import annotations

import hashlib

RUBRIC = """- Add 1 point if the response is relevant and provides some information related to the user's inquiry, even if it is incomplete or contains some irrelevant content.

- Add another point if the response addresses a substantial portion of the user's question, but does not completely resolve the query or provide a direct answer.

- Award a third point if the response answers the basic elements of the user's question in a useful way, regardless of whether it seems to have been written by an AI Assistant or if it has elements typically found in blogs or search results.

- Grant a fourth point if the response is clearly written from an AI Assistant's perspective, addressing the user's question directly and comprehensively, and is well-organized and helpful, even if there is slight room for improvement in clarity, conciseness or focus.

- Bestow a fifth point for a response that is impeccably tailored to the user's question by an AI Assistant, without extraneous information, reflecting expert knowledge, and demonstrating a high-quality, engaging, and insightful answer."""

JUDGE_TEMPLATE = (
    "Review the user's question and the corresponding response using the additive 5-point scoring system "
    "described below. Points are accumulated based on the satisfaction of each criterion:\n\n"
    + RUBRIC
    + """

User: {query}

<response>{response}</response>

After examining the user's instruction and the response:

- Briefly justify your total score, up to 100 words.
- Conclude with the score using the format: "Score: <total points>"

Remember to assess from the AI Assistant perspective, utilizing web search knowledge as necessary."""
)
"""Paper A.1 "Pointwise Judge Prompt" (the Self-Rewarding judge prompt); placeholders {query}, {response}."""

META_JUDGE_TEMPLATE = (
    "Review the user's question and the corresponding response, along with two judgments. Determine which "
    "judgment is more accurate according to the rubric provided below. The rubric used for the initial "
    "judgments is as follows:\n\n"
    + RUBRIC
    + """

User: {prompt}

Response: {response}

Judgment A: {judgment_a}

Judgment B: {judgment_b}

After examining the original question, response, and both judgments:

- Explain which judgment is more accurate according to the original rubric and why. Consider factors such as adherence to the rubric, accuracy in evaluating the response, and consistency in applying the criteria.

- Conclude with a clear statement of which judgment is better using the format: "Winner: [Judgement A | Judgement B]\""""
)
"""Paper Fig. 2 "LLM-as-a-Meta-Judge Prompt"; placeholders {prompt}, {response}, {judgment_a}, {judgment_b}."""

SCORE_PREFIX = "Score: "
"""What a forced-verdict judge is made to write before its score (the format A.1 asks for)."""

WINNER_PREFIX = "Winner: Judgement "
"""What a forced-verdict meta-judge is made to write before its letter (the format Fig. 2 asks for)."""


def render_judge_prompt(query: str, response: str) -> str:
    """The judge prompt for one (prompt, response); the texts are inserted verbatim, braces included."""
    return JUDGE_TEMPLATE.format_map({"query": query, "response": response})


def render_meta_judge_prompt(prompt: str, response: str, judgment_a: str, judgment_b: str) -> str:
    """The meta-judge prompt comparing judgment_a (shown first, "Judgment A") with judgment_b."""
    return META_JUDGE_TEMPLATE.format_map(
        {"prompt": prompt, "response": response, "judgment_a": judgment_a, "judgment_b": judgment_b}
    )


def template_hash(template: str) -> str:
    """A 16-hex-digit blake2b digest of a template's text: part of every stage's cache key."""
    return hashlib.blake2b(template.encode("utf-8"), digest_size=8).hexdigest()


JUDGE_TEMPLATE_HASH = template_hash(JUDGE_TEMPLATE)
META_JUDGE_TEMPLATE_HASH = template_hash(META_JUDGE_TEMPLATE)
