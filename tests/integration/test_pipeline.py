"""The Prefect pipeline end to end on the tiny model: a whole campaign on Prefect's ephemeral API logged to a
real `mlflow server`, caching, a deleted artifact, SIGKILL mid-stage and resume, health checks, and the bad inputs
that must fail before any model work."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import polars as pl
import pytest
import yaml

from metareward.artifacts.store import ArtifactStore
from metareward.host.ports import free_port
from metareward.pipeline.jobs import SEED_FOLDER
from metareward.pipeline.stages import STAGE
from metareward.pipeline.superseded import superseded_key
from metareward.training.models import model_digest
from tests.conftest import REPO
from tests.integration.campaigns import (
    assert_mlflow_lineage,
    cli_environment,
    mlflow_state,
    run_cli,
    start_cli,
    write_config,
)

pytestmark = pytest.mark.slow


def markers(root: Path, campaign: str) -> dict[str, dict]:
    """Every job marker of the campaign — under its folder, and its seed stages' under _seed/ (one campaign per
    root here) — by key, with its finished_at and table digest."""
    found = {}
    for path in sorted((root / campaign).glob("iter-*/*/*.json")) + sorted((root / SEED_FOLDER).glob("*/*.json")):
        if path.name == "manifest.json":
            continue
        data = json.loads(path.read_text())
        found[str(path.relative_to(root))] = {"finished_at": data["finished_at"], "digest": data["table"]["digest"]}
    return found


def stage_tables(root: Path, campaign: str) -> dict[str, pl.DataFrame]:
    """Every stage's table (shards concatenated), keyed by iteration/stage."""
    store = ArtifactStore(str(root))
    tables: dict[str, list[pl.DataFrame]] = {}
    for key in markers(root, campaign):
        parts = key.split("/")
        iteration, stage = ("iter-0", parts[1]) if parts[0] == SEED_FOLDER else parts[1:3]
        tables.setdefault(f"{iteration}/{stage}", []).append(store.read_table(key.removesuffix(".json") + ".parquet"))
    return {name: pl.concat(parts) for name, parts in sorted(tables.items())}


def test_two_iteration_campaign_lineage_caching_and_deleted_artifact(tmp_path, tiny_model, mlflow_server):
    from mlflow import MlflowClient

    root = tmp_path / "artifacts"
    config = write_config(tmp_path, tiny_model, str(root), iterations=2, tracking={})
    # The tracking URI carries a password, given only in the environment: it must never be written anywhere.
    secret = "s3cret-pass-9b2e"
    env = cli_environment(tmp_path / "prefect",
                          MLFLOW_TRACKING_URI=mlflow_server.replace("http://", f"http://metareward:{secret}@"))
    first = run_cli(["run", str(config)], env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "tiny — iteration 2" in first.stdout and "final model:" in first.stdout

    tables = stage_tables(root, "tiny")
    for name, table in tables.items():
        stage = name.split("/")[1]
        assert table.schema == STAGE[stage].schema, name
    iteration_1_model = json.loads(next((root / "tiny/iter-1/checkpoint").glob("all-*.json")).read_text())
    trained_id = iteration_1_model["stats"]["model_id"]
    # Iteration 2 generates with M_2, the checkpoint iteration 1 trained.
    assert set(tables["iter-2/responses"]["model_id"]) == {trained_id}
    assert set(tables["iter-1/responses"]["model_id"]) != {trained_id}
    assert tables["iter-1/prompts"].height == 6 and tables["iter-1/responses"]["prompt_id"].n_unique() == 6
    # Disjoint prompts across iterations while the file lasts (12 prompts, 6 an iteration).
    assert not set(tables["iter-1/prompts"]["prompt_id"]) & set(tables["iter-2/prompts"]["prompt_id"])
    assert (root / "tiny/iter-1/judgments/manifest.json").is_file()

    # MLflow: campaign run, a nested run per iteration, datasets, models M1 → M2 → M3, figures.
    client = MlflowClient(mlflow_server)
    lineage = assert_mlflow_lineage(client, root, tmp_path)

    def logged_ids() -> dict[str, list[str]]:
        state = mlflow_state(client, lineage["campaign"][0].info.experiment_id)
        return {"runs": [r.info.run_id for r in state["campaign"] + state["iterations"]],
                "models": sorted(m.model_id for m in state["models"]),
                "versions": [v.version for v in state["versions"]],
                "points": [len(client.get_metric_history(state["campaign"][0].info.run_id, "judge/score_mean"))]}

    logged = logged_ids()

    # `metareward show` rebuilds the summaries from the store alone.
    shown = run_cli(["show", "tiny", "--artifact-root", str(root)], env)
    assert shown.returncode == 0, shown.stderr
    assert "tiny — iteration 2" in shown.stdout and trained_id in shown.stdout
    assert "Beginning flow run" not in shown.stdout + shown.stderr
    missing = run_cli(["show", "other", "--artifact-root", str(root)], env)
    assert missing.returncode == 2 and "no campaign 'other'" in missing.stderr

    before = markers(root, "tiny")
    started = time.monotonic()
    second = run_cli(["run", str(config)], env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert markers(root, "tiny") == before  # nothing recomputed
    assert second.stderr.count("Finished in state Cached") + second.stdout.count("Finished in state Cached") >= 20
    assert time.monotonic() - started < 120
    assert logged_ids() == logged  # the resumed re-run continued the same runs, logged nothing twice

    # A deleted, a truncated and a garbled table (other bytes of the same size) are computed again, not silently
    # missing or trusted; the log says why, and what reads them stays cached (the same rows come back).
    deleted = next((root / "tiny/iter-1/judgments").glob("shard-0001-*.parquet"))
    deleted.unlink()
    truncated = next((root / "tiny/iter-1/responses").glob("shard-0000-*.parquet"))
    truncated.write_bytes(truncated.read_bytes()[:100])
    garbled = next((root / "tiny/iter-2/judgments").glob("shard-0002-*.parquet"))
    data = bytearray(garbled.read_bytes())
    data[len(data) // 2] ^= 0xFF
    garbled.write_bytes(bytes(data))
    third = run_cli(["run", str(config)], env)
    assert third.returncode == 0, third.stderr[-3000:]
    assert deleted.is_file()
    output = third.stdout + third.stderr
    assert f"its table {truncated} is 100 bytes, its marker recorded" in output
    assert f"its table {garbled} has digest" in output
    after = markers(root, "tiny")
    changed = {key for key in after if after[key]["finished_at"] != before[key]["finished_at"]}
    assert changed == {str(path.relative_to(root)).removesuffix(".parquet") + ".json"
                       for path in (deleted, truncated, garbled)}
    assert all(after[key]["digest"] == before[key]["digest"] for key in changed)
    manifest = json.loads((root / "tiny/iter-1/responses/manifest.json").read_text())
    assert "is 100 bytes" in manifest["shards"]["shard-0000"]["recomputed"]
    assert logged_ids() == logged

    # Starting at iteration 2 without a model takes M_2 from the store: iteration 1's checkpoint.
    resumed = run_cli(["run", str(config), "--start-iteration", "2"], env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"iteration 2 starts from M_2 = {iteration_1_model['stats']['model_uri']}" in resumed.stderr
    assert "tiny — iteration 1" not in resumed.stdout and markers(root, "tiny") == after

    # The password was used (the runs are there) and written nowhere: not in any output, not in Prefect's
    # database (flow-run parameters, logs), MLflow's store and artifacts, or the artifact store.
    outputs = [first, second, third, resumed, shown]
    assert not any(secret in run.stdout + run.stderr for run in outputs)
    leaks = [str(path) for path in tmp_path.rglob("*") if path.is_file() and secret.encode() in path.read_bytes()]
    assert not leaks, f"the tracking password was written to {leaks}"


def test_shipped_baseline_with_seed_sft_logs_its_lineage_and_a_win_rate_every_iteration(
        tmp_path, tiny_model, mlflow_server):
    from mlflow import MlflowClient

    # deployments/configs/self-rewarding-demo.yaml as shipped, with the tiny model for SmolLM2 (seed and evaluator),
    # and a seed SFT stage on the shipped example file.
    raw = yaml.safe_load((REPO / "deployments/configs/self-rewarding-demo.yaml").read_text())
    raw["model"]["path"] = raw["evaluation"]["evaluator"]["model"]["path"] = str(tiny_model)
    raw["prompts"]["path"] = str(REPO / raw["prompts"]["path"])
    raw["evaluation"]["prompts"]["path"] = str(REPO / raw["evaluation"]["prompts"]["path"])
    raw["artifact_root"] = str(root := tmp_path / "artifacts")
    raw["sft"] = {"path": str(REPO / "deployments/sft/eft-example.jsonl"), "num_epochs": 2, "checkpoint_epoch": 1,
                  "global_batch_size": 8, "per_device_batch_size": 4, "learning_rate": 1e-3}
    config = tmp_path / "baseline.yaml"
    config.write_text(yaml.safe_dump(raw))
    env = cli_environment(tmp_path / "prefect", MLFLOW_TRACKING_URI=mlflow_server)
    run = run_cli(["run", str(config)], env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "demo-self-rewarding — seed SFT" in run.stdout and "M_t+1 against the reference: win rate" in run.stdout

    campaign_name = "demo-self-rewarding"
    tables = stage_tables(root, campaign_name)
    for name, table in tables.items():
        assert table.schema == STAGE[name.split("/")[1]].schema, name
    # Actor and judge, no meta-judge: no meta-judgment, Elo or judge pair, actor pairs only in DPO.
    assert {name.split("/")[1] for name in tables} == {
        "sft_data", "sft", "prompts", "responses", "judgments", "actor_pairs", "dpo_dataset", "checkpoint",
        "eval_prompts", "eval_answers", "reference_answers", "win_rate"}
    assert set(tables["iter-1/dpo_dataset"]["kind"]) == set(tables["iter-2/dpo_dataset"]["kind"]) == {"actor"}
    seed = json.loads(next((root / SEED_FOLDER / "sft").glob("all-*.json")).read_text())["stats"]
    trained = [json.loads(next((root / campaign_name / f"iter-{t}/checkpoint").glob("all-*.json")).read_text())[
        "stats"]["model_id"] for t in (1, 2)]
    # Stage 0 trained M_1 on the 16 examples, stopped at epoch 1 of 2; iteration 1 generated with it.
    assert tables["iter-0/sft_data"].height == 16 and (seed["epochs_trained"], seed["epochs_scheduled"]) == (1, 2)
    assert set(tables["iter-1/responses"]["model_id"]) == {seed["model_id"]} != {model_digest(tiny_model)}
    # Each iteration: M_{t+1} against M_1 (reference: seed = the SFT's output, not the base model), 8 held-out
    # prompts, each compared in both orders by the evaluator.
    for t in (1, 2):
        assert set(tables[f"iter-{t}/eval_answers"]["model_id"]) == {trained[t - 1]}
        assert set(tables[f"iter-{t}/reference_answers"]["model_id"]) == {seed["model_id"]}
        comparisons = tables[f"iter-{t}/win_rate"]
        assert comparisons.height == 16 and comparisons.group_by("prompt_id").agg(pl.col("trained_first").sum())[
            "trained_first"].to_list() == [1] * 8
        assert set(comparisons["evaluator_id"]) == {model_digest(tiny_model)}

    # MLflow, experiment "demo" (beside the demo campaign): seed run, lineage base -> SFT dataset -> M_1 (version 1).
    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("demo")
    runs = client.search_runs([experiment.experiment_id])
    by_kind = {}
    for logged_run in runs:
        by_kind.setdefault(logged_run.data.tags["metareward.kind"], []).append(logged_run)
    [campaign_run], [seed_run] = by_kind["campaign"], by_kind["seed"]
    iteration_runs = sorted(by_kind["iteration"], key=lambda r: int(r.data.tags["metareward.iteration"]))
    assert campaign_run.info.run_name == campaign_name and campaign_run.data.params["mode"] == "self_rewarding"
    assert seed_run.info.run_name == "seed-sft" and seed_run.info.status == "FINISHED"
    assert seed_run.data.tags["mlflow.parentRunId"] == campaign_run.info.run_id
    assert [d.dataset.name for d in client.get_run(seed_run.info.run_id).inputs.dataset_inputs] == [
        f"{campaign_name}/iter-0/sft_data"]
    assert client.get_metric_history(seed_run.info.run_id, "train/loss")
    models = {m.name: m for m in client.search_logged_models([experiment.experiment_id])}
    assert set(models) == {f"{campaign_name}-{suffix}" for suffix in ("base", "M1", "M2", "M3")}
    m1, base = models[f"{campaign_name}-M1"], models[f"{campaign_name}-base"]
    assert m1.tags["metareward.parent_model_id"] == base.model_id and m1.source_run_id == seed_run.info.run_id
    assert f"{campaign_name}/iter-0/sft_data" in m1.tags["metareward.training_datasets"]
    assert models[f"{campaign_name}-M2"].tags["metareward.parent_model_id"] == m1.model_id
    versions = sorted(client.search_model_versions(f"name = '{campaign_name}'"), key=lambda v: int(v.version))
    assert [v.source for v in versions] == [f"models:/{models[f'{campaign_name}-M{t}'].model_id}" for t in (1, 2, 3)]
    assert [v.run_id for v in versions] == [seed_run.info.run_id] + [r.info.run_id for r in iteration_runs]

    # The win rate on each iteration's run, with the evaluator's identity and the compared pairs as a dataset...
    for t, iteration_run in enumerate(iteration_runs, start=1):
        metrics = iteration_run.data.metrics
        assert 0 <= metrics["eval/win_rate_ci_low"] <= metrics["eval/win_rate"] <= metrics["eval/win_rate_ci_high"] <= 1
        assert metrics["eval/prompts_compared"] == 8 and metrics["eval/annotations"] == 16
        if metrics["eval/identical_answers"] == 8:  # every pair the same length: AlpacaEval's LC is undefined
            assert "eval/lc_win_rate" not in metrics and "LC undefined (every answer pair" in run.stdout
        else:
            assert 0 <= metrics["eval/lc_win_rate"] <= 1
        tags = iteration_run.data.tags
        assert (tags["metareward.evaluator"], tags["metareward.evaluator_digest"]) == (
            str(tiny_model), model_digest(tiny_model))
        assert tags["metareward.evaluation_reference"] == "seed"
        datasets = {d.dataset.name: d for d in client.get_run(iteration_run.info.run_id).inputs.dataset_inputs}
        assert datasets[f"{campaign_name}/iter-{t}/win_rate"].tags[0].value == "evaluation"
        assert not any(name.startswith("meta_judge/") for name in metrics)
    # ...and over iterations on the campaign run.
    assert [m.step for m in client.get_metric_history(campaign_run.info.run_id, "eval/win_rate")] == [1, 2]
    figure = client.download_artifacts(campaign_run.info.run_id, "win_rate.png", str(tmp_path))
    assert open(figure, "rb").read(8) == b"\x89PNG\r\n\x1a\n"

    # The paper's tables: printed by `show --paper` and on the campaign run, from the same stages.
    paper = run_cli(["show", campaign_name, "--paper", "--artifact-root", str(root)], env)
    assert paper.returncode == 0, paper.stderr
    rows = {line.split(" | ")[0].lstrip("| "): line for line in paper.stdout.splitlines() if line.startswith("| ")}
    assert {"M_2", "M_3"} <= set(rows) and "%" in rows["M_2"]
    assert "not meta-judged in this iteration" in paper.stdout  # the baseline has no meta-judge
    assert [line.split(" | ")[1] for line in paper.stdout.split("## Fig. 5")[1].splitlines()
            if line.startswith("| 1 ") or line.startswith("| 2 ")] == [str(tables[f"iter-{t}/judgments"]["score"]
                                                                         .fill_nan(None).count()) for t in (1, 2)]
    logged = client.download_artifacts(campaign_run.info.run_id, "paper_tables.md", str(tmp_path))
    assert open(logged).read() == paper.stdout

    # Against fixed reference outputs (AlpacaEval's JSON) instead: only the win rates are computed again.
    outputs = tmp_path / "reference.json"
    outputs.write_text(json.dumps([{"instruction": prompt, "output": "I do not know.", "generator": "fixed"}
                                   for prompt in tables["iter-1/eval_prompts"]["prompt"]]))
    raw["evaluation"].update(reference="outputs", reference_outputs=str(outputs))
    config.write_text(yaml.safe_dump(raw))
    before = markers(root, campaign_name)
    again = run_cli(["run", str(config)], env)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    after = markers(root, campaign_name)
    added = sorted(set(after) - set(before))
    assert [key.split("/")[1:3] for key in added] == [["iter-1", "win_rate"], ["iter-2", "win_rate"]]
    # Nothing else ran again; the former win-rate jobs left the stage's folder for _superseded/, unchanged.
    superseded = {key: marker for key, marker in before.items() if key not in after}
    assert [key.split("/")[1:3] for key in sorted(superseded)] == [["iter-1", "win_rate"], ["iter-2", "win_rate"]]
    assert {key: after[key] for key in before if key not in superseded} == {
        key: marker for key, marker in before.items() if key not in superseded}
    for key, marker in superseded.items():
        moved = json.loads((root / superseded_key(key)).read_text())
        assert {"finished_at": moved["finished_at"], "digest": moved["table"]["digest"]} == marker
    against_outputs = ArtifactStore(str(root)).read_table(added[0].removesuffix(".json") + ".parquet")
    assert set(against_outputs["reference_chars"]) == {len("I do not know.")} and against_outputs.height == 16
    # Forced verdicts are AlpacaEval's probability-weighted preferences, not 0/1: the trained answer's share of
    # P(m) + P(M), the two orders of a prompt summing to about 1 for an evaluator with no position bias.
    assert not against_outputs["identical"].any() and not set(against_outputs["preference"]) <= {0.0, 1.0}
    assert against_outputs["preference"].is_between(0, 1).all()


def test_sigkill_during_judging_then_resume_equals_uninterrupted(tmp_path, tiny_model):
    root = tmp_path / "killed"
    config = write_config(tmp_path, tiny_model, str(root))
    env = cli_environment(tmp_path / "prefect")
    # Judgments' shard-0001 is held as it starts (never let go), so the kill lands while judging whatever the
    # machine's speed: once that job is held and another judging shard has finished.
    release = tmp_path / "never-released"
    held = {**env, "METAREWARD_INJECT_FAULT": f"judgments:shard-0001:hold={release}"}
    process = start_cli(["run", str(config)], held, tmp_path / "killed.log")
    judgments = root / "tiny/iter-1/judgments"
    deadline = time.monotonic() + 300
    while not (release.with_name("never-released.started").exists() and list(judgments.glob("shard-*.json"))):
        assert process.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "judging never started"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    done_at_kill = markers(root, "tiny")
    finished_judgments = [key for key in done_at_kill if "/judgments/" in key]
    assert 1 <= len(finished_judgments) < 3 and not any("shard-0001" in key for key in finished_judgments)

    resumed = run_cli(["run", str(config)], env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = markers(root, "tiny")
    for key, marker in done_at_kill.items():
        assert after[key] == marker, f"{key} was recomputed after the kill"

    # The same command into another root (METAREWARD_ARTIFACT_ROOT overrides the config) never killed.
    reference_root = tmp_path / "uninterrupted"
    reference = run_cli(["run", str(config)], {**env, "METAREWARD_ARTIFACT_ROOT": str(reference_root)})
    assert reference.returncode == 0, reference.stderr[-3000:]
    resumed_tables, reference_tables = stage_tables(root, "tiny"), stage_tables(reference_root, "tiny")
    assert resumed_tables.keys() == reference_tables.keys()
    for name in resumed_tables:
        assert resumed_tables[name].equals(reference_tables[name]), name


def test_health_checks_warn_or_stop_before_training(tmp_path, tiny_model):
    # This tiny campaign's meta-judge picks position A in 53% of battles: a 50% threshold trips.
    root = tmp_path / "root"
    env = cli_environment(tmp_path / "prefect")
    warn = write_config(tmp_path, tiny_model, str(root), health={"max_position_a_share": 0.5, "action": "warn"},
                        tracking={})
    warned = run_cli(["run", str(warn)], env)
    assert warned.returncode == 0, warned.stderr[-3000:]
    assert "health check: meta-judge position-A share 52.8%, threshold 50.0%" in warned.stdout + warned.stderr
    stop = write_config(tmp_path, tiny_model, str(root), health={"max_position_a_share": 0.5, "action": "stop"},
                        tracking={})
    stopped = run_cli(["run", str(stop)], env)
    assert stopped.returncode == 2
    assert ("iteration 1 failed its health checks, not training: meta-judge position-A share 52.8%, threshold "
            "50.0% (health.max_position_a_share)") in stopped.stderr

    # The local MLflow store (default: beside the artifacts) shows the stopped iteration as FAILED, with why
    # and with what it measured; the warned campaign's run finished.
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root / '_mlflow' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id],
                              filter_string="tags.`metareward.kind` = 'iteration'", order_by=["attributes.start_time"])
    assert [run.info.status for run in runs] == ["FINISHED", "FAILED"]
    assert "failed its health checks" in runs[1].data.tags["metareward.error"]
    assert runs[1].data.metrics["meta_judge/battles"] > 0 and "train/loss" not in runs[1].data.metrics


@pytest.mark.parametrize("problem", ["prompt column", "config", "model"])
def test_bad_input_fails_fast_before_any_model_work(tmp_path, tiny_model, problem):
    overrides, model = {}, tiny_model
    if problem == "prompt column":
        bad = tmp_path / "bad.jsonl"
        bad.write_text('{"text": "hello"}\n')
        overrides["prompts"] = {"path": str(bad)}
    elif problem == "config":
        overrides["shard_size"] = 0
    else:
        model = tmp_path / "no-model"
    config = write_config(tmp_path, model, str(tmp_path / "root"), **overrides)
    started = time.monotonic()
    result = run_cli(["run", str(config)], cli_environment(tmp_path / "prefect"))
    assert result.returncode == 2
    expected = {"prompt column": "row 1 has no 'prompt' field", "config": "shard_size",
                "model": "no such model folder"}[problem]
    assert expected in result.stderr
    assert "Beginning flow run" not in result.stdout + result.stderr
    assert time.monotonic() - started < 60


def test_unreachable_tracking_server_fails_before_any_model_work(tmp_path, tiny_model):
    config = write_config(tmp_path, tiny_model, str(tmp_path / "artifacts"), tracking={})
    env = cli_environment(tmp_path / "prefect", MLFLOW_TRACKING_URI=f"http://127.0.0.1:{free_port()}")
    result = run_cli(["run", str(config)], env, timeout=120)
    assert result.returncode == 2
    assert "does not answer /health" in result.stderr and "MLFLOW_TRACKING_URI" in result.stderr
    assert not (tmp_path / "artifacts" / "tiny").exists()
