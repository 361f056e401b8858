"""Helpers for campaign tests: a tiny campaign config, running `metareward run` as a user does, S3 on moto."""

from __future__ import annotations

import json
import os
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
    overrides replace top-level settings, iteration_overrides those of every iteration. MLflow tracking is
    off unless `tracking` is given (tracking={} for the defaults): it costs seconds a run, and the tests
    that check it ask for it."""
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
        "tracking": {"enabled": False},
        **overrides,
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def cli_environment(prefect_home: Path, **extra: str) -> dict[str, str]:
    """The environment of a `metareward run`: Prefect's ephemeral API with its own home (own database), the
    default local MLflow store unless MLFLOW_TRACKING_URI is given in `extra`."""
    inherited = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    return {**inherited, "MLFLOW_DISABLE_TELEMETRY": "true", "PREFECT_HOME": str(prefect_home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_LOGGING_LEVEL": "INFO", **extra}


def run_cli(args: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
    """`metareward ARGS` in a subprocess, as a script runs it (no terminal); output captured as text."""
    return subprocess.run([sys.executable, "-m", "cli", *args], env=env, capture_output=True, stdin=subprocess.DEVNULL,
                          text=True, timeout=timeout)


def start_cli(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """`metareward ARGS` started in its own process group (so a test can SIGKILL all of it)."""
    return subprocess.Popen([sys.executable, "-m", "cli", *args], env=env, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


def wait_for(condition, process, log, what: str, timeout_s: float = 300) -> None:
    """Return once condition() holds; fail with the run's log if the run ends or timeout_s passes first."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert process.poll() is None, f"the run ended before {what}: " + log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no {what} within {timeout_s:g} s: " + log.read_text()[-3000:]
        time.sleep(0.1)


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


def mlflow_state(client, experiment_id: str) -> dict:
    """The tiny campaign's runs (campaign, iterations in order), logged models and registered versions."""
    runs = client.search_runs([experiment_id], max_results=100)
    return {
        "campaign": [r for r in runs if r.data.tags.get("metareward.kind") == "campaign"],
        "iterations": sorted((r for r in runs if r.data.tags.get("metareward.kind") == "iteration"),
                             key=lambda r: int(r.data.tags["metareward.iteration"])),
        "models": client.search_logged_models([experiment_id]),
        "versions": sorted(client.search_model_versions("name = 'tiny'"), key=lambda v: int(v.version)),
    }


def assert_mlflow_lineage(client, root: Path, download_to: Path) -> dict:
    """Assert what a finished two-iteration `tiny` campaign logged to MLflow; return mlflow_state."""
    from metareward.artifacts.store import ArtifactStore
    from metareward.pipeline.manifests import stage_manifests

    experiment = client.get_experiment_by_name("tiny")
    state = mlflow_state(client, experiment.experiment_id)
    [campaign] = state["campaign"]
    assert campaign.info.status == "FINISHED"
    assert campaign.data.params["iterations.0.num_judgments"] == "3"
    assert [r.data.tags["mlflow.parentRunId"] for r in state["iterations"]] == [campaign.info.run_id] * 2
    assert [r.info.status for r in state["iterations"]] == ["FINISHED", "FINISHED"]

    # Every stage table is a dataset input with its artifact URI as source and its Parquet digest.
    manifests = stage_manifests(ArtifactStore(str(root)), "tiny")
    for iteration, run in enumerate(state["iterations"], start=1):
        inputs = client.get_run(run.info.run_id).inputs
        logged = {d.dataset.name: d for d in inputs.dataset_inputs}
        prompts = manifests[iteration]["prompts"]["shards"]["all"]
        assert json.loads(logged[f"tiny/iter-{iteration}/prompts"].dataset.source)["uri"] == prompts["uri"]
        assert logged[f"tiny/iter-{iteration}/prompts"].dataset.digest == prompts["digest"]
        dataset = manifests[iteration]["dpo_dataset"]["shards"]["all"]
        assert logged[f"tiny/iter-{iteration}/dpo_dataset"].dataset.digest == dataset["digest"]
        assert logged[f"tiny/iter-{iteration}/dpo_dataset"].tags[0].value == "training"
        assert logged[f"tiny/iter-{iteration}/judgments"].tags[0].value == "evaluation"
        assert json.loads(logged[f"tiny/iter-{iteration}/judgments"].dataset.source)["uri"] == str(
            root / "tiny" / f"iter-{iteration}" / "judgments" / "manifest.json")
        # Figures at the run's root, where MLflow's compare view finds them side by side; the judge audit beside.
        assert {f.path for f in client.list_artifacts(run.info.run_id)} == {"score_shares.png", "stages.json", "audit"}
        assert [point.step for point in client.get_metric_history(run.info.run_id, "train/loss")][0] >= 1
        metrics = run.data.metrics
        assert 0 <= metrics["meta_judge/position_a_all"] <= 1
        assert [point.step for point in client.get_metric_history(run.info.run_id, "judge/score_mean")] == [0]
        # One name per quantity, grouped by meaning; the stages' bookkeeping out of the charts, in stages.json
        # (model calls only where made).
        assert {name.split("/")[0] for name in metrics} <= {"actor", "judge", "meta_judge", "pairs", "train"}
        bookkeeping = json.loads(open(client.download_artifacts(run.info.run_id, "stages.json", str(download_to)))
                                 .read())
        assert bookkeeping["judgments"]["tokens_per_second"] > 0 and "requests" not in bookkeeping["checkpoint"]
        assert bookkeeping["checkpoint"]["seconds"] == manifests[iteration]["checkpoint"]["stats"]["compute_seconds"]
        assert "judgments/mean_score" not in metrics and not any(name.startswith("final/") for name in metrics)

    # Models: M1 (seed) → M2 (iteration 1's output) → M3; registered as versions 1, 2, 3 (aliases m1…m3), each
    # version and logged model pointing at the other as mlflow.register_model links them, each model describing
    # its parent (a link) and training tables, its pair counts and curves linked to them.
    models = {m.name: m for m in state["models"]}
    assert set(models) == {"tiny-M1", "tiny-M2", "tiny-M3"}
    assert models["tiny-M2"].source_run_id == state["iterations"][0].info.run_id
    assert models["tiny-M3"].tags["metareward.parent_model_id"] == models["tiny-M2"].model_id
    assert models["tiny-M2"].tags["metareward.parent_model_id"] == models["tiny-M1"].model_id
    assert "tiny/iter-2/dpo_dataset" in models["tiny-M3"].tags["metareward.training_datasets"]
    second = client.get_run(state["iterations"][1].info.run_id)
    assert [m.model_id for m in second.inputs.model_inputs] == [models["tiny-M2"].model_id]
    assert [m.model_id for m in second.outputs.model_outputs] == [models["tiny-M3"].model_id]
    versions = state["versions"]
    assert [v.source for v in versions] == [f"models:/{models[f'tiny-M{index}'].model_id}" for index in (1, 2, 3)]
    assert [v.tags["metareward.parent_model_version"] for v in versions] == ["", "1", "2"]
    assert [v.run_id for v in versions[1:]] == [r.info.run_id for r in state["iterations"]]
    assert versions[2].tags["metareward.model_uri"] == manifests[2]["checkpoint"]["stats"]["model_uri"]
    for index in (1, 2, 3):
        model = client.get_logged_model(models[f"tiny-M{index}"].model_id)
        assert json.loads(model.tags["mlflow.modelVersions"]) == [{"name": "tiny", "version": str(index)}]
        assert client.get_model_version_by_alias("tiny", f"m{index}").version == str(index)
    description = client.get_logged_model(models["tiny-M2"].model_id).tags["mlflow.note.content"]
    assert f"[tiny-M1](#/experiments/{experiment.experiment_id}/models/{models['tiny-M1'].model_id})" in description
    assert "tiny/iter-1/actor_pairs" in description and "tiny/iter-1/judge_pairs" in description
    linked = {metric.key: metric.dataset_name for metric in client.get_logged_model(models["tiny-M2"].model_id).metrics}
    assert linked["pairs/actor"] == "tiny/iter-1/actor_pairs" and linked["pairs/judge"] == "tiny/iter-1/judge_pairs"
    assert linked["train/loss"] == "tiny/iter-1/dpo_dataset"
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"

    # The campaign run's lineage: its prompt file in, the latest model out.
    campaign_run = client.get_run(campaign.info.run_id)
    assert [d.dataset.name for d in campaign_run.inputs.dataset_inputs] == ["tiny/prompt-file"]
    outputs = sorted(campaign_run.outputs.model_outputs, key=lambda output: output.step)
    assert [(m.step, m.model_id) for m in outputs] == [(index - 1, models[f"tiny-M{index}"].model_id)
                                                       for index in (2, 3)]
    assert campaign_run.data.tags["metareward.latest_model"] == "tiny-M3 (registered model tiny, version 3)"

    # The campaign run compares iterations: the paper's metrics at step = iteration, and its figures.
    assert [m.step for m in client.get_metric_history(campaign.info.run_id, "judge/score_mean")] == [1, 2]
    assert not any(name.startswith("stage/") for name in client.get_run(campaign.info.run_id).data.metrics)
    for name in ("score_shares.png", "meta_judge_bias.png"):
        figure = client.download_artifacts(campaign.info.run_id, name, str(download_to))
        assert open(figure, "rb").read(8) == b"\x89PNG\r\n\x1a\n"

    return state
