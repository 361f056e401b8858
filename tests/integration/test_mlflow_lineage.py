"""MLflow lineage against a real `mlflow server` on 127.0.0.1: runs, datasets, models, figures, resumed re-runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from metareward.pipeline import stage_manifests
from metareward.store import ArtifactStore
from tests.integration.campaigns import cli_environment, free_port, run_cli, wait_until_healthy, write_config


@pytest.fixture
def mlflow_server(tmp_path):
    """`mlflow server` with a sqlite store and proxied artifacts in tmp_path; yields its URL."""
    port = free_port()
    log = (tmp_path / "mlflow-server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
         "--artifacts-destination", str(tmp_path / "mlflow-artifacts")],
        stdout=log, stderr=subprocess.STDOUT, env={**cli_environment(tmp_path / "unused"), "MLFLOW_DISABLE_TELEMETRY": "true"},
    )
    url = f"http://127.0.0.1:{port}"
    wait_until_healthy(f"{url}/health", server, tmp_path / "mlflow-server.log", timeout=90)
    yield url
    server.terminate()
    server.wait(timeout=30)


def _campaign_state(client, experiment_id: str) -> dict:
    runs = client.search_runs([experiment_id], max_results=100)
    return {
        "campaign": [r for r in runs if r.data.tags.get("metareward.kind") == "campaign"],
        "iterations": sorted((r for r in runs if r.data.tags.get("metareward.kind") == "iteration"),
                             key=lambda r: int(r.data.tags["metareward.iteration"])),
        "models": client.search_logged_models([experiment_id]),
        "versions": sorted(client.search_model_versions("name = 'tiny'"), key=lambda v: int(v.version)),
    }


def test_campaign_lineage_in_mlflow_server_and_resumed_rerun_adds_no_runs(tmp_path, tiny_model, mlflow_server):
    from mlflow import MlflowClient

    root = tmp_path / "artifacts"
    config = write_config(tmp_path, tiny_model, str(root), iterations=2)
    env = cli_environment(tmp_path / "prefect", MLFLOW_TRACKING_URI=mlflow_server)
    first = run_cli(["run", str(config)], env)
    assert first.returncode == 0, first.stderr[-3000:]

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("tiny")
    state = _campaign_state(client, experiment.experiment_id)
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
        assert {f.path for f in client.list_artifacts(run.info.run_id, "figures")} == {"figures/score_distribution.png"}
        assert client.get_metric_history(run.info.run_id, "train/loss"), "TRL's curve is missing"
        assert 0 <= run.data.metrics["meta_judge/position_a_all"] <= 1

    # Models: M1 (seed) → M2 (iteration 1's output) → M3, each naming its parent and training datasets.
    models = {m.name: m for m in state["models"]}
    assert set(models) == {"tiny-M1", "tiny-M2", "tiny-M3"}
    assert models["tiny-M2"].source_run_id == state["iterations"][0].info.run_id
    assert models["tiny-M3"].tags["metareward.parent_model_id"] == models["tiny-M2"].model_id
    assert models["tiny-M2"].tags["metareward.parent_model_id"] == models["tiny-M1"].model_id
    assert "tiny/iter-2/dpo_dataset" in models["tiny-M3"].tags["metareward.training_datasets"]
    second = client.get_run(state["iterations"][1].info.run_id)
    assert [m.model_id for m in second.inputs.model_inputs] == [models["tiny-M2"].model_id]
    assert [m.model_id for m in second.outputs.model_outputs] == [models["tiny-M3"].model_id]
    assert [v.tags["metareward.parent_model_version"] for v in state["versions"]] == ["", "1"]
    assert [v.run_id for v in state["versions"]] == [r.info.run_id for r in state["iterations"]]
    assert state["versions"][1].tags["metareward.model_uri"] == manifests[2]["checkpoint"]["stats"]["model_uri"]

    # The campaign run compares iterations: metrics at step = iteration, and the Fig. 5-like overlay.
    assert [m.step for m in client.get_metric_history(campaign.info.run_id, "judge/score_mean")] == [1, 2]
    figure = client.download_artifacts(campaign.info.run_id, "figures/score_distribution_by_iteration.png",
                                       str(tmp_path))
    assert open(figure, "rb").read(8) == b"\x89PNG\r\n\x1a\n"

    again = run_cli(["run", str(config)], env)
    assert again.returncode == 0, again.stderr[-3000:]
    rerun = _campaign_state(client, experiment.experiment_id)
    assert [r.info.run_id for r in rerun["campaign"]] == [campaign.info.run_id]
    assert [r.info.run_id for r in rerun["iterations"]] == [r.info.run_id for r in state["iterations"]]
    assert len(rerun["models"]) == 3 and len(rerun["versions"]) == 2
    assert len(client.get_metric_history(campaign.info.run_id, "judge/score_mean")) == 2


def test_unreachable_tracking_server_fails_before_any_model_work(tmp_path, tiny_model):
    config = write_config(tmp_path, tiny_model, str(tmp_path / "artifacts"))
    env = cli_environment(tmp_path / "prefect", MLFLOW_TRACKING_URI=f"http://127.0.0.1:{free_port()}")
    result = run_cli(["run", str(config)], env, timeout=120)
    assert result.returncode == 2
    assert "does not answer /health" in result.stderr and "MLFLOW_TRACKING_URI" in result.stderr
    assert not (tmp_path / "artifacts" / "tiny").exists()
