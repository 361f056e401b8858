"""The summary table: every dropped or skipped row counted with its reason, the prompts stage's from the file."""

from metareward.config.campaign import CampaignConfig
from metareward.pipeline.jobs import plan_job, run_job
from metareward.pipeline.summary import SUMMARY_HEADER, summary_rows


def test_the_prompts_stage_counts_what_the_file_loses_and_the_summary_names_it(tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"prompt": "  "}\n{"prompt": "b"}\n{"prompt": "a"}\n{"prompt": "c"}\n')
    config = CampaignConfig.from_dict({"name": "c", "model": {"path": "m"}, "prompts": {"path": str(prompts)},
                                       "artifact_root": str(tmp_path / "root"), "iterations": [{"num_prompts": 2}]})
    result = run_job(config, plan_job(config, "prompts", 1, {}))
    assert result.table.rows == 2
    assert (result.stats["file_prompts"], result.stats["empty_prompts"], result.stats["duplicate_prompts"]) == (3, 1, 1)
    [row] = summary_rows({"prompts": result.stats})
    assert (dict(zip(SUMMARY_HEADER, row, strict=True))["dropped or skipped"]
            == "1 empty in the file, 1 duplicates in the file")


def test_every_stage_names_its_drops():
    rows = summary_rows({
        "responses": {"rows": 16, "skipped_prompts": 1, "dropped_duplicates": 2},
        "actor_pairs": {"rows": 3, "no_pair": 2, "chosen_too_long": 1, "prompts_without_scored_response": 1},
        "checkpoint": {"rows": 4, "pairs_too_long": 3},
        "judgment_elo": {"rows": 9},
    })
    dropped = {row[0]: row[-1] for row in rows}
    assert dropped == {"responses": "1 too long for the context, 2 identical responses",
                       "actor_pairs": "1 prompts without a valid score, 2 without a pair, 1 chosen too long",
                       "checkpoint": "3 over max_length", "judgment_elo": ""}


def test_the_summary_printed_to_a_log_keeps_its_headers_whole(capsys):
    from cli.progress import print_summary

    stages = {"judgments": {"shards": 2, "rows": 18, "parse_failure_rate": 0.0, "mean_score": 3.2, "mean_chars": 120,
                            "tokens_per_second": 40.1, "completion_tokens": 100, "seconds": 3.0,
                            "dropped_duplicates": 2}}
    outcome = {"iteration": 1, "model_id": "a", "next_model_id": "b", "next_model": "m", "stages": stages}
    print_summary("demo", [outcome])
    header = next(line for line in capsys.readouterr().out.splitlines() if "stage" in line)
    assert all(f" {name} " in header for name in ("shards", "parse fail", "mean score", "tok/s", "dropped or skipped"))


def test_the_campaign_table_is_narrow_links_runs_and_names_models_as_mlflow_does():
    from metareward.pipeline.summary import campaign_markdown

    local = "`mlflow ui --backend-store-uri sqlite:///r/_mlflow/mlflow.db`, then /#/experiments/1/runs/a"
    outcomes = [
        {"iteration": 1, "model_id": "aaaa1111", "next_model_id": "bbbb2222", "mlflow": local,
         "stages": {"judgments": {"mean_score": 3.2}, "actor_pairs": {"rows": 5}, "judge_pairs": {"rows": 2},
                    "checkpoint": {"loss_after": 0.67, "rewards_accuracies_after": 0.83, "loss_first": 0.6931,
                                   "loss_last": 0.6931}},
         "health_decision": {"choice": "continue", "decided_by": "the health checks (all passed)", "note": ""}},
        {"iteration": 2, "model_id": "bbbb2222", "next_model_id": "bbbb2222", "mlflow": "http://mlflow:5000/#/r/b",
         "stages": {"judgments": {"mean_score": 4.9}, "actor_pairs": {"rows": 5}},
         "health_decision": {"choice": "keep_model", "decided_by": "the Prefect UI", "note": "saturated"}},
    ]
    lines = campaign_markdown("tiny", outcomes, "tiny").splitlines()
    assert lines[4] == ("| iteration 1 | M_1 → **M_2** (tiny v2) | 3.20 | 5 / 2 | all checks passed | loss 0.670, "
                        "reward acc. 83% |  |")
    assert lines[5] == ("| [iteration 2](http://mlflow:5000/#/r/b) | M_2 → **M_3 = M_2** (tiny v2) | 4.90 | 5 / — | "
                        '**keep_model** (the Prefect UI): "saturated" | kept M_t |  |')
    assert lines[-1] == ("MLflow runs (a local store): serve it with `mlflow ui --backend-store-uri "
                         "sqlite:///r/_mlflow/mlflow.db`, then open the experiment tiny.")
    assert "(`bbbb2222`)" in campaign_markdown("tiny", outcomes, None)  # tracking off: digests
