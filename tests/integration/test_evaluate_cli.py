"""`metareward evaluate`: judge agreement and the AlpacaEval export with the tiny model, logged to MLflow."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from metareward.artifacts.tables import file_digest
from tests.integration.campaigns import cli_environment, run_cli, write_config

pytestmark = pytest.mark.slow  # each test runs the CLI on a model

RANKINGS = Path(__file__).parents[2] / "deployments" / "evaluation" / "rankings-example.jsonl"


def test_judge_agreement_and_alpaca_eval_export_are_logged_as_evaluation_runs(tmp_path, tiny_model):
    from mlflow import MlflowClient

    root = tmp_path / "artifacts"
    config = write_config(tmp_path, tiny_model, str(root), tracking={})
    env = cli_environment(tmp_path / "prefect")
    agreement = run_cli(["evaluate", "agreement", str(config), "--rankings", str(RANKINGS), "--num-judgments", "2",
                         "--bootstrap", "50", "--output", str(tmp_path / "agreement.json")], env)
    assert agreement.returncode == 0, agreement.stderr[-3000:]
    estimates = json.loads((tmp_path / "agreement.json").read_text())
    assert set(estimates) == {"agreement", "agreement_without_ties", "spearman"}
    assert 0 <= estimates["agreement"]["value"] <= 1
    assert estimates["agreement"]["ci_low"] <= estimates["agreement"]["value"] <= estimates["agreement"]["ci_high"]

    prompts = tmp_path / "prompts.jsonl"  # written by write_config
    export = run_cli(["evaluate", "alpaca-eval", str(config), "--prompts", str(prompts), "--output",
                      str(tmp_path / "outputs.json"), "--generator", "tiny-seed"], env)
    assert export.returncode == 0, export.stderr[-3000:]
    outputs = json.loads((tmp_path / "outputs.json").read_text())
    assert [row["instruction"] for row in outputs] == [json.loads(line)["prompt"]
                                                        for line in prompts.read_text().splitlines()]
    assert {row["generator"] for row in outputs} == {"tiny-seed"} and all(isinstance(r["output"], str) for r in outputs)

    client = MlflowClient(f"sqlite:///{root / '_mlflow' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id],
                              filter_string="tags.`metareward.kind` = 'evaluation'", order_by=["attributes.start_time"])
    assert [r.data.tags["metareward.evaluation"] for r in runs] == ["judge-agreement", "alpaca-eval-export"]
    assert runs[0].data.metrics["agreement/agreement"] == estimates["agreement"]["value"]
    [dataset] = client.get_run(runs[0].info.run_id).inputs.dataset_inputs
    assert dataset.dataset.digest == file_digest(RANKINGS) and dataset.tags[0].value == "evaluation"
    assert runs[1].data.metrics["export/answers"] == len(outputs)


def test_bad_rankings_file_names_the_row(tmp_path, tiny_model):
    config = write_config(tmp_path, tiny_model, str(tmp_path / "artifacts"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "response": "r", "rank": 1}\n{"prompt": "p", "response": "s", "rank": "best"}\n')
    result = run_cli(["evaluate", "agreement", str(config), "--rankings", str(bad)], cli_environment(tmp_path / "p"))
    assert result.returncode == 2 and "bad.jsonl: row 2: 'rank' must be a number, got 'best'" in result.stderr
