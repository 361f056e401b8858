"""Everything that can fail before any model work, checked in seconds: prompt file, artifact root, MLflow, model, vLLM."""

from __future__ import annotations

import os
from pathlib import Path

from metareward.config import CampaignConfig, ConfigError
from metareward.models import BUILTIN_DEMO_MODEL, smollm2_gguf_path
from metareward.store import open_store
from metareward.tables import load_prompts
from metareward.tracking import check_tracking


def preflight(config: CampaignConfig) -> None:
    """Check the prompt file, the artifact root (bucket exists, endpoint reachable, writable), MLflow when
    tracking is on, the seed model (a local folder, the builtin demo model, or a hub id), and vLLM's
    interpreter when the vllm backend starts servers. Raises PromptFileError, StoreError, TrackingError or
    ConfigError naming what to fix."""
    load_prompts(config.prompts.path, config.prompts.column)
    open_store(config.artifact_root).check()
    check_tracking(config)
    model = config.model.path
    if model == BUILTIN_DEMO_MODEL:
        smollm2_gguf_path()
    elif (model.startswith((".", "/", "~")) or Path(model).exists()) and not (Path(model).expanduser() / "config.json").is_file():
        raise ConfigError(f"model.path {model}: no Hugging Face model folder there (config.json missing)")
    inference = config.inference
    if inference.backend == "vllm" and inference.base_url is None:
        from metareward.inference.vllm_backend import DEFAULT_VLLM_PYTHON

        python = Path(inference.vllm_python or os.environ.get("METAREWARD_VLLM_PYTHON", DEFAULT_VLLM_PYTHON))
        if not python.exists():
            raise ConfigError(f"inference.backend vllm: vLLM's Python {python} does not exist "
                              "(bash infra/setup.sh --vllm, or set inference.vllm_python)")
