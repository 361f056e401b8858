"""Helpers for campaign tests: a tiny campaign config, running `metareward run` as a user does, S3 on moto."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import PROMPT_FILE

TINY_ITERATION = {
    "num_prompts": 6,
    "num_responses": 3,
    "num_judgments": 3,
    "actor_sampling": {"max_tokens": 16},
    "judge_sampling": {"max_tokens": 12},
    "meta_judge_sampling": {"max_tokens": 8},
    "dpo": {"num_epochs": 1, "global_batch_size": 4, "per_device_batch_size": 2, "max_length": 2048,
            "learning_rate": 1e-4},
}


def write_config(folder: Path, model: Path, root: str, iterations: int = 1, name: str = "tiny",
                 iteration_overrides: dict | None = None, **overrides) -> Path:
    """A tiny campaign (6 prompts an iteration in shards of 2, K=3, N=3, forced verdicts) as a YAML file;
    overrides replace top-level settings, iteration_overrides those of every iteration."""
    prompts = folder / "prompts.jsonl"
    if not prompts.exists():
        prompts.write_text("".join(PROMPT_FILE.read_text().splitlines(keepends=True)[:12]))
    config = {
        "name": name,
        "model": {"path": str(model), "dtype": "float32"},
        "prompts": {"path": str(prompts)},
        "inference": {"backend": "transformers", "verdict_mode": "forced", "max_model_len": 2048, "batch_size": 8},
        "artifact_root": root,
        "seed": 5,
        "shard_size": 2,
        "iterations": [{**TINY_ITERATION, **(iteration_overrides or {})}] * iterations,
        **overrides,
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def cli_environment(prefect_home: Path, **extra: str) -> dict[str, str]:
    """The environment of a `metareward run`: Prefect's ephemeral API with its own home (own database)."""
    return {**os.environ, "PREFECT_HOME": str(prefect_home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOGGING_LEVEL": "INFO", **extra}


def run_cli(args: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    """`metareward ARGS` in a subprocess; output captured as text."""
    return subprocess.run([sys.executable, "-m", "metareward.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def start_cli(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """`metareward ARGS` started in its own process group (so a test can SIGKILL all of it)."""
    return subprocess.Popen([sys.executable, "-m", "metareward.cli", *args], env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)
