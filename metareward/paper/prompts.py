"""The judge (paper A.1), meta-judge (paper Fig. 2) and evaluator (paper A.2) prompts, word for word, their rendering
and content hashes."""

from __future__ import annotations

import hashlib
import re

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


EVALUATOR_SYSTEM = (
    "You are a highly efficient assistant, who evaluates and selects the best large language model (LLMs) based on "
    "the quality of their responses to a given instruction. This process will be used to create a leaderboard "
    "reflecting the most accurate and human-preferred answers."
)
"""Paper A.2 "GPT4 Judge Prompt" (AlpacaEval's alpaca_eval_clf_gpt4_turbo), its system message."""

EVALUATOR_TEMPLATE = '''I require a leaderboard for various large language models. I'll provide you with prompts given to these models and their corresponding outputs. Your task is to assess these responses, and select the model that produces the best output from a human perspective.

## Instruction

{
    "instruction": """{instruction}""",
}

## Model Outputs

Here are the unordered outputs from the models. Each output is associated with a specific model, identified by a unique model identifier.

{
    {
        "model_identifier": "m",
        "output": """{output_1}"""
    },
    {
        "model_identifier": "M",
        "output": """{output_2}"""
    }
}

## Task

Evaluate the models based on the quality and relevance of their outputs, and select the model that generated the best output. Answer by providing the model identifier of the best model. We will use your output as the name of the best model, so make sure your output only contains one of the following model identifiers and nothing else (no quotes, no spaces, no new lines, ...): m or M.

## Best Model Identifier'''
"""Paper A.2, its user message, placeholders {instruction}, {output_1} (model "m"), {output_2} (model "M"). The
paper's typesetting lost the markup of AlpacaEval's file (its triple quotes and "##" headings), restored here."""

EVALUATOR_IDENTIFIERS = ("m", "M")
"""The answers the evaluator may give: output_1's model, output_2's model."""

_EVALUATOR_FIELD = re.compile(r"\{(instruction|output_1|output_2)\}")


def render_evaluator_messages(instruction: str, output_1: str, output_2: str) -> tuple[dict[str, str], ...]:
    """The evaluator's chat (system + user) comparing output_1 (model "m") with output_2 (model "M"); the texts
    are inserted verbatim in one pass, so an answer containing "{output_2}" is not substituted again."""
    values = {"instruction": instruction, "output_1": output_1, "output_2": output_2}
    user = _EVALUATOR_FIELD.sub(lambda match: values[match[1]], EVALUATOR_TEMPLATE)
    return ({"role": "system", "content": EVALUATOR_SYSTEM}, {"role": "user", "content": user})
