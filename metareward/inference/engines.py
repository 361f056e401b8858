"""Engines by configuration: the backend a config asks for, and one shared engine per model and process."""

from __future__ import annotations

import os
from pathlib import Path

from metareward.config.campaign import InferenceConfig, ModelConfig
from metareward.host.stopping import raise_if_stopped
from metareward.inference.base import Backend


def create_backend(model: ModelConfig, inference: InferenceConfig, model_path: str | None = None,
                   seed: int = 0, log_dir: str | Path | None = None) -> Backend:
    """The backend the config asks for, serving model_path (default model.path; a checkpoint of a later
    iteration otherwise). Engines start here: the transformers backend loads the model, the vllm backend
    starts its servers and returns once they are ready."""
    path = model_path or model.path
    if inference.backend == "transformers":
        from metareward.inference.transformers_backend import TransformersBackend

        return TransformersBackend(
            path, dtype=model.dtype, chat_template=model.chat_template, batch_size=inference.batch_size,
            max_model_len=inference.max_model_len, torch_threads=inference.torch_threads,
        )
    if inference.backend == "vllm":
        from metareward.inference.vllm_backend import VLLMBackend

        return VLLMBackend(
            path, python=inference.vllm_python, base_url=inference.base_url, dtype=model.dtype,
            chat_template=model.chat_template, max_model_len=inference.max_model_len, seed=seed,
            replicas=inference.replicas, tensor_parallel_size=inference.tensor_parallel_size,
            extra_args=inference.vllm_args, max_concurrency=inference.max_concurrency,
            max_retries=inference.max_retries, timeout_s=inference.request_timeout_s,
            startup_timeout_s=inference.startup_timeout_s, log_dir=log_dir,
        )
    from metareward.inference.openai_backend import OpenAIBackend

    tokenizer = inference.tokenizer or (path if Path(path).is_dir() else None)
    return OpenAIBackend(
        [inference.base_url], inference.api_model or path, tokenizer_path=tokenizer,
        chat_template=model.chat_template, api_key=os.environ.get(inference.api_key_env),
        max_concurrency=inference.max_concurrency, max_retries=inference.max_retries,
        timeout_s=inference.request_timeout_s, max_model_len=inference.max_model_len,
    )


_SHARED: dict[tuple[str, str], Backend] = {}


def shared_backend(model: ModelConfig, inference: InferenceConfig, model_path: str, seed: int = 0,
                   log_dir: str | Path | None = None) -> Backend:
    """The process's engine for (model_path, inference settings), created on first use and kept for every
    later shard and role of the same model (a vLLM server starts once per worker, not per shard). An engine that
    died since (its server killed, out of memory) is closed and replaced, never reused. Once the run was asked to
    stop (metareward.host.stopping), no engine is started: RunStopped is raised."""
    raise_if_stopped(f"starting an engine for {model_path}")
    key = (model_path, inference.model_dump_json() + model.model_dump_json())
    if key in _SHARED and not _SHARED[key].alive():
        _SHARED.pop(key).close()
    if key not in _SHARED:
        close_shared_backends()
        _SHARED[key] = create_backend(model, inference, model_path, seed, log_dir)
    return _SHARED[key]


def close_shared_backends() -> None:
    """Close every shared engine (stop vLLM servers, free GPU memory): called before training."""
    while _SHARED:
        _, backend = _SHARED.popitem()
        backend.close()
