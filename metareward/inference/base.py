"""The one inference protocol every backend implements: requests, completions, verdict choices, errors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

Messages = tuple[dict[str, str], ...]


class InferenceError(RuntimeError):
    """A model call that failed for good (after retries); the message names the backend and the cause."""


class BackendUnavailableError(InferenceError):
    """The engine or server cannot be reached or died; nothing of the failed batch is returned."""


class RequestRejectedError(InferenceError):
    """The server refused a request as malformed (HTTP 4xx other than 429); retrying would not help."""


@dataclass(frozen=True)
class GenerationRequest:
    """n samples for one chat prompt. The backend renders `messages` once with the model's chat template
    into token ids (never re-tokenised text); `seed` makes the samples reproducible."""

    messages: Messages
    n: int = 1
    temperature: float = 0.8
    top_p: float = 0.95
    max_tokens: int = 1024
    seed: int = 0
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Completion:
    """One sampled completion: its text (stop string excluded), its token count and why it ended."""

    text: str
    n_tokens: int
    finish_reason: str


@dataclass(frozen=True)
class GenerationResult:
    """The completions of one request. `skipped` is set (and completions empty) when the prompt does not fit
    the model's context — counted by the stages, never a crash."""

    completions: tuple[Completion, ...]
    prompt_tokens: int
    skipped: str | None = None


@dataclass(frozen=True)
class ChoiceRequest:
    """A forced verdict: the prompt, the assistant's text so far ending in a verdict prefix (e.g. its
    justification + "Score: "), and the allowed answers. The backend samples one answer from the model's
    next-token distribution restricted to the answers (greedy at temperature 0)."""

    messages: Messages
    assistant_prefix: str
    choices: tuple[str, ...]
    temperature: float = 0.8
    seed: int = 0


class Backend(Protocol):
    """What the stage functions need from an engine. Implementations: transformers, vllm, openai."""

    name: str
    engines: int
    """How many engines (GPUs, servers) serve the requests of one call at once."""

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """One result per request, in order. Raises InferenceError when the engine fails for good."""
        ...

    def choose(self, requests: Sequence[ChoiceRequest]) -> list[int]:
        """For each request, the index of the sampled answer in its `choices`."""
        ...

    def choice_probabilities(self, requests: Sequence[ChoiceRequest]) -> list[tuple[float, ...] | None]:
        """For each request, the model's next-token probabilities of its `choices` renormalised over them
        (P(choice) / Σ P(choices), at temperature 1, whatever the request's temperature: what AlpacaEval reads from
        the evaluator's log-probabilities); None where the engine reported none of the choices."""
        ...

    def alive(self) -> bool:
        """Whether the engine can still serve: False once it died (its server process ended) or was closed. A dead
        engine is never reused: the next stage job gets a new one."""
        ...

    def close(self) -> None:
        """Free the engine (GPU memory, server processes). The backend is unusable afterwards."""
        ...
