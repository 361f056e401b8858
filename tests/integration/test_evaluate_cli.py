"""`metareward evaluate`: judge agreement, the AlpacaEval and Arena-Hard exports with the tiny model, logged to MLflow;
the Arena-Hard answers read back the way Arena-Hard's own code reads them."""

from __future__ import annotations

import json
import os
from glob import glob
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


def _arena_hard_model_answers(answer_dir: Path, key: str) -> dict:
    """lmarena/arena-hard-auto utils load_model_answers, its reading expressions verbatim: utils/completion.py at
    196f6b826783b3da7310e361a805fa36f0be83f3 (key "uid") and utils.py at 3071ef95d913bb5cd632641db336a3b6c7fe4bdd
    (key "question_id", the v0.1 release); a missing key fails here as it fails there."""
    filenames = glob(os.path.join(answer_dir, "*.jsonl"))
    filenames.sort()
    model_answers = {}
    for filename in filenames:
        model_name = os.path.basename(filename)[:-6]
        answer = {}
        with open(filename) as fin:
            for line in fin:
                line = json.loads(line)
                answer[line[key]] = line
        model_answers[model_name] = answer
    return model_answers


def test_arena_hard_answers_are_read_by_arena_hard_loaders(tmp_path, tiny_model):
    import pandas as pd
    from mlflow import MlflowClient

    root = tmp_path / "artifacts"
    config = write_config(tmp_path, tiny_model, str(root), tracking={})
    env = cli_environment(tmp_path / "prefect")
    prompts = [json.loads(line)["prompt"] for line in (tmp_path / "prompts.jsonl").read_text().splitlines()[:3]]

    # Arena-Hard v2.0's layout (data/arena-hard-v2.0/question.jsonl at 196f6b8): uid, category, prompt.
    v2 = tmp_path / "data" / "arena-hard-v2.0"
    (v2 / "model_answer").mkdir(parents=True)
    uids = ["2edbb5f36f5b42be", "ec71c09662a64365", "d5cdf24c4e614beb"]  # its first three ids
    questions = [{"uid": uid, "category": "hard_prompt", "prompt": prompt}
                 for uid, prompt in zip(uids, prompts, strict=True)]
    (v2 / "question.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions))
    result = run_cli(["evaluate", "arena-hard", str(config), "--questions", str(v2 / "question.jsonl"), "--output",
                      str(v2 / "model_answer" / "tiny-seed.jsonl"), "--model-id", "tiny-seed"], env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "answers to 3 questions in Arena-Hard's 'uid' format (model 'tiny-seed'" in result.stdout
    answers = _arena_hard_model_answers(v2 / "model_answer", "uid")["tiny-seed"]
    assert list(answers) == [q["uid"] for q in questions]
    for question in questions:
        answer = answers[question["uid"]]
        # gen_judgment.py (196f6b8) pairwise_judgment and judgment read these.
        assert isinstance(answer["messages"][-1]["content"]["answer"], str) and answer["model"] == "tiny-seed"
        assert answer["messages"][0] == {"role": "user", "content": question["prompt"]}
        text, tokens = answer["messages"][-1]["content"]["answer"], answer["metadata"]["token_len"]
        assert 0 < tokens <= 16 if text else tokens == 0  # the model's tokens, at most the actor's max_tokens (16)
    assert any(answer["messages"][-1]["content"]["answer"] for answer in answers.values())
    # show_result.py (196f6b8) get_model_style_metadata and print_leaderboard_with_style_features.
    df = pd.read_json(v2 / "model_answer" / "tiny-seed.jsonl", lines=True)
    assert df.iloc[0]["model"] == "tiny-seed"
    style = df.set_index("uid")["metadata"].to_dict()
    features = [[v if isinstance(v, int) else sum(v.values()) for k, v in style[q["uid"]].items()] for q in questions]
    assert [row[0] for row in features] == [answers[q["uid"]]["metadata"]["token_len"] for q in questions]
    assert {len(row) for row in features} == {4}

    # Arena-Hard v0.1's release layout (3071ef9): question_id, turns; a two-turn question answered turn by turn.
    v01 = tmp_path / "data" / "arena-hard-v0.1"
    (v01 / "model_answer").mkdir(parents=True)
    legacy = [{"question_id": 81, "category": "writing", "turns": [{"content": prompts[0]}, {"content": prompts[1]}]},
              {"question_id": 82, "category": "writing", "turns": [{"content": prompts[2]}]}]
    (v01 / "question.jsonl").write_text("".join(json.dumps(q) + "\n" for q in legacy))
    result = run_cli(["evaluate", "arena-hard", str(config), "--questions", str(v01 / "question.jsonl"), "--output",
                      str(v01 / "model_answer" / "answers.jsonl")], env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Arena-Hard names a model by its answer file: put it at data/BENCH/model_answer/tiny-" in result.stdout
    [(name, answers)] = _arena_hard_model_answers(v01 / "model_answer", "question_id").items()
    assert name == "answers" and list(answers) == [81, 82]
    for question in legacy:
        answer = answers[question["question_id"]]
        # gen_judgment.py (3071ef9) judgment: the model, then every turn's content.
        assert answer["model_id"].startswith("tiny-")
        turns = answer["choices"][0]["turns"]
        assert len(turns) == len(question["turns"]) and all(isinstance(turn["content"], str) for turn in turns)
        assert answer["conv_metadata"]["token_len"] == sum(turn["token_len"] for turn in turns)
    # show_result.py (3071ef9) with style control.
    df = pd.read_json(v01 / "model_answer" / "answers.jsonl", lines=True)
    metadata = {df.model_id[0]: df[["question_id", "conv_metadata"]].set_index("question_id").to_dict("index")}
    for part in ("token_len", "header_count", "list_count", "bold_count"):
        assert metadata[answers[81]["model_id"]][81]["conv_metadata"][part] == answers[81]["conv_metadata"][part]

    client = MlflowClient(f"sqlite:///{root / '_mlflow' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id],
                              filter_string="tags.`metareward.kind` = 'evaluation'", order_by=["attributes.start_time"])
    assert [r.data.tags["metareward.evaluation"] for r in runs] == ["arena-hard-export"] * 2
    first = _arena_hard_model_answers(v2 / "model_answer", "uid")["tiny-seed"].values()
    assert runs[0].data.metrics["export/answers"] == 3
    assert runs[0].data.metrics["export/mean_tokens"] == pytest.approx(
        sum(a["metadata"]["token_len"] for a in first) / 3)
    assert runs[1].data.metrics["export/answer_turns"] == 3 and runs[1].data.metrics["export/answers"] == 2


def test_arena_hard_task_stores_the_answers_under_the_model_id(tmp_path, tiny_model):
    from metareward.config.campaign import CampaignConfig
    from tasks.evaluate import arena_hard_export

    config = CampaignConfig.from_yaml(write_config(tmp_path, tiny_model, str(tmp_path / "artifacts")))
    questions = tmp_path / "question.jsonl"
    questions.write_text(json.dumps({"uid": "u1", "prompt": "Name a colour."}) + "\n")
    uri = arena_hard_export.fn(config, str(questions), None)
    stored = Path(uri)
    [line] = stored.read_text().splitlines()
    assert stored.parent.name == "arena-hard" and stored.name == json.loads(line)["model"] + ".jsonl"
    assert json.loads(line)["uid"] == "u1"


def test_bad_arena_hard_question_file_names_the_line_and_field(tmp_path, tiny_model):
    config = write_config(tmp_path, tiny_model, str(tmp_path / "artifacts"))
    bad = tmp_path / "question.jsonl"
    bad.write_text('{"uid": "a", "prompt": "p"}\n{"question_id": "b", "turns": [{"text": "q"}]}\n')
    result = run_cli(["evaluate", "arena-hard", str(config), "--questions", str(bad), "--output",
                      str(tmp_path / "a.jsonl")], cli_environment(tmp_path / "p"))
    assert result.returncode == 2 and "question.jsonl: line 2: a question keyed by 'question_id'" in result.stderr
    assert not (tmp_path / "a.jsonl").exists()
