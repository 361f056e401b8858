"""OpenAI-compatible HTTP backend (a vLLM or SGLang server, a hosted API): bounded concurrency and retries."""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

import httpx
import numpy as np

from metareward.inference import progress
from metareward.inference.base import (
    BackendUnavailableError,
    ChoiceRequest,
    Completion,
    GenerationRequest,
    GenerationResult,
    InferenceError,
    RequestRejectedError,
)
from metareward.inference.rendering import ChatRenderer

_RETRIED_STATUS = {408, 409, 429, 500, 502, 503, 504}
_TOP_LOGPROBS = 5
"""How many next-token log-probabilities a server other than vLLM is asked for (AlpacaEval 2's top_logprobs)."""
_CONTEXT_ERRORS = ("maximum context length", "context length", "too long", "exceeds the max")


class OpenAIBackend:
    """Talks to one or more OpenAI-compatible servers.

    With a tokenizer (`tokenizer_path`), prompts are rendered once with the model's chat template and sent
    as token ids to /v1/completions — the way to drive a vLLM server without a second BOS; forced
    verdicts need this. Without one, messages go to /v1/chat/completions. Requests run on at most
    `max_concurrency` threads, spread over the servers; contiguous blocks of requests go to the same
    server so that requests sharing a prefix meet in its cache. Timeouts, connection errors, 429 and 5xx are retried
    with exponential back-off and jitter; other 4xx fail at once with the server's message, except a
    context-length refusal, which skips the prompt. `extra_body` adds server-specific fields to every
    generation request (vLLM: return_token_ids, for exact token counts).
    """

    name = "openai"

    def __init__(
        self,
        base_urls: Sequence[str],
        model: str,
        tokenizer_path: str | Path | None = None,
        chat_template: str | None = None,
        api_key: str | None = None,
        max_concurrency: int = 16,
        max_retries: int = 5,
        timeout_s: float = 600.0,
        backoff_s: float = 1.0,
        max_model_len: int | None = None,
        choice_restriction: str = "logit_bias",
        extra_body: dict | None = None,
    ):
        if not base_urls:
            raise InferenceError("openai backend needs at least one base URL (inference.base_url)")
        self.base_urls = [url.rstrip("/") for url in base_urls]
        self.engines = len(self.base_urls)
        self.model = model
        self.renderer = ChatRenderer.from_pretrained(tokenizer_path, chat_template) if tokenizer_path else None
        self.max_concurrency = max_concurrency
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_model_len = max_model_len
        self.choice_restriction = choice_restriction
        self.extra_body = extra_body or {}
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=min(timeout_s, 10.0)),
            limits=httpx.Limits(max_connections=max_concurrency, max_keepalive_connections=max_concurrency),
        )

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """One result per request, in order; raises InferenceError if any request fails for good."""
        return self._map(self._generate_one, requests)

    def choose(self, requests: Sequence[ChoiceRequest]) -> list[int]:
        """Sample one token restricted to each request's choices (needs a tokenizer)."""
        if self.renderer is None:
            raise InferenceError(
                "forced verdicts need token-level prompts: give the openai backend a tokenizer "
                "(inference.tokenizer) or use verdict_mode: free"
            )
        return self._map(self._choose_one, requests)

    def choice_probabilities(self, requests: Sequence[ChoiceRequest]) -> list[tuple[float, ...] | None]:
        """The choices' log-probabilities of the next token as the server reports them, renormalised over the
        choices. A vLLM server is asked for exactly those tokens (logprob_token_ids); another OpenAI-compatible
        server for its top 5 log-probabilities, as AlpacaEval asks, a choice absent from them having probability 0
        (None when none is there). Needs a tokenizer, as choose does."""
        if self.renderer is None:
            raise InferenceError(
                "evaluator probabilities need token-level prompts: give the openai backend a tokenizer "
                "(inference.tokenizer) or use verdict_mode: free"
            )
        return self._map(self._choice_probabilities_one, requests)

    def alive(self) -> bool:
        """Whether the client is open: a remote server's outages are the retries' to heal, not a reason for a new
        client."""
        return not self._client.is_closed

    def close(self) -> None:
        """Close the HTTP connections."""
        self._client.close()

    def _map(self, function, requests: Sequence) -> list:
        if not requests:
            return []
        blocks = len(self.base_urls)
        block_of = [index * blocks // len(requests) for index in range(len(requests))]
        starts = {block: block_of.index(block) for block in set(block_of)}
        # Each server gets a contiguous block (shared prefixes meet in its cache), but the pool takes requests
        # in submission order: submitting the blocks interleaved keeps every server busy, not the first few.
        order = sorted(range(len(requests)), key=lambda index: (index - starts[block_of[index]], block_of[index]))
        with ThreadPoolExecutor(max_workers=self.max_concurrency) as pool:
            futures = {index: pool.submit(function, requests[index], self.base_urls[block_of[index]])
                       for index in order}
            for future in as_completed(futures.values()):
                result = future.result()
                progress.finished(1, progress.generated_tokens([result]) if isinstance(result, GenerationResult) else 0)
            return [futures[index].result() for index in range(len(requests))]

    def _generate_one(self, request: GenerationRequest, server: str) -> GenerationResult:
        body = {
            **self.extra_body,
            "model": self.model,
            "n": request.n,
            "temperature": request.temperature,
            "top_p": request.top_p,
            "max_tokens": request.max_tokens,
            "seed": request.seed,
        }
        if request.stop:
            body["stop"] = list(request.stop)
        if self.renderer is not None:
            prompt_ids = self.renderer.render(request.messages)
            if self.max_model_len is not None:
                if len(prompt_ids) >= self.max_model_len:
                    return GenerationResult((), len(prompt_ids), skipped="prompt_too_long")
                body["max_tokens"] = min(request.max_tokens, self.max_model_len - len(prompt_ids))
            reply = self._post(server, "/v1/completions", {**body, "prompt": prompt_ids})
        else:
            prompt_ids = None
            reply = self._post(server, "/v1/chat/completions", {**body, "messages": list(request.messages)})
        if reply is None:
            return GenerationResult((), len(prompt_ids or ()), skipped="prompt_too_long")
        usage = reply.get("usage") or {}
        choices = sorted(reply["choices"], key=lambda choice: choice.get("index", 0))
        completions = []
        for choice in choices:
            text = choice["text"] if "text" in choice else (choice.get("message") or {}).get("content") or ""
            if choice.get("token_ids") is not None:
                n_tokens = len(choice["token_ids"])
            elif self.renderer is not None:
                n_tokens = self.renderer.count_tokens(text)
            else:
                n_tokens = round(usage.get("completion_tokens", 0) / max(1, len(choices)))
            completions.append(Completion(text=text, n_tokens=n_tokens,
                                          finish_reason=choice.get("finish_reason") or "stop"))
        return GenerationResult(tuple(completions), usage.get("prompt_tokens", len(prompt_ids or ())))

    def _choose_one(self, request: ChoiceRequest, server: str) -> int:
        prompt_ids, choice_ids = self.renderer.choice_tokens(request.messages, request.assistant_prefix,
                                                             request.choices)
        body = {
            "model": self.model,
            "prompt": prompt_ids,
            "max_tokens": 1,
            "temperature": request.temperature,
            "seed": request.seed,
            "logprobs": 1,
        }
        if self.choice_restriction == "allowed_token_ids":
            body["allowed_token_ids"] = choice_ids
        else:
            body["logit_bias"] = {str(token): 100 for token in choice_ids}
        reply = self._post(server, "/v1/completions", body)
        if reply is None:
            raise RequestRejectedError(f"{server}: verdict prompt of {len(prompt_ids)} tokens does not fit the context")
        choice = reply["choices"][0]
        token_text = choice.get("text", "")
        for index, answer in enumerate(request.choices):
            if token_text.strip() == answer.strip():
                return index
        raise InferenceError(f"{server} answered {token_text!r}, not one of {list(request.choices)}")

    def _choice_probabilities_one(self, request: ChoiceRequest, server: str) -> tuple[float, ...] | None:
        prompt_ids, choice_ids = self.renderer.choice_tokens(request.messages, request.assistant_prefix,
                                                             request.choices)
        body = {"model": self.model, "prompt": prompt_ids, "max_tokens": 1, "temperature": 1.0, "seed": request.seed}
        if self.choice_restriction == "allowed_token_ids":
            body.update(logprobs=1, logprob_token_ids=choice_ids, allowed_token_ids=choice_ids,
                        return_tokens_as_token_ids=True)
            keys = [[f"token_id:{token}"] for token in choice_ids]
        else:
            body["logprobs"] = _TOP_LOGPROBS
            keys = None
        reply = self._post(server, "/v1/completions", body)
        if reply is None:
            raise RequestRejectedError(f"{server}: verdict prompt of {len(prompt_ids)} tokens does not fit the context")
        top = ((reply["choices"][0].get("logprobs") or {}).get("top_logprobs") or [None])[0] or {}
        if keys is None:
            keys = [[token for token in top if token.strip() == answer.strip()] for answer in request.choices]
        logprobs = np.array([max((top[key] for key in choice_keys if key in top), default=-np.inf)
                             for choice_keys in keys])
        if not np.isfinite(logprobs).any():
            return None
        weights = np.exp(logprobs - logprobs.max())
        return tuple(float(weight) for weight in weights / weights.sum())

    def _post(self, server: str, path: str, body: dict) -> dict | None:
        """POST with retries; None when the server refuses the prompt as too long for its context."""
        url = server + path
        cause = ""
        for attempt in range(self.max_retries + 1):
            if attempt:
                delay = min(30.0, self.backoff_s * 2 ** (attempt - 1)) * (0.5 + random.random())
                time.sleep(delay)
            try:
                response = self._client.post(url, json=body)
            except httpx.TimeoutException:
                cause = "timed out"
                continue
            except httpx.TransportError as error:
                cause = f"cannot connect ({type(error).__name__}: {error})"
                continue
            if response.status_code == 200:
                return response.json()
            detail = response.text[:500]
            if response.status_code in _RETRIED_STATUS:
                cause = f"HTTP {response.status_code}: {detail}"
                continue
            if response.status_code == 400 and any(marker in detail.lower() for marker in _CONTEXT_ERRORS):
                return None
            raise RequestRejectedError(f"{url} rejected the request (HTTP {response.status_code}): {detail}")
        raise BackendUnavailableError(f"{url}: {cause} (gave up after {self.max_retries + 1} attempts)")
