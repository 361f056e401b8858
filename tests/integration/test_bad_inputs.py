"""Bad inputs a campaign meets, one test each, as a user meets them: the command exits 2 within seconds, before any
model work, with one line that names the field, file, row or URI and says what to do."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from metareward.host.ports import free_port
from tests.integration.campaigns import cli_environment, run_cli, write_config

pytestmark = pytest.mark.slow
RANKINGS_ROW = {"prompt": "p", "response": "r", "rank": 1}


def fails_fast(args: list[str], env: dict[str, str], *expected: str, seconds: float = 40) -> str:
    """Run `metareward ARGS`; assert exit 2 within `seconds`, one error (a config error's invalid fields on the
    lines below it) holding every expected text, no traceback, and no flow run started. Returns the error."""
    started = time.monotonic()
    result = run_cli(args, env, timeout=120)
    elapsed = time.monotonic() - started
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    message = result.stderr[result.stderr.index("error:"):]  # a config error lists its fields below
    for text in expected:
        assert text in message, message
    assert "Beginning flow run" not in result.stdout + result.stderr
    assert elapsed < seconds, f"took {elapsed:.0f} s"
    return message


@pytest.fixture
def env(tmp_path) -> dict[str, str]:
    return cli_environment(tmp_path / "prefect")


def model_without(tiny_model: Path, folder: Path, *patterns: str) -> Path:
    shutil.copytree(tiny_model, folder)
    for pattern in patterns:
        for path in folder.glob(pattern):
            path.unlink()
    return folder


def test_a_config_path_that_is_a_folder(tmp_path, env):
    fails_fast(["run", str(tmp_path)], env, str(tmp_path), "a folder, not a config file")


@pytest.mark.parametrize("start", ["0", "3"])
def test_a_start_iteration_outside_the_campaign(tmp_path, tiny_model, env, start):
    config = write_config(tmp_path, tiny_model, str(tmp_path / "root"), iterations=2)
    fails_fast(["run", str(config), "--start-iteration", start], env, f"start iteration {start}",
               "tiny has iterations 1..2")


def test_a_later_start_iteration_without_a_model_and_none_in_the_store(tmp_path, tiny_model, env):
    config = write_config(tmp_path, tiny_model, str(tmp_path / "root"), iterations=2)
    fails_fast(["run", str(config), "--start-iteration", "2"], env, "no finished checkpoint of iteration 1",
               str(tmp_path / "root"), "--start-model")


@pytest.mark.parametrize("problem,expected", [
    ("missing", "no such model folder"),
    ("weights", "no weights"),
    ("tokenizer", "no tokenizer"),
    ("template", "no chat template"),
])
def test_a_start_model_that_cannot_serve(tmp_path, tiny_model, env, problem, expected):
    config = write_config(tmp_path, tiny_model, str(tmp_path / "root"))
    model = tmp_path / "start-model"
    if problem == "weights":
        model_without(tiny_model, model, "*.safetensors")
    elif problem == "tokenizer":
        model_without(tiny_model, model, "tokenizer.json")
    elif problem == "template":
        model_without(tiny_model, model, "chat_template.jinja")
        settings = json.loads((model / "tokenizer_config.json").read_text())
        settings.pop("chat_template", None)
        (model / "tokenizer_config.json").write_text(json.dumps(settings))
    fails_fast(["run", str(config), "--start-model", str(model)], env, str(model), expected)


def test_a_hub_model_that_cannot_be_fetched(tmp_path, env):
    config = write_config(tmp_path, Path("no-such-org/no-such-model"), str(tmp_path / "root"))
    config.write_text(config.read_text().replace(f"path: {Path('no-such-org/no-such-model')}",
                                                 "path: no-such-org/no-such-model"))
    fails_fast(["run", str(config)], {**env, "HF_HUB_OFFLINE": "1"}, "model no-such-org/no-such-model",
               "cannot be fetched")


def test_an_openai_server_that_does_not_answer(tmp_path, tiny_model, env):
    port = free_port()
    config = write_config(tmp_path, tiny_model, str(tmp_path / "root"),
                          inference={"backend": "openai", "base_url": f"http://127.0.0.1:{port}/v1"})
    # The /v1 the user wrote is not doubled.
    fails_fast(["run", str(config)], env, f"no OpenAI-compatible server answers http://127.0.0.1:{port}/v1/models")


def test_an_unreachable_ray_cluster(tmp_path, tiny_model, env):
    config = write_config(tmp_path, tiny_model, str(tmp_path / "root"))
    address = f"127.0.0.1:{free_port()}"
    fails_fast(["run", str(config)], {**env, "RAY_ADDRESS": address}, "orchestration.ray_address / RAY_ADDRESS",
               f"no Ray cluster answers at {address}", seconds=30)


def test_more_engine_gpus_than_are_visible(tmp_path, tiny_model, env, vllm_python):
    config = write_config(tmp_path, tiny_model, str(tmp_path / "root"),
                          inference={"backend": "vllm", "vllm_python": str(vllm_python), "replicas": 2,
                                     "tensor_parallel_size": 2})
    fails_fast(["run", str(config)], env, "inference.replicas 2 × inference.tensor_parallel_size 2",
               "none is visible")


def test_an_unreachable_prefect_api(tmp_path, tiny_model, env):
    config = write_config(tmp_path, tiny_model, str(tmp_path / "root"))
    url = f"http://127.0.0.1:{free_port()}/api"
    fails_fast(["run", str(config)], {**env, "PREFECT_API_URL": url}, f"PREFECT_API_URL {url} does not answer /health")


@pytest.mark.parametrize("where,value,fix", [
    ("tracking", {"uri": "http://user:pw@127.0.0.1:5000"}, "MLFLOW_TRACKING_PASSWORD"),
    ("artifact_root", "s3://key:pw@bucket/x", "AWS_SECRET_ACCESS_KEY"),
])
def test_credentials_in_the_config(tmp_path, tiny_model, env, where, value, fix):
    config = write_config(tmp_path, tiny_model, str(tmp_path / "root"), **{where: value})
    error = fails_fast(["run", str(config)], env, "holds a password", fix)
    assert "pw@" not in error


def test_credentials_in_the_s3_endpoint(tmp_path, tiny_model, env):
    config = write_config(tmp_path, tiny_model, "s3://bucket/x")
    endpoint = "http://key:pw@127.0.0.1:9"
    fails_fast(["run", str(config)], {**env, "AWS_ENDPOINT_URL_S3": endpoint}, "AWS_ENDPOINT_URL_S3 holds credentials")


def test_evaluate_with_an_unreachable_mlflow_fails_before_judging(tmp_path, tiny_model, env):
    config = write_config(tmp_path, tiny_model, str(tmp_path / "root"), tracking={})
    rankings = Path(__file__).parents[2] / "deployments" / "evaluation" / "rankings-example.jsonl"
    url = f"http://127.0.0.1:{free_port()}"
    fails_fast(["evaluate", "agreement", str(config), "--rankings", str(rankings)],
               {**env, "MLFLOW_TRACKING_URI": url}, f"MLflow tracking server {url} does not answer /health")


def test_evaluate_output_in_a_missing_folder(tmp_path, tiny_model, env):
    config = write_config(tmp_path, tiny_model, str(tmp_path / "root"))
    output = tmp_path / "no-such-folder" / "outputs.json"
    fails_fast(["evaluate", "alpaca-eval", str(config), "--prompts", str(tmp_path / "prompts.jsonl"), "--output",
                str(output)], env, str(tmp_path / "no-such-folder"), "does not exist")


@pytest.mark.parametrize("lines,expected", [
    ([RANKINGS_ROW, {**RANKINGS_ROW, "prompt": "q"}], "nothing to compare"),
    ([RANKINGS_ROW, "{not json"], "row 2: not valid JSON"),
])
def test_rankings_that_cannot_be_compared(tmp_path, tiny_model, env, lines, expected):
    config = write_config(tmp_path, tiny_model, str(tmp_path / "root"))
    rankings = tmp_path / "rankings.jsonl"
    rankings.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    fails_fast(["evaluate", "agreement", str(config), "--rankings", str(rankings)], env, str(rankings), expected)


def test_show_on_a_damaged_manifest(tmp_path, env):
    manifest = tmp_path / "root" / "tiny" / "iter-1" / "judgments" / "manifest.json"
    manifest.parent.mkdir(parents=True)
    manifest.write_text('{"stage": "judgments", "iteration": 1, "shards": {')
    fails_fast(["show", "tiny", "--artifact-root", str(tmp_path / "root")], env, str(manifest), "is damaged",
               "run the campaign again")


@pytest.mark.parametrize("problem,expected", [
    ("sft judgment without a score", ["sft.jsonl", "do not end in a line \"Score: X\"", "rows 2"]),
    ("held-out prompts that are training prompts", ["heldout.jsonl", "also training prompts", "held-out prompts only"]),
    ("the seed as evaluator", ["evaluation.evaluator", "it would judge its own answers", "allow_trained_model"]),
    ("missing reference outputs", ["outputs.json", "no such reference outputs file"]),
])
def test_bad_seed_sft_and_evaluation_inputs(tmp_path, tiny_model, env, problem, expected):
    sft = tmp_path / "sft.jsonl"
    sft.write_text(json.dumps({"instruction": "Q", "response": "A", "judgment": "Fine.\nScore: 4"}) + "\n"
                   + json.dumps({"instruction": "Q", "response": "A", "judgment": "Fine, no verdict."}) + "\n")
    held_out = tmp_path / "heldout.jsonl"
    config = write_config(tmp_path, tiny_model, str(tmp_path / "root"))  # writes the training prompts file
    training_prompts = (tmp_path / "prompts.jsonl").read_text().splitlines()
    held_out.write_text("\n".join([json.dumps({"prompt": "A prompt nobody trains on."}),
                                   *(training_prompts[:1] if problem.startswith("held-out") else [])]) + "\n")
    evaluator = {"model": {"path": str(tiny_model)}, "allow_trained_model": problem != "the seed as evaluator"}
    evaluation = {"prompts": {"path": str(held_out)}, "evaluator": evaluator}
    if problem == "missing reference outputs":
        evaluation.update(reference="outputs", reference_outputs=str(tmp_path / "outputs.json"))
    overrides = {"evaluation": evaluation, **({"sft": {"path": str(sft)}} if problem.startswith("sft") else {})}
    config = write_config(tmp_path, tiny_model, str(tmp_path / "root"), **overrides)
    fails_fast(["run", str(config)], env, *expected)
