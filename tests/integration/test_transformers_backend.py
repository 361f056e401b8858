"""Real generation with the transformers backend on the tiny model: rendering, n, seeds, context, verdicts."""

import pytest

from metareward.artifacts.tables import JUDGMENTS, META_JUDGMENTS, RESPONSES
from metareward.config.campaign import SamplingConfig
from metareward.inference.base import ChoiceRequest, GenerationRequest, InferenceError
from metareward.inference.rendering import ChatRenderer
from metareward.inference.roles import generate_responses, judge_responses, meta_judge
from metareward.inference.transformers_backend import TransformersBackend
from metareward.paper.preferences import score_responses, select_judged_responses
from metareward.pipeline.input_files import load_prompts
from tests.conftest import PROMPT_FILE

USER = ({"role": "user", "content": "Explain recursion."},)


@pytest.fixture(scope="module")
def backend(tiny_model):
    engine = TransformersBackend(tiny_model, dtype="float32", batch_size=8, max_model_len=2048)
    yield engine
    engine.close()


def test_rendering_adds_exactly_one_bos(tiny_model):
    renderer = ChatRenderer.from_pretrained(tiny_model)
    ids = renderer.render(USER)
    bos = renderer.tokenizer.bos_token_id
    assert ids[0] == bos and ids[1] != bos
    # What token ids avoid: tokenising the rendered text again adds a second BOS.
    text = renderer.tokenizer.apply_chat_template(list(USER), add_generation_prompt=True, tokenize=False)
    assert renderer.tokenizer(text)["input_ids"][:2] == [bos, bos]


def test_n_samples_reproducible_by_seed(backend):
    requests = [GenerationRequest(USER, n=3, max_tokens=12, seed=s) for s in (11, 12)]
    first = backend.generate(requests)
    assert [len(r.completions) for r in first] == [3, 3]
    assert all(1 <= c.n_tokens <= 12 and c.finish_reason in {"stop", "length"} for r in first for c in r.completions)
    assert backend.generate(requests) == first
    assert backend.generate([GenerationRequest(USER, n=3, max_tokens=12, seed=99)])[0] != first[0]


def test_greedy_is_deterministic_and_respects_max_tokens(backend):
    request = GenerationRequest(USER, n=2, max_tokens=7, temperature=0.0)
    result = backend.generate([request])[0]
    assert result.completions[0] == result.completions[1]
    assert result.completions[0].n_tokens <= 7


def test_prompt_longer_than_context_is_skipped(backend):
    long = ({"role": "user", "content": "word " * 5000},)
    results = backend.generate([GenerationRequest(long, n=2, max_tokens=5), GenerationRequest(USER, n=1, max_tokens=5)])
    assert results[0].skipped == "prompt_too_long" and results[0].completions == ()
    assert len(results[1].completions) == 1


def test_choose_samples_only_allowed_answers(backend):
    requests = [ChoiceRequest(USER, "Fine.\nScore: ", tuple("012345"), temperature=1.0, seed=s) for s in range(30)]
    answers = backend.choose(requests)
    assert set(answers) <= set(range(6)) and len(set(answers)) > 1
    assert backend.choose(requests) == answers
    greedy = backend.choose([ChoiceRequest(USER, "Winner: Judgement ", ("A", "B"), temperature=0.0)] * 2)
    assert greedy[0] == greedy[1]


def test_choice_probabilities_are_the_choices_softmax_and_agree_with_greedy_choice(backend):
    requests = [ChoiceRequest(USER, prefix, ("m", "M"), temperature=0.0)
                for prefix in ("", "Best: ", "I prefer model ")]
    probabilities = backend.choice_probabilities(requests)
    assert all(len(shares) == 2 and sum(shares) == pytest.approx(1.0) and 0 < min(shares) for shares in probabilities)
    assert [int(shares[1] > shares[0]) for shares in probabilities] == backend.choose(requests)
    # Temperature does not change them (AlpacaEval reads the distribution at temperature 1).
    hot = [ChoiceRequest(USER, r.assistant_prefix, r.choices, temperature=1.7, seed=3) for r in requests]
    assert backend.choice_probabilities(hot) == probabilities


def test_stages_on_tiny_model_forced_verdicts(backend):
    prompts = load_prompts(PROMPT_FILE).table.head(3)
    sampling = SamplingConfig(max_tokens=16)
    responses, stats = generate_responses(prompts, backend, 3, sampling, 0, 1, "tiny")
    assert responses.schema == RESPONSES and responses.height + stats.dropped_duplicates == 9
    assert stats.completion_tokens > 0 and stats.tokens_per_second > 0
    judgments, judge_stats = judge_responses(responses, prompts, backend, 2, sampling, 0, "forced", 1, "tiny")
    assert judgments.schema == JUDGMENTS and judgments.height == 2 * responses.height
    # Forced verdicts always parse, even from a random model.
    assert judge_stats.parse_failures == 0 and judgments["score"].null_count() == 0
    assert judgments["text"].str.contains(r"Score: [0-5]$").all()
    scores = score_responses(judgments)
    judged = select_judged_responses(scores, 0)
    meta, meta_stats = meta_judge(judged, judgments, responses, prompts, backend, sampling, 0, "forced", 1, "tiny")
    assert meta.schema == META_JUDGMENTS and meta.height == 2 * judged.height  # 2 judgments → 2 ordered pairs
    assert set(meta["winner"]) <= {"A", "B"} and meta_stats.parse_failures == 0


def test_free_verdicts_from_a_random_model_mostly_fail_to_parse(backend):
    prompts = load_prompts(PROMPT_FILE).table.head(2)
    sampling = SamplingConfig(max_tokens=8)
    responses, _ = generate_responses(prompts, backend, 2, sampling, 0, 1, "tiny")
    judgments, stats = judge_responses(responses, prompts, backend, 2, sampling, 0, "free", 1, "tiny")
    assert stats.parse_failures == judgments["score"].null_count() == judgments.height
    assert set(judgments["verdict_mode"]) == {"free"}


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(InferenceError, match="cannot load model"):
        TransformersBackend(tmp_path / "nothing")


def test_every_request_is_counted_as_it_finishes(backend):
    from metareward.inference import progress

    events = []
    listener = lambda label, expected, done, tokens: events.append((label, expected, done, tokens))  # noqa: E731
    progress.add_request_listener(listener)
    try:
        prompts = load_prompts(PROMPT_FILE).table.head(5)
        with progress.labelled("iter-1 responses"):
            generate_responses(prompts, backend, 2, SamplingConfig(max_tokens=4), 0, 1, "m")
        generate_responses(prompts, backend, 2, SamplingConfig(max_tokens=4), 0, 1, "m")  # outside a job: silent
    finally:
        progress.remove_request_listener(listener)
    assert {label for label, _, _, _ in events} == {"iter-1 responses"}
    assert sum(expected for _, expected, _, _ in events) == sum(done for _, _, done, _ in events) == 5
    # Batches of 8 sequences hold 4 requests of n = 2: the bar moves per batch, before the stage ends.
    assert [done for _, _, done, _ in events if done] == [4, 1]
    # Each finished batch counts the tokens its completions generated: 5 prompts x 2 samples x at most 4 tokens.
    assert 0 < sum(tokens for *_, tokens in events) <= 5 * 2 * 4
