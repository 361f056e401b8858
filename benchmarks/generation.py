"""Benchmark: the inference choices of DESIGN.md, side by side on the same requests in one run.

  1. judging with n=N in one request vs N separate requests (vLLM shares the prompt's prefill);
  2. meta-judging grouped by response on a prefix-caching server vs shuffled on a server without it,
     with the prefix-cache hit rate vLLM reports on /metrics;
  3. our judge stage's tokens/s vs the raw engine (the same token-id prompts POSTed directly);
  4. the transformers backend on the same judge requests.

Run: python benchmarks/generation.py [--model smollm2|tiny|PATH] [--prompts 8] [--responses 2] [--judgments 4]
Needs vLLM's venv (bash infra/setup.sh --vllm). Targets (issue 3): stage >= 95% of raw engine; n=N >= 1.3x
separate requests; meta-judge prefix-cache hit rate >= 80% of prompt tokens.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import polars as pl

from metareward.artifacts.tables import content_seed
from metareward.config.campaign import SamplingConfig
from metareward.inference.base import GenerationRequest
from metareward.inference.roles import generate_responses, judge_responses
from metareward.inference.transformers_backend import TransformersBackend
from metareward.inference.vllm_backend import VLLMBackend
from metareward.paper.preferences import score_responses, select_judged_responses
from metareward.paper.prompts import render_judge_prompt, render_meta_judge_prompt
from metareward.pipeline.input_files import load_prompts
from metareward.training.models import build_tiny_model, smollm2_model

REPO = Path(__file__).resolve().parents[1]


def _model(name: str) -> Path:
    if name == "smollm2":
        return smollm2_model()
    if name == "tiny":
        corpus = load_prompts(REPO / "deployments/prompts/assistant-100.jsonl").table["prompt"].to_list()
        return build_tiny_model(Path(tempfile.mkdtemp()) / "tiny", corpus=corpus)
    return Path(name)


def _timed(function):
    started = time.perf_counter()
    result = function()
    return result, time.perf_counter() - started


def _tokens(results) -> int:
    return sum(c.n_tokens for result in results for c in result.completions)


def raw_engine(backend: VLLMBackend, requests: list[GenerationRequest]) -> tuple[int, float]:
    """The same token-id prompts POSTed straight to the server: (completion tokens, seconds)."""
    bodies = [
        {"model": backend.model, "prompt": backend.renderer.render(r.messages), "n": r.n, "temperature": r.temperature,
         "top_p": r.top_p, "max_tokens": r.max_tokens, "seed": r.seed}
        for r in requests
    ]
    client = httpx.Client(timeout=600)

    def post(body):
        return client.post(backend.base_urls[0] + "/v1/completions", json=body).json()["usage"]["completion_tokens"]

    started = time.perf_counter()
    with ThreadPoolExecutor(backend.max_concurrency) as pool:
        tokens = sum(pool.map(post, bodies))
    return tokens, time.perf_counter() - started


def main() -> None:
    """Run the four comparisons and print tokens/s and ratios."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--responses", type=int, default=2)
    parser.add_argument("--judgments", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--skip-transformers", action="store_true")
    arguments = parser.parse_args()

    model = _model(arguments.model)
    sampling = SamplingConfig(max_tokens=arguments.max_tokens)
    prompts = load_prompts(REPO / "deployments/prompts/assistant-100.jsonl").table.head(arguments.prompts)
    n = arguments.judgments
    common = {"dtype": "float32", "max_model_len": 4096, "seed": 0}
    cached = VLLMBackend(model, **common)
    uncached = VLLMBackend(model, extra_args=["--no-enable-prefix-caching"], **common)
    try:
        responses, _ = generate_responses(prompts, cached, arguments.responses, sampling, 0, 0, "bench")
        judge_requests = [
            GenerationRequest(({"role": "user", "content": render_judge_prompt(p, r)},), n=n,
                              temperature=sampling.temperature, top_p=sampling.top_p, max_tokens=sampling.max_tokens,
                              seed=content_seed(0, "judge", rid))
            for p, r, rid in responses.join(prompts, on="prompt_id").select("prompt", "text", "response_id").iter_rows()
        ]
        print(f"model {model.name}; {prompts.height} prompts, {responses.height} responses, N={n}, "
              f"max_tokens={arguments.max_tokens}, vLLM on {'GPU' if _gpu() else 'CPU'}")

        # 3. stage vs raw engine (raw first, so neither run profits from the other's cache more).
        raw_tokens, raw_seconds = raw_engine(uncached, judge_requests)
        (judgments, stats), _ = _timed(lambda: judge_responses(responses, prompts, uncached, n, sampling, 0, "free", 0,
                                                               "bench"))
        raw_rate, stage_rate = raw_tokens / raw_seconds, stats.completion_tokens / stats.seconds
        print(f"judge stage          {stage_rate:8.1f} tok/s   raw engine {raw_rate:8.1f} tok/s   "
              f"stage/raw {stage_rate / raw_rate:5.2f}  (target >= 0.95)")

        # 1. n=N in one request vs N separate requests.
        separate = [GenerationRequest(r.messages, n=1, temperature=r.temperature, top_p=r.top_p,
                                      max_tokens=r.max_tokens, seed=r.seed + k * 7919)
                    for r in judge_requests for k in range(n)]
        together_results, together_seconds = _timed(lambda: uncached.generate(judge_requests))
        separate_results, separate_seconds = _timed(lambda: uncached.generate(separate))
        together_rate = _tokens(together_results) / together_seconds
        separate_rate = _tokens(separate_results) / separate_seconds
        print(f"judging n={n:<2}         {together_rate:8.1f} tok/s   {n} separate {separate_rate:8.1f} tok/s   "
              f"ratio {together_rate / separate_rate:5.2f}  (target >= 1.3)")

        # 2. meta-judge: grouped by response with prefix caching vs shuffled without.
        judged = select_judged_responses(score_responses(judgments.with_columns(pl.lit(3.0).alias("score"))), 0)
        meta_requests = []
        texts = judgments.join(responses.select("response_id", response="text"), on="response_id").join(
            prompts.select("prompt_id", "prompt"), on="prompt_id")
        for response_id in judged["response_id"]:
            rows = texts.filter(pl.col("response_id") == response_id).sort("sample_idx")
            for a in rows.iter_rows(named=True):
                for b in rows.iter_rows(named=True):
                    if a["judgment_id"] != b["judgment_id"]:
                        content = render_meta_judge_prompt(a["prompt"], a["response"], a["text"], b["text"])
                        seed = content_seed(0, "meta", a["judgment_id"], b["judgment_id"])
                        meta_requests.append(GenerationRequest(({"role": "user", "content": content},), n=1,
                                                               temperature=0.8, top_p=0.95,
                                                               max_tokens=sampling.max_tokens, seed=seed))
        shuffled = meta_requests[:]
        random.Random(0).shuffle(shuffled)
        queried_before, hits_before = cached.prefix_cache_stats()
        grouped_results, grouped_seconds = _timed(lambda: cached.generate(meta_requests))
        queried, hits = cached.prefix_cache_stats()
        shuffled_results, shuffled_seconds = _timed(lambda: uncached.generate(shuffled))
        grouped_rate = _tokens(grouped_results) / grouped_seconds
        shuffled_rate = _tokens(shuffled_results) / shuffled_seconds
        hit_rate = (hits - hits_before) / max(1.0, queried - queried_before)
        print(f"meta-judge grouped+cache {grouped_rate:8.1f} tok/s   shuffled, no cache {shuffled_rate:8.1f} tok/s   "
              f"ratio {grouped_rate / shuffled_rate:5.2f}   prefix-cache hits {hit_rate:6.1%} of prompt tokens "
              f"(target >= 80%), {len(meta_requests)} requests")
    finally:
        cached.close()
        uncached.close()

    if not arguments.skip_transformers:
        # 4. The in-process transformers backend on the same judge requests.
        backend = TransformersBackend(model, dtype="float32", batch_size=16)
        try:
            results, seconds = _timed(lambda: backend.generate(judge_requests))
        finally:
            backend.close()
        print(f"transformers backend {_tokens(results) / seconds:8.1f} tok/s on the same judge requests "
              f"(vLLM stage above: {stage_rate:.1f} tok/s)")


def _gpu() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
