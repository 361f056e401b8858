"""The health gate of `metareward run` (Prefect's ephemeral API, no terminal: nobody can be asked, so
health.on_timeout applies at once): each decision's effect on the DPO set and the model, the decision kept in the
store and on MLflow, a re-run that does not ask again, and the judge audit of every iteration."""

from __future__ import annotations

import json

import polars as pl
import pytest

from metareward.artifacts.store import ArtifactStore
from metareward.config.campaign import CampaignConfig
from metareward.pipeline.manifests import stage_manifests
from metareward.pipeline.model_roles import starting_model
from tests.integration.campaigns import cli_environment, run_cli, write_config

pytestmark = pytest.mark.slow

TRIPPED = {"max_top_score_share": 0.0}
"""A judge-score threshold every iteration fails (a share of 5s is always >= 0)."""


def _run(tmp_path, tiny_model, name: str, on_timeout: str, **overrides):
    root = tmp_path / "artifacts"
    config = write_config(tmp_path, tiny_model, str(root), name=name,
                          health={**TRIPPED, "action": "ask", "on_timeout": on_timeout, "audit_samples": 3},
                          **overrides)
    env = cli_environment(tmp_path / "prefect")
    return config, root, env, run_cli(["run", str(config)], env)


def _decision(root, name: str) -> dict:
    return json.loads((root / name / "iter-1/health/decision.json").read_text())


def test_drop_judge_pairs_trains_on_actor_pairs_only_is_kept_logged_and_not_asked_again(tmp_path, tiny_model):
    config, root, env, first = _run(tmp_path, tiny_model, "dropped", "drop_judge_pairs", tracking={})
    assert first.returncode == 0, first.stderr[-3000:]
    output = first.stdout + first.stderr
    assert "nobody can be asked (no Prefect server, no terminal): health.on_timeout drop_judge_pairs" in output
    decision = _decision(root, "dropped")
    assert decision["choice"] == "drop_judge_pairs" and decision["checks"][0]["setting"] == "max_top_score_share"
    manifests = stage_manifests(ArtifactStore(str(root)), "dropped")[1]
    assert manifests["judge_pairs"]["stats"]["rows"] > 0  # there were judge pairs to drop
    assert manifests["dpo_dataset"]["stats"]["judge_pairs"] == 0
    dpo_set = pl.read_parquet(next(iter(manifests["dpo_dataset"]["shards"].values()))["uri"])
    assert set(dpo_set["kind"]) == {"actor"} and dpo_set.height == manifests["actor_pairs"]["stats"]["rows"]
    assert "checkpoint" in manifests

    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{root}/_mlflow/mlflow.db")
    [experiment] = [e for e in client.search_experiments() if e.name == "dropped"]
    [run] = client.search_runs([experiment.experiment_id], "tags.`metareward.iteration` = '1'")
    assert run.data.tags["metareward.health.decision"] == "drop_judge_pairs"
    assert run.data.tags["metareward.health.decided_by"].startswith("health.on_timeout")
    artifacts = {item.path for item in client.list_artifacts(run.info.run_id)} | {
        item.path for item in client.list_artifacts(run.info.run_id, "audit")}
    assert {"health_decision.json", "audit/audit.html", "audit/audit.md", "audit/labels-template.csv"} <= artifacts

    # The audit: three sampled prompts, every judgment of theirs in the template, the meta-judged response's verdicts.
    audit = (root / "dropped/iter-1/audit/audit.md").read_text()
    assert audit.count("## Prompt ") == 3 and "meta-judged" in audit and "Verdicts" in audit
    template = pl.read_csv(root / "dropped/iter-1/audit/labels-template.csv")
    assert template.height == 3 * 3 * 3  # 3 prompts x K=3 responses x N=3 judgments
    assert "Response" in (root / "dropped/iter-1/audit/audit.html").read_text()

    # A person marks the audited judgments: the first right, the second with the judge's own score, the third wrong.
    marked = template.with_columns(pl.Series("label", ["right", None, "wrong", *[""] * (template.height - 3)]))
    marked = marked.with_columns(pl.when(pl.int_range(pl.len()) == 1).then(pl.col("judge_score").cast(pl.String))
                                 .otherwise(pl.col("label")).alias("label"))
    marked.write_csv(tmp_path / "labels.csv")
    labelled = run_cli(["audit", "label", str(config), str(tmp_path / "labels.csv"), "--iteration", "1",
                        "--bootstrap", "100"], env)
    assert labelled.returncode == 0, labelled.stderr[-3000:]
    assert "3 of the 27 audited judgments labelled" in labelled.stdout and "MLflow: logged to" in labelled.stdout
    for run_id in (run.info.run_id, run.data.tags["mlflow.parentRunId"]):
        history = client.get_metric_history(run_id, "audit/agreement")
        assert [(point.step, point.value) for point in history] == [(1, pytest.approx(2 / 3))]
    assert client.get_run(run.info.run_id).data.metrics["audit/labels"] == 3
    assert json.loads((root / "dropped/iter-1/audit/agreement.json").read_text())["right_share"]["value"] == 0.5

    again = run_cli(["run", str(config)], env)
    assert again.returncode == 0, again.stderr[-3000:]
    output = again.stdout + again.stderr
    assert "health decision taken earlier on these tables: drop_judge_pairs" in output
    assert "nobody can be asked" not in output
    assert _decision(root, "dropped") == decision


def test_keep_model_skips_training_and_the_next_iteration_starts_from_m_t(tmp_path, tiny_model):
    config, root, _, result = _run(tmp_path, tiny_model, "kept", "keep_model")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "checkpoint not run: the health decision is keep_model" in result.stdout + result.stderr
    manifests = stage_manifests(ArtifactStore(str(root)), "kept")[1]
    assert "checkpoint" not in manifests and "dpo_dataset" in manifests
    assert starting_model(CampaignConfig.from_yaml(config), 2) == str(tiny_model)  # M_2 = M_1


def test_stop_ends_before_training_and_a_rerun_stops_again_without_asking(tmp_path, tiny_model):
    config, root, env, result = _run(tmp_path, tiny_model, "stopped", "stop")
    assert result.returncode != 0
    assert "the decision is stop" in result.stderr and "to be asked again" in result.stderr
    assert "checkpoint" not in stage_manifests(ArtifactStore(str(root)), "stopped")[1]
    again = run_cli(["run", str(config)], env)
    assert again.returncode != 0
    assert "health decision taken earlier on these tables: stop" in again.stdout + again.stderr


def test_a_run_attached_to_a_terminal_is_answered_there(tmp_path, tiny_model):
    # `metareward run` on a terminal (a pseudo-terminal here): the failed checks and the choices are shown on it, and
    # what is typed there decides, with its note.
    import os
    import pty
    import subprocess
    import sys
    import time

    root = tmp_path / "artifacts"
    config = write_config(tmp_path, tiny_model, str(root), name="typed",
                          health={**TRIPPED, "action": "ask", "on_timeout": "stop", "ask_timeout_s": 600})
    log = tmp_path / "run.log"
    controller, terminal = pty.openpty()
    process = subprocess.Popen([sys.executable, "-m", "cli", "run", str(config)], stdin=terminal,
                               stdout=log.open("w"), stderr=subprocess.STDOUT,
                               env=cli_environment(tmp_path / "prefect"), start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while "Type a decision" not in log.read_text():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.2)
        os.write(controller, b"maybe\n")  # not a decision: asked again
        os.write(controller, b"2 judge pairs look off\n")
        assert process.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        process.kill()
        os.close(controller)
        os.close(terminal)
    text = log.read_text()
    assert "iteration 1 failed its health checks:" in text and "3 keep_model: skip this iteration's training" in text
    assert "not a decision: 'maybe'" in text
    decision = _decision(root, "typed")
    assert (decision["choice"], decision["decided_by"], decision["note"]) == (
        "drop_judge_pairs", "the terminal", "judge pairs look off")
