"""In-process Hugging Face transformers backend: batched, left-padded generation on CPU or GPU."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from metareward.host.stopping import raise_if_stopped
from metareward.inference import progress
from metareward.inference.base import (
    ChoiceRequest,
    Completion,
    GenerationRequest,
    GenerationResult,
    InferenceError,
)
from metareward.inference.rendering import ChatRenderer


class TransformersBackend:
    """Generation with `model.generate` (each prompt repeated n times in the batch), for tests and small runs.

    Requests are rendered once to token ids, sorted by length, and run in batches of at most
    `batch_size` sequences (requests × n). Each batch is seeded from its requests' seeds, so the same
    requests give the same outputs. Prompts that leave no room in the context are skipped, not failed.
    """

    name = "transformers"
    engines = 1

    def __init__(
        self,
        model_path: str | Path,
        dtype: str = "auto",
        chat_template: str | None = None,
        batch_size: int = 16,
        max_model_len: int | None = None,
        torch_threads: int | None = None,
        device: str | None = None,
    ):
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        # torch's thread count is process-wide: set it while this model runs, give it back on close (training
        # after the engine closes would otherwise run on the engine's threads).
        self._threads_before = torch.get_num_threads()
        if torch_threads:
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
        # Requests keep their order: the stages issue them grouped by prompt/response, so a batch shares a
        # long prefix (see _generate_batch).
        progress.finished(len(requests) - len(runnable))
        for batch in self._batches(runnable, requests):
            raise_if_stopped("generation")
            batch_results = self._generate_batch([requests[i] for i in batch], [rendered[i] for i in batch])
            for index, result in zip(batch, batch_results, strict=True):
                results[index] = result
            progress.finished(len(batch), progress.generated_tokens(batch_results))
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
        from transformers import DynamicCache

        first = requests[0]
        longest = max(len(ids) for ids in rendered)
        max_new_tokens = min(first.max_tokens, self.max_model_len - longest)
        # Prefill without repetition: the batch's common prefix once, each request's own tail once, then
        # the cache is repeated for the n samples (what vLLM's prefix caching and n do). Long judge and
        # meta-judge prompts that share rubric, prompt and response dominate the cost on CPU otherwise.
        # Layout per row: shared prefix | pads | own tail | last token — pads sit in the middle, masked out,
        # and positions count real tokens only.
        common = _common_prefix_length(rendered)
        tails = [ids[common:-1] for ids in rendered]
        width = max(len(tail) for tail in tails)
        rows, masks = [], []
        for ids, tail in zip(rendered, tails, strict=True):
            padding = width - len(tail)
            rows.append(ids[:common] + [self.pad_token_id] * padding + tail + ids[-1:])
            masks.append([1] * common + [0] * padding + [1] * (len(tail) + 1))
        input_ids = torch.tensor(rows, dtype=torch.long, device=self.device)
        attention_mask = torch.tensor(masks, dtype=torch.long, device=self.device)
        torch.manual_seed(_batch_seed(requests))
        sampling = (
            {"do_sample": True, "temperature": first.temperature, "top_p": first.top_p}
            if first.temperature > 0
            else {"do_sample": False}
        )
        with torch.inference_mode():
            cache = DynamicCache(config=self.model.config)
            if common:
                self.model(input_ids=input_ids[:1, :common], cache=cache, use_cache=True)
                cache.batch_repeat_interleave(len(rows))
            if width:
                positions = (attention_mask[:, : common + width].cumsum(-1) - 1).clamp(min=0)[:, common:]
                self.model(input_ids=input_ids[:, common : common + width],
                           attention_mask=attention_mask[:, : common + width], position_ids=positions,
                           cache=cache, use_cache=True)
            if first.n > 1:
                cache.batch_repeat_interleave(first.n)
                input_ids = input_ids.repeat_interleave(first.n, dim=0)
                attention_mask = attention_mask.repeat_interleave(first.n, dim=0)
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                cache=cache,
                max_new_tokens=max_new_tokens,
                pad_token_id=self.pad_token_id,
                eos_token_id=self.eos_token_ids,
                stop_strings=list(first.stop) or None,
                tokenizer=self.renderer.tokenizer if first.stop else None,
                top_k=None,
                **sampling,
            )
        generated = output[:, input_ids.shape[1]:].tolist()
        results = []
        for position, (request, ids) in enumerate(zip(requests, rendered, strict=True)):
            completions = tuple(
                self._completion(generated[position * request.n + sample], request.stop, max_new_tokens)
                for sample in range(request.n)
            )
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
        """Sample each answer from the next-token distribution restricted to its choices (greedy at temperature
        0), seeded by the request."""
        answers = [0] * len(requests)
        for index, logits in self._choice_logits(requests):
            answers[index] = _sample_choice(logits, requests[index].temperature, requests[index].seed)
        return answers

    def choice_probabilities(self, requests: Sequence[ChoiceRequest]) -> list[tuple[float, ...] | None]:
        """softmax of each request's next-token logits over its choices (temperature 1)."""
        probabilities: list[tuple[float, ...] | None] = [None] * len(requests)
        for index, logits in self._choice_logits(requests):
            scaled = np.exp(logits - logits.max())
            probabilities[index] = tuple(float(p) for p in scaled / scaled.sum())
        return probabilities

    def _choice_logits(self, requests: Sequence[ChoiceRequest]):
        """(request index, next-token logits of its choices) for every request.

        Consecutive requests that share a long token prefix (the N judgments of one response share its
        judge prompt; a response's meta-judge prompts share rubric, prompt and response) are run as one
        group: the common prefix is prefilled once and only each request's own tail after it.
        """
        import torch

        prepared = [self.renderer.choice_tokens(r.messages, r.assistant_prefix, r.choices) for r in requests]
        for group in _prefix_groups([ids for ids, _ in prepared], self.batch_size):
            raise_if_stopped("forced verdicts")
            ids_group = [prepared[i][0] for i in group]
            common = _common_prefix_length(ids_group)
            with torch.inference_mode():
                prefix = torch.tensor([ids_group[0][:common]], device=self.device)
                cache = self.model(input_ids=prefix, use_cache=True).cache
                cache.batch_repeat_interleave(len(group))
                tails = [ids[common:] for ids in ids_group]
                longest = max(len(tail) for tail in tails)
                # Right padding after the shared prefix: causal attention keeps pads out of real positions.
                tail_ids = torch.full((len(group), longest), self.pad_token_id, dtype=torch.long)
                tail_mask = torch.zeros((len(group), common + longest), dtype=torch.long)
                tail_mask[:, :common] = 1
                for row, tail in enumerate(tails):
                    tail_ids[row, : len(tail)] = torch.tensor(tail, dtype=torch.long)
                    tail_mask[row, common : common + len(tail)] = 1
                logits = self.model(input_ids=tail_ids.to(self.device), attention_mask=tail_mask.to(self.device),
                                    cache=cache, use_cache=True).logits
            last = torch.tensor([len(tail) - 1 for tail in tails])
            final = logits[torch.arange(len(group)), last].float().cpu().numpy()
            for row, index in enumerate(group):
                yield index, final[row, prepared[index][1]]
            progress.finished(len(group))

    def alive(self) -> bool:
        """Whether the model is still loaded (an in-process engine dies only with its process, or by close())."""
        return self.model is not None

    def close(self) -> None:
        """Drop the model, give torch its thread count back and free accelerator memory."""
        import gc

        import torch

        self.model = None
        torch.set_num_threads(self._threads_before)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _common_prefix_length(sequences: list[list[int]]) -> int:
    """Length of the longest common prefix, leaving at least one token of every sequence outside it."""
    limit = min(len(sequence) for sequence in sequences) - 1
    length = 0
    while length < limit and all(sequence[length] == sequences[0][length] for sequence in sequences):
        length += 1
    return length


def _prefix_groups(sequences: list[list[int]], size: int) -> list[list[int]]:
    """Consecutive indices in groups of at most `size` that share their first half (a long common prefix)."""
    groups: list[list[int]] = []
    for index, sequence in enumerate(sequences):
        if groups and len(groups[-1]) < size:
            anchor = sequences[groups[-1][0]]
            shared = _common_prefix_length([anchor, sequence])
            if shared >= min(len(anchor), len(sequence)) // 2:
                groups[-1].append(index)
                continue
        groups.append([index])
    return groups


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
