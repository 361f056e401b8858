"""The model's three roles as stages over tables — actor responses, judge judgments, meta-judge verdicts — and the
evaluator's pairwise verdicts between two models' answers."""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import numpy as np
import polars as pl

from metareward.artifacts.stats import StageStats
from metareward.artifacts.tables import EVAL_COMPARISONS, JUDGMENTS, META_JUDGMENTS, RESPONSES, content_id, content_seed
from metareward.config.campaign import SamplingConfig
from metareward.inference import progress
from metareward.inference.base import Backend, ChoiceRequest, GenerationRequest, GenerationResult, Messages
from metareward.paper.parsing import parse_model_identifier, parse_score, parse_winner, without_score
from metareward.paper.prompts import (
    EVALUATOR_IDENTIFIERS,
    SCORE_PREFIX,
    WINNER_PREFIX,
    render_evaluator_messages,
    render_judge_prompt,
    render_meta_judge_prompt,
)

VERDICT_MODES = ("free", "forced")
SCORE_CHOICES = tuple(str(score) for score in range(6))
WINNER_CHOICES = ("A", "B")


def generate_responses(
    prompts: pl.DataFrame,
    backend: Backend,
    num_responses: int,
    sampling: SamplingConfig,
    seed: int,
    iteration: int,
    model_id: str,
) -> tuple[pl.DataFrame, StageStats]:
    """Actor (paper sec. 2.1): K = num_responses samples per prompt in one request; identical responses of
    a prompt are dropped (the first kept) and counted; prompts too long for the context are skipped and
    counted. Returns the responses table and the stage's statistics."""
    stats = StageStats("generate")
    prompt_ids = prompts["prompt_id"].to_list()
    requests = [
        _request(_user(prompt), num_responses, sampling, content_seed(seed, "actor", prompt_id), stop=None)
        for prompt_id, prompt in zip(prompt_ids, prompts["prompt"], strict=True)
    ]
    rows = []
    for prompt_id, result in zip(prompt_ids, _generate(backend, requests, stats), strict=True):
        seen: set[str] = set()
        for sample_idx, completion in enumerate(result.completions):
            if completion.text in seen:
                stats.dropped_duplicates += 1
                continue
            seen.add(completion.text)
            rows.append(
                (prompt_id, content_id(prompt_id, completion.text), sample_idx, completion.text,
                 len(completion.text), completion.n_tokens, completion.finish_reason, iteration, model_id)
            )
    table = pl.DataFrame(rows, schema=RESPONSES, orient="row")
    stats.rows = table.height
    stats.counts["chars_sum"] = int(table["n_chars"].sum())
    return table, stats


def judge_responses(
    responses: pl.DataFrame,
    prompts: pl.DataFrame,
    backend: Backend,
    num_judgments: int,
    sampling: SamplingConfig,
    seed: int,
    verdict_mode: str,
    iteration: int,
    model_id: str,
) -> tuple[pl.DataFrame, StageStats]:
    """Judge (paper sec. 2.1, prompt A.1): N = num_judgments judgments per response in one request, the
    score parsed from the last "Score: X" (null when invalid, counted as a parse failure).

    verdict_mode "free" is the paper's: the judge writes everything. "forced" stops the judge at "Score:",
    then appends "Score: " and samples the score from the model's next-token distribution over 0–5, so
    every judgment parses (for small models that rarely follow the format).
    """
    stats = StageStats("judge")
    pairs = responses.join(prompts.select("prompt_id", "prompt"), on="prompt_id", how="left")
    messages = [_user(render_judge_prompt(p, r)) for p, r in zip(pairs["prompt"], pairs["text"], strict=True)]
    response_ids = pairs["response_id"].to_list()
    requests = [
        _request(m, num_judgments, sampling, content_seed(seed, "judge", rid), stop=_stop(verdict_mode, "Score:"))
        for m, rid in zip(messages, response_ids, strict=True)
    ]
    results = _generate(backend, requests, stats)
    keys, texts, completions, sample_messages = [], [], [], []
    for prompt_id, response_id, message, result in zip(pairs["prompt_id"], response_ids, messages, results,
                                                        strict=True):
        for sample_idx, completion in enumerate(result.completions):
            keys.append((prompt_id, response_id, sample_idx))
            texts.append(completion.text)
            completions.append(completion)
            sample_messages.append(message)
    if verdict_mode == "forced":
        seeds = [content_seed(seed, "judge-verdict", rid, idx) for _, rid, idx in keys]
        texts = _force(backend, sample_messages, texts, SCORE_PREFIX, SCORE_CHOICES, sampling, seeds, stats)
    rows = []
    for (prompt_id, response_id, sample_idx), text, completion in zip(keys, texts, completions, strict=True):
        score = parse_score(text)
        stats.parse_failures += score is None
        rows.append(
            (prompt_id, response_id, content_id(response_id, str(sample_idx), text), sample_idx, text, score,
             verdict_mode, len(text), completion.n_tokens, completion.finish_reason, iteration, model_id)
        )
    table = pl.DataFrame(rows, schema=JUDGMENTS, orient="row")
    stats.rows = table.height
    stats.counts.update(chars_sum=int(table["n_chars"].sum()), score_sum=float(table["score"].sum()),
                        valid_scores=int(table["score"].count()), top_scores=int((table["score"] == 5).sum()))
    return table, stats


def meta_judge(
    judged: pl.DataFrame,
    judgments: pl.DataFrame,
    responses: pl.DataFrame,
    prompts: pl.DataFrame,
    backend: Backend,
    sampling: SamplingConfig,
    seed: int,
    verdict_mode: str,
    iteration: int,
    model_id: str,
    sees_scores: bool = True,
) -> tuple[pl.DataFrame, StageStats]:
    """Meta-judge (paper sec. 2.2, Fig. 2): for each judged response (table with prompt_id, response_id),
    every ordered pair (m, n), m ≠ n, of its valid judgments — both orders, to measure positional bias. With
    sees_scores false the judgments are shown without their "Score: X" line (parsing.without_score).

    Requests are issued response by response, so the shared rubric + prompt + response prefix stays in the
    engine's prefix cache. winner is "A", "B" or null (unparsed). verdict_mode as in judge_responses, with
    the prefix "Winner: Judgement " and the answers A/B.
    """
    stats = StageStats("meta_judge")
    valid = (
        judged.select("response_id")
        .join(judgments.filter(pl.col("score").is_not_null()), on="response_id", how="inner")
        .select("prompt_id", "response_id", "judgment_id", "sample_idx", "text")
    )
    if not sees_scores:
        valid = valid.with_columns(pl.col("text").map_elements(without_score, return_dtype=pl.String))
    battles = (
        valid.join(valid.select("response_id", "judgment_id", "sample_idx", "text"), on="response_id", suffix="_second")
        .filter(pl.col("judgment_id") != pl.col("judgment_id_second"))
        .join(responses.select("response_id", pl.col("text").alias("response")), on="response_id")
        .join(prompts.select("prompt_id", "prompt"), on="prompt_id")
        .sort("prompt_id", "response_id", "sample_idx", "sample_idx_second")
    )
    keys = battles.select("prompt_id", "response_id", "judgment_id", "judgment_id_second").rows()
    messages = [
        _user(render_meta_judge_prompt(prompt, response, first, second))
        for prompt, response, first, second in battles.select("prompt", "response", "text", "text_second").iter_rows()
    ]
    requests = [
        _request(m, 1, sampling, content_seed(seed, "meta", first, second), stop=_stop(verdict_mode, "Winner:"))
        for m, (_, _, first, second) in zip(messages, keys, strict=True)
    ]
    results = _generate(backend, requests, stats)
    answered = [i for i, result in enumerate(results) if result.skipped is None]
    texts = [results[i].completions[0].text for i in answered]
    if verdict_mode == "forced":
        seeds = [content_seed(seed, "meta-verdict", keys[i][2], keys[i][3]) for i in answered]
        texts = _force(backend, [messages[i] for i in answered], texts, WINNER_PREFIX, WINNER_CHOICES, sampling, seeds,
                       stats)
    rows = []
    for i, text in zip(answered, texts, strict=True):
        winner = parse_winner(text)
        stats.parse_failures += winner is None
        completion = results[i].completions[0]
        rows.append(
            (*keys[i], text, winner, verdict_mode, completion.n_tokens, completion.finish_reason, iteration, model_id)
        )
    table = pl.DataFrame(rows, schema=META_JUDGMENTS, orient="row")
    stats.rows = table.height
    stats.counts.update(winner_a=int((table["winner"] == "A").sum()), winner_b=int((table["winner"] == "B").sum()))
    return table, stats


def _user(content: str) -> Messages:
    return ({"role": "user", "content": content},)


def _stop(verdict_mode: str, marker: str) -> str | None:
    if verdict_mode not in VERDICT_MODES:
        raise ValueError(f"verdict_mode must be one of {VERDICT_MODES}, got {verdict_mode!r}")
    # Forced mode lets the model justify freely and writes the verdict prefix itself.
    return marker if verdict_mode == "forced" else None


def _request(messages: Messages, n: int, sampling: SamplingConfig, seed: int, stop: str | None) -> GenerationRequest:
    return GenerationRequest(
        messages=messages, n=n, temperature=sampling.temperature, top_p=sampling.top_p,
        max_tokens=sampling.max_tokens, seed=seed, stop=(stop,) if stop else (),
    )


@contextmanager
def _model_calls(backend: Backend, requests: Sequence, stats: StageStats) -> Iterator[None]:
    """Announce `requests` to the progress bars, and count them and the engines' time in `stats`."""
    progress.expect(len(requests))
    started = time.perf_counter()
    yield
    stats.add_model_time(time.perf_counter() - started, backend.engines)
    stats.requests += len(requests)


def _generate(backend: Backend, requests: Sequence[GenerationRequest], stats: StageStats) -> list[GenerationResult]:
    with _model_calls(backend, requests, stats):
        results = backend.generate(requests)
    for result in results:
        stats.prompt_tokens += result.prompt_tokens
        stats.completion_tokens += sum(completion.n_tokens for completion in result.completions)
        stats.skipped_prompts += result.skipped is not None
    return results


def _force(
    backend: Backend,
    messages: list[Messages],
    justifications: list[str],
    prefix: str,
    choices: tuple[str, ...],
    sampling: SamplingConfig,
    seeds: list[int],
    stats: StageStats,
) -> list[str]:
    """Each justification, the verdict prefix, and the answer sampled from the allowed choices."""
    requests = [
        ChoiceRequest(messages=m, assistant_prefix=_with_prefix(text, prefix), choices=choices,
                      temperature=sampling.temperature, seed=seed)
        for m, text, seed in zip(messages, justifications, seeds, strict=True)
    ]
    answers = _choose(backend, requests, stats)
    return [request.assistant_prefix + choices[answer] for request, answer in zip(requests, answers, strict=True)]


def _choose(backend: Backend, requests: Sequence[ChoiceRequest], stats: StageStats) -> list[int]:
    with _model_calls(backend, requests, stats):
        answers = backend.choose(requests)
    stats.completion_tokens += len(answers)
    return answers


def _probabilities_text(share: tuple[float, ...] | None) -> str:
    """'P(m)=0.731 P(M)=0.269': a forced evaluator's answer as stored in the comparisons' text column."""
    if share is None:
        return ""
    return " ".join(f"P({name})={value:.3f}" for name, value in zip(EVALUATOR_IDENTIFIERS, share, strict=True))


def _with_prefix(justification: str, prefix: str) -> str:
    body = justification.rstrip()
    return f"{body}\n{prefix}" if body else prefix


def compare_answers(
    pairs: pl.DataFrame,
    backend: Backend,
    verdict_mode: str,
    max_tokens: int,
    seed: int,
    iteration: int,
    model_id: str,
    evaluator_id: str,
) -> tuple[pl.DataFrame, StageStats]:
    """Evaluator (paper A.2, AlpacaEval's prompt): for each row of `pairs` (prompt_id, prompt, trained, reference
    answers) two comparisons, the trained model's answer shown first ("m") and second ("M"). verdict_mode
    "forced" reads the evaluator's next-token probabilities of m and M, as AlpacaEval 2's default annotator
    (weighted_alpaca_eval_gpt4_turbo) does: the preference is the trained answer's share P(its identifier) /
    (P(m) + P(M)), the verdict the likelier identifier (no verdict when the engine reports neither). "free" lets the
    evaluator answer greedily in up to max_tokens and parses "m"/"M" (parsing.parse_model_identifier; anything else
    is a parse failure): preference 1 or 0. Identical answers are a tie (½) without a call, as in AlpacaEval.
    Returns the EVAL_COMPARISONS table (model_id: the trained model's), ordered by prompt id with the trained-first
    comparison first, and the stage's statistics, among them first_position_share: how often a verdict picked the
    answer shown first (NaN when none parsed)."""
    stats = StageStats("evaluator")
    keys, messages, seeds, ties = [], [], [], []
    selected = pairs.select("prompt_id", "prompt", "trained", "reference")
    for prompt_id, prompt, trained, reference in selected.iter_rows():
        for trained_first in (True, False):
            key = (prompt_id, trained_first, len(trained), len(reference))
            if trained == reference:
                ties.append(key)
                continue
            chat = render_evaluator_messages(prompt, *((trained, reference) if trained_first else (reference, trained)))
            keys.append(key)
            messages.append(chat)
            seeds.append(content_seed(seed, "evaluator", prompt_id, trained_first))
    if verdict_mode == "forced":
        requests = [ChoiceRequest(messages=m, assistant_prefix="", choices=EVALUATOR_IDENTIFIERS, temperature=0.0,
                                  seed=s) for m, s in zip(messages, seeds, strict=True)]
        with _model_calls(backend, requests, stats):
            shares = backend.choice_probabilities(requests)
        stats.completion_tokens += len(shares)
        verdicts = [None if share is None else EVALUATOR_IDENTIFIERS[int(np.argmax(share))] for share in shares]
        texts = [_probabilities_text(share) for share in shares]
    else:
        results = _generate(backend, [GenerationRequest(messages=m, n=1, temperature=0.0, top_p=1.0,
                                                        max_tokens=max_tokens, seed=s)
                                      for m, s in zip(messages, seeds, strict=True)], stats)
        texts = [result.completions[0].text if result.skipped is None else "" for result in results]
        verdicts = [parse_model_identifier(text) for text in texts]
        shares = [None if verdict is None else tuple(float(verdict == name) for name in EVALUATOR_IDENTIFIERS)
                  for verdict in verdicts]
    rows = [(prompt_id, trained_first, None, "", 0.5, trained_chars, reference_chars, True)
            for prompt_id, trained_first, trained_chars, reference_chars in ties]
    for key, verdict, text, share in zip(keys, verdicts, texts, shares, strict=True):
        prompt_id, trained_first, trained_chars, reference_chars = key
        stats.parse_failures += verdict is None
        preference = None if share is None else share[EVALUATOR_IDENTIFIERS.index("m" if trained_first else "M")]
        rows.append((prompt_id, trained_first, verdict, text, preference, trained_chars, reference_chars, False))
    table = pl.DataFrame(
        [(*row, evaluator_id, iteration, model_id) for row in rows], schema=EVAL_COMPARISONS, orient="row",
    ).sort("prompt_id", pl.col("trained_first"), descending=[False, True])
    stats.rows = table.height
    picked = table.filter(pl.col("verdict").is_not_null())["verdict"]
    # The evaluator's position bias: with no preference between the answers it would be ½.
    stats.counts.update(identical_answers=len(ties) // 2,
                        first_position_share=float((picked == "m").mean()) if picked.len() else float("nan"))
    return table, stats
