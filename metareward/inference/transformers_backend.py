"""In-process Hugging Face transformers backend: batched, left-padded generation on CPU or GPU."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from metareward.inference.base import (
    ChoiceRequest,
    Completion,
    GenerationRequest,
    GenerationResult,
    InferenceError,
    Usage,
)
from metareward.inference.rendering import ChatRenderer


class TransformersBackend:
    """Generation with `model.generate` (each prompt repeated n times in the batch), for tests and small runs.

    Requests are rendered once to token ids, sorted by length, and run in batches of at most
    `batch_size` sequences (requests × n). Each batch is seeded from its requests' seeds, so the same
    requests give the same outputs. Prompts that leave no room in the context are skipped, not failed.
    """

    name = "transformers"

    def __init__(
        self,
        model_path: str | Path,
        dtype: str = "auto",
        chat_template: str | None = None,
        batch_size: int = 16,
        max_model_len: int | None = None,
        torch_threads: int | None = 1,
        device: str | None = None,
    ):
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        if torch_threads:
            # One thread was 5-10x faster than two on the shared 2-core machines (PLATFORM.md).
            torch.set_num_threads(torch_threads)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
        try:
            self.model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch_dtype).to(self.device)
        except OSError as error:
            raise InferenceError(f"cannot load model {model_path}: {error}") from None
        self.model.eval()
        self.renderer = ChatRenderer.from_pretrained(model_path, chat_template)
        tokenizer = self.renderer.tokenizer
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_token_ids = _eos_ids(self.model.generation_config, tokenizer)
        self.max_model_len = max_model_len or int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.batch_size = batch_size
        self.usage = Usage()

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """One result per request, in order (see class docstring for batching and skipping)."""
        rendered = [self.renderer.render(request.messages) for request in requests]
        results: list[GenerationResult | None] = [None] * len(requests)
        runnable = []
        for index, ids in enumerate(rendered):
            if len(ids) >= self.max_model_len:
                results[index] = GenerationResult((), len(ids), skipped="prompt_too_long")
            else:
                runnable.append(index)
        runnable.sort(key=lambda index: len(rendered[index]))
        for batch in self._batches(runnable, requests):
            for index, result in zip(batch, self._generate_batch([requests[i] for i in batch], [rendered[i] for i in batch])):
                results[index] = result
        return results  # type: ignore[return-value]

    def _batches(self, indices: list[int], requests: Sequence[GenerationRequest]):
        # Requests in one batch must share sampling settings (one generate call).
        batch: list[int] = []
        for index in indices:
            request = requests[index]
            same = batch and _settings(requests[batch[0]]) == _settings(request)
            if batch and (not same or (len(batch) + 1) * request.n > max(self.batch_size, request.n)):
                yield batch
                batch = []
            batch.append(index)
        if batch:
            yield batch

    def _generate_batch(self, requests: list[GenerationRequest], rendered: list[list[int]]) -> list[GenerationResult]:
        import torch

        first = requests[0]
        longest = max(len(ids) for ids in rendered)
        max_new_tokens = min(first.max_tokens, self.max_model_len - longest)
        # Each prompt repeated n times (what num_return_sequences does, but greedy decoding allows it too).
        input_ids, attention_mask = self._left_pad([ids for ids in rendered for _ in range(first.n)])
        torch.manual_seed(_batch_seed(requests))
        sampling = (
            {"do_sample": True, "temperature": first.temperature, "top_p": first.top_p}
            if first.temperature > 0
            else {"do_sample": False}
        )
        started = time.perf_counter()
        with torch.inference_mode():
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                pad_token_id=self.pad_token_id,
                eos_token_id=self.eos_token_ids,
                stop_strings=list(first.stop) or None,
                tokenizer=self.renderer.tokenizer if first.stop else None,
                top_k=None,
                **sampling,
            )
        self.usage.seconds += time.perf_counter() - started
        generated = output[:, input_ids.shape[1]:].tolist()
        results = []
        for position, (request, ids) in enumerate(zip(requests, rendered)):
            completions = tuple(
                self._completion(generated[position * request.n + sample], request.stop, max_new_tokens)
                for sample in range(request.n)
            )
            self.usage.prompt_tokens += len(ids)
            self.usage.completion_tokens += sum(c.n_tokens for c in completions)
            results.append(GenerationResult(completions, len(ids)))
        return results

    def _completion(self, token_ids: list[int], stop: tuple[str, ...], max_new_tokens: int) -> Completion:
        kept = []
        finish_reason = "length"
        for token in token_ids:
            if token in self.eos_token_ids:
                finish_reason = "stop"
                break
            if token == self.pad_token_id and self.pad_token_id not in self.eos_token_ids:
                break
            kept.append(token)
        text = self.renderer.decode(kept)
        for marker in stop:
            cut = text.find(marker)
            if cut >= 0:
                text, finish_reason = text[:cut], "stop"
        return Completion(text=text, n_tokens=len(kept), finish_reason=finish_reason)

    def choose(self, requests: Sequence[ChoiceRequest]) -> list[int]:
        """Sample each answer from the next-token distribution restricted to its choices."""
        import torch

        prepared = [self.renderer.choice_tokens(r.messages, r.assistant_prefix, r.choices) for r in requests]
        answers = []
        started = time.perf_counter()
        for start in range(0, len(requests), self.batch_size):
            chunk = prepared[start : start + self.batch_size]
            input_ids, attention_mask = self._left_pad([ids for ids, _ in chunk])
            with torch.inference_mode():
                logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, -1, :]
            logits = logits.float().cpu().numpy()
            for row, (request, (ids, choice_ids)) in enumerate(zip(requests[start:], chunk)):
                answers.append(_sample_choice(logits[row, choice_ids], request.temperature, request.seed))
                self.usage.prompt_tokens += len(ids)
                self.usage.completion_tokens += 1
        self.usage.seconds += time.perf_counter() - started
        return answers

    def _left_pad(self, rendered: list[list[int]]):
        import torch

        longest = max(len(ids) for ids in rendered)
        input_ids = torch.full((len(rendered), longest), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rendered), longest), dtype=torch.long)
        for row, ids in enumerate(rendered):
            input_ids[row, longest - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, longest - len(ids):] = 1
        return input_ids.to(self.device), attention_mask.to(self.device)

    def close(self) -> None:
        """Drop the model and free accelerator memory."""
        import gc

        import torch

        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _settings(request: GenerationRequest) -> tuple:
    return (request.n, request.temperature, request.top_p, request.max_tokens, request.stop)


def _batch_seed(requests: Sequence[GenerationRequest]) -> int:
    seed = 0
    for request in requests:
        seed = (seed * 1_000_003 + request.seed) % (2**63 - 1)
    return seed


def _eos_ids(generation_config, tokenizer) -> list[int]:
    eos = generation_config.eos_token_id if generation_config.eos_token_id is not None else tokenizer.eos_token_id
    return list(eos) if isinstance(eos, (list, tuple)) else [eos]


def _sample_choice(logits: np.ndarray, temperature: float, seed: int) -> int:
    """Index of the sampled choice: softmax(logits / T) with a seeded generator; argmax when T = 0."""
    if temperature <= 0:
        return int(np.argmax(logits))
    scaled = (logits - logits.max()) / temperature
    probabilities = np.exp(scaled)
    probabilities /= probabilities.sum()
    return int(np.random.default_rng(seed).choice(len(logits), p=probabilities))
