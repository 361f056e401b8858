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
