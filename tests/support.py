"""Test support: a scripted backend of our own inference protocol, and the tiny model folder."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

from metareward.inference.base import ChoiceRequest, Completion, GenerationRequest, GenerationResult


class ScriptedBackend:
    """Implements the Backend protocol with canned completions: respond(prompt_text, n, seed) -> texts,
    choose(assistant_prefix, choices) -> index, or choose_request(ChoiceRequest) -> index when the answer depends
    on the whole request; choice probabilities from probabilities(ChoiceRequest) -> tuple or None (default: all on
    the chosen answer). Records every request it receives."""

    name = "scripted"
    engines = 1

    def __init__(self, respond: Callable[[str, int, int], list[str]],
                 choose: Callable[[str, tuple[str, ...]], int] | None = None,
                 choose_request: Callable[[ChoiceRequest], int] | None = None,
                 probabilities: Callable[[ChoiceRequest], tuple[float, ...] | None] | None = None):
        self.respond = respond
        self.choose_answer = choose_request or (lambda request: choose(request.assistant_prefix, request.choices))
        self.probabilities = probabilities or self._all_on_chosen
        self.requests: list[GenerationRequest] = []
        self.choice_requests: list[ChoiceRequest] = []
        self.closed = False

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        results = []
        for request in requests:
            self.requests.append(request)
            prompt = request.messages[-1]["content"]
            texts = self.respond(prompt, request.n, request.seed)
            assert len(texts) == request.n, f"script returned {len(texts)} texts for n={request.n}"
            completions = tuple(Completion(text, len(text.split()), "stop") for text in texts)
            results.append(GenerationResult(completions, prompt_tokens=len(prompt.split())))
        return results

    def choose(self, requests: Sequence[ChoiceRequest]) -> list[int]:
        self.choice_requests.extend(requests)
        return [self.choose_answer(request) for request in requests]

    def choice_probabilities(self, requests: Sequence[ChoiceRequest]) -> list[tuple[float, ...] | None]:
        self.choice_requests.extend(requests)
        return [self.probabilities(request) for request in requests]

    def _all_on_chosen(self, request: ChoiceRequest) -> tuple[float, ...]:
        chosen = self.choose_answer(request)
        return tuple(float(index == chosen) for index in range(len(request.choices)))

    def close(self) -> None:
        self.closed = True


def judged_response(judge_prompt: str) -> str:
    """The response text inside a rendered judge prompt."""
    return re.search(r"<response>(.*)</response>", judge_prompt, re.S).group(1)


def meta_judged_pair(meta_prompt: str) -> tuple[str, str]:
    """(judgment A, judgment B) inside a rendered meta-judge prompt."""
    match = re.search(r"Judgment A: (.*)\n\nJudgment B: (.*)\n\nAfter examining", meta_prompt, re.S)
    return match.group(1), match.group(2)
