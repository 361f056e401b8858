"""Helpers for campaign tests: a tiny campaign config, running `metareward run` as a user does, S3 on moto."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
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
    """The environment of a `metareward run`: Prefect's ephemeral API with its own home (own database), the
    default local MLflow store unless MLFLOW_TRACKING_URI is given in `extra`."""
    inherited = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    return {**inherited, "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_HOME": str(prefect_home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_LOGGING_LEVEL": "INFO", **extra}


def run_cli(args: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    """`metareward ARGS` in a subprocess; output captured as text."""
    return subprocess.run([sys.executable, "-m", "metareward.cli", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def start_cli(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """`metareward ARGS` started in its own process group (so a test can SIGKILL all of it)."""
    return subprocess.Popen([sys.executable, "-m", "metareward.cli", *args], env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_healthy(health_url: str, server: subprocess.Popen, log: Path, timeout: float) -> None:
    """Return once health_url answers 200; fail the test with the server's log if it exits or times out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(health_url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            pytest.fail(f"{health_url} never became healthy:\n{log.read_text()[-3000:]}")
        time.sleep(0.5)
