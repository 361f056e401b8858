"""The paper's judge, meta-judge and evaluator prompts: verbatim text, placeholders, rendering and hashes."""

from metareward.paper.prompts import (
    EVALUATOR_SYSTEM,
    EVALUATOR_TEMPLATE,
    JUDGE_TEMPLATE,
    JUDGE_TEMPLATE_HASH,
    META_JUDGE_TEMPLATE,
    META_JUDGE_TEMPLATE_HASH,
    render_evaluator_messages,
    render_judge_prompt,
    render_meta_judge_prompt,
    template_hash,
)


def test_judge_template_is_paper_a1():
    assert JUDGE_TEMPLATE.startswith(
        "Review the user's question and the corresponding response using the additive 5-point scoring system"
    )
    for phrase in [
        "- Add 1 point if the response is relevant",
        "- Add another point if the response addresses a substantial portion",
        "- Award a third point if the response answers the basic elements",
        "- Grant a fourth point if the response is clearly written from an AI Assistant's perspective",
        "- Bestow a fifth point for a response that is impeccably tailored",
        "User: {query}",
        "<response>{response}</response>",
        "- Briefly justify your total score, up to 100 words.",
        '- Conclude with the score using the format: "Score: <total points>"',
    ]:
        assert phrase in JUDGE_TEMPLATE
    assert JUDGE_TEMPLATE.endswith("utilizing web search knowledge as necessary.")


def test_meta_judge_template_is_paper_figure_2():
    assert "along with two judgments. Determine which judgment is more accurate" in META_JUDGE_TEMPLATE
    for placeholder in ["User: {prompt}", "Response: {response}", "Judgment A: {judgment_a}",
                        "Judgment B: {judgment_b}"]:
        assert placeholder in META_JUDGE_TEMPLATE
    assert META_JUDGE_TEMPLATE.endswith('using the format: "Winner: [Judgement A | Judgement B]"')


def test_rendering_inserts_text_verbatim_even_with_braces():
    judge = render_judge_prompt("What is {x}?", "It is {y}.")
    assert "User: What is {x}?" in judge
    assert "<response>It is {y}.</response>" in judge
    meta = render_meta_judge_prompt("Q", "R", "first {a}", "second")
    assert "Judgment A: first {a}\n\nJudgment B: second" in meta
    assert "{" not in render_meta_judge_prompt("Q", "R", "a", "b")


def test_hashes_are_stable_and_distinguish_templates():
    assert JUDGE_TEMPLATE_HASH == template_hash(JUDGE_TEMPLATE)
    assert len(JUDGE_TEMPLATE_HASH) == 16
    assert JUDGE_TEMPLATE_HASH != META_JUDGE_TEMPLATE_HASH
    assert template_hash(JUDGE_TEMPLATE + " ") != JUDGE_TEMPLATE_HASH


def test_evaluator_prompt_is_paper_a2():
    assert EVALUATOR_SYSTEM.startswith("You are a highly efficient assistant, who evaluates and selects the best large "
                                       "language model (LLMs)")
    for phrase in [
        "I require a leaderboard for various large language models.",
        '"instruction": """{instruction}""",',
        '"model_identifier": "m",\n        "output": """{output_1}"""',
        '"model_identifier": "M",\n        "output": """{output_2}"""',
        "Evaluate the models based on the quality and relevance of their outputs, and select the model that generated "
        "the best output.",
        "(no quotes, no spaces, no new lines, ...): m or M.",
    ]:
        assert phrase in EVALUATOR_TEMPLATE
    assert EVALUATOR_TEMPLATE.endswith("Best Model Identifier")


def test_evaluator_messages_put_output_1_as_m_verbatim():
    system, user = render_evaluator_messages("Say {output_2}", "first {instruction}", "second")
    assert system == {"role": "system", "content": EVALUATOR_SYSTEM}
    assert user["role"] == "user"
    content = user["content"]
    assert '"instruction": """Say {output_2}"""' in content
    assert content.index('"""first {instruction}"""') < content.index('"""second"""')
