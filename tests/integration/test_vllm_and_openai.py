"""vLLM served from its own venv, and the openai backend against it: token-id prompts, n, seeds, prefix
caching, forced verdicts, retries and the failures a user will meet (unreachable, rejected, dead engine)."""

import http.server
import json
import threading

import pytest

from metareward.artifacts.tables import JUDGMENTS
from metareward.config.campaign import SamplingConfig
from metareward.inference.base import (
    BackendUnavailableError,
    ChoiceRequest,
    GenerationRequest,
    RequestRejectedError,
)
from metareward.inference.openai_backend import OpenAIBackend
from metareward.inference.roles import generate_responses, judge_responses
from metareward.inference.transformers_backend import TransformersBackend
from metareward.inference.vllm_backend import VLLMBackend, _group_alive
from metareward.pipeline.input_files import load_prompts
from tests.conftest import PROMPT_FILE

USER = ({"role": "user", "content": "Explain recursion."},)
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def vllm(tiny_model, vllm_python, tmp_path_factory):
    backend = VLLMBackend(
        tiny_model, python=vllm_python, dtype="float32", max_model_len=2048, seed=0,
        log_dir=tmp_path_factory.mktemp("vllm-logs"), startup_timeout_s=600,
    )
    yield backend
    backend.close()


def test_greedy_matches_transformers(vllm, tiny_model):
    requests = [GenerationRequest(({"role": "user", "content": f"Question {i}"},), n=1, max_tokens=16, temperature=0.0)
                for i in range(3)]
    reference = TransformersBackend(tiny_model, dtype="float32")
    try:
        expected = [r.completions[0].text for r in reference.generate(requests)]
    finally:
        reference.close()
    assert [r.completions[0].text for r in vllm.generate(requests)] == expected


def test_n_and_seed(vllm):
    requests = [GenerationRequest(USER, n=4, max_tokens=10, seed=s) for s in (123457, 987651)]
    first = vllm.generate(requests)
    assert [len(r.completions) for r in first] == [4, 4]
    assert all(1 <= c.n_tokens <= 10 for r in first for c in r.completions)
    assert vllm.generate(requests) == first
    assert first[0].prompt_tokens == len(vllm.renderer.render(USER))


def test_forced_choice_uses_allowed_tokens(vllm, tiny_model):
    requests = [ChoiceRequest(USER, "Fine.\nScore: ", tuple("012345"), temperature=1.0, seed=s) for s in range(20)]
    answers = vllm.choose(requests)
    assert set(answers) <= set(range(6)) and len(set(answers)) > 1
    greedy = [ChoiceRequest(USER, "Fine.\nScore: ", tuple("012345"), temperature=0.0)]
    reference = TransformersBackend(tiny_model, dtype="float32")
    try:
        assert vllm.choose(greedy) == reference.choose(greedy)
    finally:
        reference.close()


def test_choice_probabilities_equal_transformers_and_the_top_logprobs_path(vllm, tiny_model):
    requests = [ChoiceRequest(USER, prefix, ("m", "M"), temperature=0.0) for prefix in ("", "Best: ")]
    reference = TransformersBackend(tiny_model, dtype="float32")
    try:
        expected = reference.choice_probabilities(requests)
    finally:
        reference.close()
    # vLLM is asked for exactly the choices' log-probabilities (logprob_token_ids).
    for shares, wanted in zip(vllm.choice_probabilities(requests), expected, strict=True):
        assert shares == pytest.approx(wanted, abs=1e-4)
    # Another OpenAI-compatible server is asked for its top 5, as AlpacaEval asks: on a random model m and M are
    # rarely among them; a choice that is absent has probability 0, and neither present is no verdict.
    generic = OpenAIBackend(vllm.base_urls, vllm.model, tokenizer_path=tiny_model, max_model_len=2048)
    for shares in generic.choice_probabilities(requests):
        assert shares is None or (sum(shares) == pytest.approx(1.0) and len(shares) == 2)


def test_judging_stage_and_prefix_cache(vllm):
    prompts = load_prompts(PROMPT_FILE).table.head(2)
    sampling = SamplingConfig(max_tokens=12)
    queried_before, hits_before = vllm.prefix_cache_stats()
    responses, _ = generate_responses(prompts, vllm, 2, sampling, 0, 1, "tiny")
    judgments, stats = judge_responses(responses, prompts, vllm, 3, sampling, 0, "forced", 1, "tiny")
    assert judgments.schema == JUDGMENTS and judgments.height == 3 * responses.height
    assert stats.parse_failures == 0
    queried, hits = vllm.prefix_cache_stats()
    # The forced verdicts re-send each judge prompt: those prefixes must come from the cache.
    assert queried > queried_before and hits > hits_before


def test_prompt_longer_than_context_is_skipped(vllm):
    long = ({"role": "user", "content": "word " * 5000},)
    result = vllm.generate([GenerationRequest(long, n=2, max_tokens=4)])[0]
    assert result.skipped == "prompt_too_long"


def test_openai_backend_against_the_same_server(vllm, tiny_model):
    with_tokens = OpenAIBackend(vllm.base_urls, vllm.model, tokenizer_path=tiny_model, max_model_len=2048)
    requests = [GenerationRequest(USER, n=1, max_tokens=8, temperature=0.0)]
    assert with_tokens.generate(requests)[0].completions[0].text == vllm.generate(requests)[0].completions[0].text
    assert with_tokens.choose([ChoiceRequest(USER, "Winner: Judgement ", ("A", "B"), temperature=0.0)])[0] in (0, 1)
    chat_only = OpenAIBackend(vllm.base_urls, vllm.model)
    result = chat_only.generate([GenerationRequest(USER, n=2, max_tokens=6)])[0]
    assert len(result.completions) == 2
    with pytest.raises(Exception, match="tokenizer"):
        chat_only.choose([ChoiceRequest(USER, "Score: ", tuple("012345"))])
    with pytest.raises(RequestRejectedError, match="HTTP 404"):
        OpenAIBackend(vllm.base_urls, "no-such-model", max_retries=0).generate(requests)


def test_engine_that_dies_mid_stage_is_a_clear_error(vllm, monkeypatch):
    # Runs last in this module: it kills the shared server, as soon as its first answer is in (mid-stage).
    server = vllm.servers[0]
    answer_then_die = vllm._post

    def post(*args):
        answer = answer_then_die(*args)
        server.process.kill()
        return answer

    monkeypatch.setattr(vllm, "_post", post)
    prompts = load_prompts(PROMPT_FILE).table.head(40)
    requests = [GenerationRequest(({"role": "user", "content": p},), n=4, max_tokens=200) for p in prompts["prompt"]]
    vllm.max_retries, vllm.backoff_s = 1, 0.1
    with pytest.raises(BackendUnavailableError, match="died"):
        vllm.generate(requests)
    # The server's engine core and workers outlive it; stopping must end them too (GBs of memory each).
    server.stop(grace_s=10)
    assert not _group_alive(server.process.pid)


def test_unreachable_server_is_a_clear_error():
    backend = OpenAIBackend(["http://127.0.0.1:9"], "m", max_retries=1, backoff_s=0.01)
    with pytest.raises(BackendUnavailableError, match=r"127.0.0.1:9/v1/chat/completions: cannot connect.*2 attempts"):
        backend.generate([GenerationRequest(USER)])


class _FlakyHandler(http.server.BaseHTTPRequestHandler):
    """Answers 503 twice, then a completion; 400 for n > 8."""

    calls = 0

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).calls += 1
        if body["n"] > 8:
            self._reply(400, {"error": {"message": "n must be at most 8"}})
        elif type(self).calls <= 2:
            self._reply(503, {"error": "busy"})
        else:
            choices = [{"index": i, "message": {"content": f"answer {i}"}, "finish_reason": "stop"}
                       for i in range(body["n"])]
            self._reply(200, {"choices": choices, "usage": {"prompt_tokens": 5, "completion_tokens": 2 * body["n"]}})

    def _reply(self, status, payload):
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


def test_retries_on_5xx_then_succeeds_and_4xx_fails_at_once():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FlakyHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        backend = OpenAIBackend([url], "m", max_retries=3, backoff_s=0.01, max_concurrency=1)
        result = backend.generate([GenerationRequest(USER, n=3)])[0]
        assert [c.text for c in result.completions] == ["answer 0", "answer 1", "answer 2"]
        assert _FlakyHandler.calls == 3
        with pytest.raises(RequestRejectedError, match="HTTP 400.*n must be at most 8"):
            backend.generate([GenerationRequest(USER, n=9)])
        assert _FlakyHandler.calls == 4
    finally:
        server.shutdown()


def test_an_engine_killed_between_shards_is_replaced_not_reused(tiny_model, vllm_python, tmp_path):
    """The in-process path: shared_backend keeps one engine for every shard of a model, but an engine whose server was
    killed between two shards (OOM killer, a crashed engine core) is closed and replaced by the next shard's call."""
    import os
    import signal

    from metareward.config.campaign import InferenceConfig, ModelConfig
    from metareward.inference.engines import close_shared_backends, shared_backend

    model = ModelConfig(path=str(tiny_model), dtype="float32")
    inference = InferenceConfig(backend="vllm", vllm_python=str(vllm_python), max_model_len=2048,
                                startup_timeout_s=600)
    request = [GenerationRequest(USER, n=1, max_tokens=4, temperature=0.0)]
    try:
        first = shared_backend(model, inference, str(tiny_model), log_dir=tmp_path)
        assert shared_backend(model, inference, str(tiny_model), log_dir=tmp_path) is first  # kept between shards
        answer = first.generate(request)[0].completions[0].text
        os.killpg(first.servers[0].process.pid, signal.SIGKILL)
        first.servers[0].process.wait(timeout=30)
        assert not first.alive()
        second = shared_backend(model, inference, str(tiny_model), log_dir=tmp_path)
        assert second is not first and second.alive()
        assert second.generate(request)[0].completions[0].text == answer
        assert not _group_alive(first.servers[0].process.pid)  # the dead engine's workers were stopped too
    finally:
        close_shared_backends()
