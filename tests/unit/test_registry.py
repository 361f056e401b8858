"""The stage registry: every setting of the config is in some stage's key or declared unable to change a table, a
runner takes exactly its stage's settings, and a changed setting recomputes its stage and what follows, nothing else."""

from __future__ import annotations

import dataclasses
import inspect
import json
import types
import typing
from pathlib import Path

import polars as pl
import pytest
from pydantic import BaseModel

from metareward.artifacts.stats import StageStats
from metareward.artifacts.store import TableRef, open_store
from metareward.config.campaign import CampaignConfig, ConfigError
from metareward.pipeline.context import ModelRef
from metareward.pipeline.jobs import (
    SEED_FOLDER,
    Job,
    JobResult,
    complete,
    plan_job,
    settings_digest,
    shard_inputs,
    sharding,
    stored,
)
from metareward.pipeline.stages import (
    EVALUATION_STAGES,
    ITERATION_STAGES,
    MODEL_ROLES,
    NOT_IN_ANY_TABLE,
    SEED_STAGES,
    STAGE,
    STAGES,
    stage,
)
from metareward.pipeline.summary import job_line
from tests.conftest import PROMPT_FILE, REPO

ITERATION = {"num_prompts": 4, "num_responses": 3, "num_judgments": 3}
SFT_FILE = REPO / "deployments" / "sft" / "eft-example.jsonl"
HELD_OUT = REPO / "deployments" / "prompts" / "heldout-20.jsonl"


def base(backend: str = "transformers") -> dict:
    """A two-iteration campaign with a seed SFT and an evaluation, as the raw mapping a user writes (train_judge
    left to `mode`); the campaign's and the evaluator's engines both on `backend`."""
    inference = {"backend": backend}
    if backend == "openai":
        inference["base_url"] = "http://127.0.0.1:9"
    return {"name": "c", "model": {"path": "m"}, "prompts": {"path": str(PROMPT_FILE)}, "inference": inference,
            "shard_size": 2, "iterations": [dict(ITERATION), dict(ITERATION)],
            "sft": {"path": str(SFT_FILE)},
            "evaluation": {"prompts": {"path": str(HELD_OUT)}, "num_prompts": 4,
                           "evaluator": {"model": {"path": "e"}, "inference": {**inference, "verdict_mode": "free"}}}}


def stage_iteration(entry, t: int) -> int:
    """The iteration number a stage runs under: 0 for the seed's stages."""
    return 0 if entry in SEED_STAGES else t


def settings_by_stage(config: CampaignConfig) -> dict[tuple[int, str], str]:
    return {(t, entry.name): settings_digest(entry.settings(config, stage_iteration(entry, t)))
            for t in range(1, len(config.iterations) + 1) for entry in STAGES}


# Values that the generic rule below would make invalid.
SPECIAL = {"iterations[].dpo.global_batch_size": 64, "iterations[].dpo.checkpoint_epoch": 4,
           "iterations[].dpo.per_device_batch_size": 8,
           "sft.global_batch_size": 64, "sft.checkpoint_epoch": 4, "sft.per_device_batch_size": 8,
           "inference.backend": "vllm", "mode": "self_rewarding"}
FILES = {"prompts.path": '{"prompt": "a prompt of another file"}\n',
         "evaluation.prompts.path": '{"prompt": "a held-out prompt of another file"}\n',
         "sft.path": '{"instruction": "i", "response": "r", "judgment": "Fine.\\nScore: 3"}\n'}


def leaf_fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, object]]:
    """(path, annotation) of every setting, "iterations[].dpo.beta" for a field of every iteration; an optional
    section ("sft", "evaluation.evaluator.model") is walked into."""
    found = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        args = typing.get_args(annotation)
        sections = [arg for arg in args if isinstance(arg, type) and issubclass(arg, BaseModel)]
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            found += leaf_fields(annotation, f"{prefix}{name}.")
        elif typing.get_origin(annotation) is list and args and issubclass(args[0], BaseModel):
            found += leaf_fields(args[0], f"{prefix}{name}[].")
        elif sections:
            found += leaf_fields(sections[0], f"{prefix}{name}.")
        else:
            found.append((f"{prefix}{name}", annotation))
    return found


def alternative(path: str, annotation, value, tmp_path: Path) -> dict:
    """Another valid value of the setting, as the changes to make (one, or the ones it needs to be valid)."""
    if path in SPECIAL:
        return {path: SPECIAL[path]}
    if path in FILES:
        other = tmp_path / (path.replace(".", "-") + ".jsonl")
        other.write_text(FILES[path])
        return {path: str(other)}
    if path == "evaluation.reference_outputs":
        other = tmp_path / "reference.json"
        other.write_text('[{"instruction": "x", "output": "y"}]')
        return {"evaluation.reference": "outputs", path: str(other)}
    if typing.get_origin(annotation) is typing.Literal:
        return {path: next(choice for choice in typing.get_args(annotation) if choice != value)}
    if typing.get_origin(annotation) is list:
        return {path: ["--max-num-seqs", "8"]}
    kinds = [kind for kind in typing.get_args(annotation) if kind is not type(None)] or [annotation]
    kind = typing.get_origin(kinds[0]) or kinds[0]
    if typing.get_origin(kinds[0]) is typing.Literal:
        return {path: next(choice for choice in typing.get_args(kinds[0]) if choice != value)}
    if kind is bool:
        return {path: not value}
    if kind is int:
        return {path: 64 if value is None else value + 1}
    if kind is float:
        return {path: 0.5 if value is None else value + 0.05}
    if kind is str:
        return {path: "http://127.0.0.1:9/x" if value is None else value + "x"}
    raise AssertionError(f"{path}: no alternative for {annotation}")


def perturbed(raw: dict, path: str, value) -> dict:
    data = json.loads(json.dumps(raw))
    parts = path.split(".")
    target = data
    if parts[0] == "iterations[]":
        target, parts = data["iterations"][0], parts[1:]
    for part in parts[:-1]:
        target = target.setdefault(part, {})
    target[parts[-1]] = value
    return data


def current(config: CampaignConfig, path: str):
    value = config.model_dump()
    for part in path.split("."):
        value = value["iterations"][0] if part == "iterations[]" else value[part]
    return value


def test_every_setting_is_in_a_stage_key_or_declared_unable_to_change_a_table(tmp_path):
    fields = leaf_fields(CampaignConfig)
    assert set(NOT_IN_ANY_TABLE) <= {path for path, _ in fields}, "NOT_IN_ANY_TABLE names a setting that is gone"
    forgotten, wrongly_declared = [], []
    for path, annotation in fields:
        changed = set()
        for backend in ("transformers", "vllm", "openai"):
            raw = base(backend)
            config = CampaignConfig.from_dict(raw)
            changes = alternative(path, annotation, current(config, path), tmp_path)
            if path == "inference.backend" and changes[path] == backend:
                changes[path] = "transformers"
            for changed_path, value in changes.items():
                raw = perturbed(raw, changed_path, value)
            other = CampaignConfig.from_dict(raw)
            before, after = settings_by_stage(config), settings_by_stage(other)
            changed |= {key for key in before if before[key] != after[key]}
        if path in NOT_IN_ANY_TABLE and changed:
            wrongly_declared.append(f"{path} changes {sorted(changed)}")
        if path not in NOT_IN_ANY_TABLE and not changed:
            forgotten.append(path)
    assert not forgotten, f"settings no stage hashes and NOT_IN_ANY_TABLE does not explain: {forgotten}"
    assert not wrongly_declared, f"declared unable to change a table, yet in a key: {wrongly_declared}"


def test_the_prompt_file_is_keyed_by_its_content_not_its_path(tmp_path):
    copy = tmp_path / "same.jsonl"
    copy.write_bytes(PROMPT_FILE.read_bytes())
    config = CampaignConfig.from_dict(base())
    moved = CampaignConfig.from_dict(perturbed(base(), "prompts.path", str(copy)))
    assert settings_by_stage(config) == settings_by_stage(moved)


def test_each_runner_takes_exactly_its_stages_settings():
    config = CampaignConfig.from_dict(base())
    for entry in STAGES:
        parameters = inspect.signature(entry.runner).parameters
        keywords = {name for name, p in parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}
        assert list(parameters)[0] == "context", entry.name
        assert keywords == set(entry.settings(config, stage_iteration(entry, 1))), entry.name


def test_registry_is_in_campaign_order_and_consistent():
    assert [entry.name for entry in SEED_STAGES] == ["sft_data", "sft"]
    assert [entry.name for entry in ITERATION_STAGES] == [
        "prompts", "responses", "judgments", "actor_pairs", "meta_judgments", "judgment_elo", "judge_pairs",
        "dpo_dataset", "checkpoint"]
    assert [entry.name for entry in EVALUATION_STAGES] == ["eval_prompts", "eval_answers", "reference_answers",
                                                           "win_rate"]
    names = [entry.name for entry in STAGES]
    for index, entry in enumerate(STAGES):
        assert set(entry.inputs) <= set(names[:index]), f"{entry.name} reads a later stage"
        assert set(entry.optional_inputs) <= set(entry.inputs)
        assert set(entry.report_columns) <= set(entry.schema), entry.name
        assert entry.dataset_context in (None, "generation", "evaluation", "training")
        assert entry.model in (None, *MODEL_ROLES), entry.name
        if entry.sharded:
            assert "prompts" in entry.inputs and entry.model == "policy", entry.name
    with pytest.raises(KeyError, match="no stage 'judgment'; the stages are"):
        stage("judgment")


def test_a_stage_of_a_section_the_config_lacks_says_so():
    raw = base()
    del raw["sft"], raw["evaluation"]
    config = CampaignConfig.from_dict(raw)
    with pytest.raises(ConfigError, match="no sft section"):
        STAGE["sft"].settings(config, 0)
    with pytest.raises(ConfigError, match="no evaluation section"):
        STAGE["win_rate"].settings(config, 1)


def planned_keys(config: CampaignConfig, iteration: int = 1) -> dict[str, list[str]]:
    """Every job key of the seed's SFT and of an iteration with its evaluation, each table's digest standing
    for its key: a job whose key changes writes a different table, as recomputing it would. A trained model's
    digest stands for its training job's key (M_1 the seed SFT's, M_{t+1} the checkpoint's)."""
    models = {"base": ModelRef("m", "base-digest"), "policy": ModelRef("m", "base-digest"),
              "evaluator": ModelRef("e", "evaluator-digest")}
    results: dict[str, list[JobResult]] = {}
    for entry in STAGES:
        t = stage_iteration(entry, iteration)
        given = {name: results[name] for name in entry.inputs if name in results}
        models["reference"] = models["policy"]
        owner = models[entry.model] if entry.model else None
        if entry.sharded:
            jobs = [plan_job(config, entry.name, t, shard_inputs(given, index), owner, index)
                    for index in range(sharding(config, given))]
        else:
            jobs = [plan_job(config, entry.name, t, given, owner)]
        results[entry.name] = [JobResult(job, TableRef(job.key, 4, job.cache_key), {}) for job in jobs]
        if entry.name == "sft":
            models["policy"] = ModelRef("m1", f"trained-by-{jobs[0].cache_key}")
        if entry.name == "checkpoint":
            models["trained"] = ModelRef("m2", f"trained-by-{jobs[0].cache_key}")
    return {name: [result.job.cache_key for result in shard] for name, shard in results.items()}


def recomputed(change: dict) -> set[str]:
    raw = base()
    for path, value in change.items():
        raw = perturbed(raw, path, value)
    before, after = planned_keys(CampaignConfig.from_dict(base())), planned_keys(CampaignConfig.from_dict(raw))
    return {name for name in before if before[name] != after[name]}


AFTER_TRAINING = {"checkpoint", "eval_answers", "win_rate"}
"""What a new M_{t+1} recomputes: its training, its answers and their comparison (not the reference's answers)."""


def test_a_changed_judge_sampling_setting_recomputes_judgments_and_what_follows_not_responses():
    assert recomputed({"iterations[].judge_sampling": {"temperature": 0.7}}) == {
        "judgments", "actor_pairs", "meta_judgments", "judgment_elo", "judge_pairs", "dpo_dataset"} | AFTER_TRAINING


def test_a_changed_rho_recomputes_actor_pairs_and_what_follows_only():
    assert recomputed({"iterations[].rho": 0.32}) == {"actor_pairs", "dpo_dataset"} | AFTER_TRAINING


def test_on_empty_preferences_is_in_the_checkpoint_key():
    assert recomputed({"on_empty_preferences": "keep_model"}) == AFTER_TRAINING


@pytest.mark.parametrize("switch, value, first", [
    ("positional_weights", False, "judgment_elo"),
    ("battle_rule", "both_orders_agree", "judgment_elo"),
    ("meta_judge_sees_scores", False, "meta_judgments"),
    ("meta_judged_responses", "all", "meta_judgments"),
])
def test_each_ablation_switch_recomputes_its_stage_and_what_follows(switch, value, first):
    meta_judge_step = ["meta_judgments", "judgment_elo", "judge_pairs", "dpo_dataset"]
    assert recomputed({f"iterations[].{switch}": value}) == set(meta_judge_step[meta_judge_step.index(first):]) | (
        AFTER_TRAINING)


def test_positional_weights_are_not_in_the_key_under_the_agreement_rule():
    agreed = {"iterations[].battle_rule": "both_orders_agree"}
    assert recomputed(agreed) == recomputed({**agreed, "iterations[].positional_weights": False})


def test_the_seed_sft_recomputes_m1_and_everything_after_it_its_file_the_examples_too():
    everything = set(planned_keys(CampaignConfig.from_dict(base()))) - {"prompts", "eval_prompts", "sft_data"}
    assert recomputed({"sft.learning_rate": 1e-7}) == everything
    other = REPO / "deployments" / "sft" / "eft-example.jsonl"
    assert recomputed({"sft.path": str(other)}) == set()  # the same file: the same content


def test_evaluation_settings_recompute_the_evaluation_only():
    assert recomputed({"evaluation.sampling": {"temperature": 0.5}}) == {"eval_answers", "reference_answers",
                                                                          "win_rate"}
    assert recomputed({"evaluation.bootstrap": 200}) == {"win_rate"}
    assert recomputed({"evaluation.evaluator.inference.verdict_mode": "forced"}) == {"win_rate"}
    assert recomputed({"evaluation.num_prompts": 3}) == {"eval_prompts", "eval_answers", "reference_answers",
                                                         "win_rate"}


def test_deployment_settings_recompute_nothing():
    assert recomputed({"tracking": {"uri": "http://mlflow:5000"}, "health": {"action": "warn"},
                       "inference.max_concurrency": 64, "orchestration": {"shard_deployment": "a/b"},
                       "evaluation.evaluator.inference.max_concurrency": 64,
                       "evaluation.evaluator.allow_trained_model": True}) == set()


def test_verdict_mode_recomputes_judging_not_generation():
    assert "responses" not in recomputed({"inference.verdict_mode": "forced"})
    assert {"judgments", "meta_judgments"} <= recomputed({"inference.verdict_mode": "forced"})


def test_the_model_is_in_the_key_of_model_stages_only():
    config = CampaignConfig.from_dict(base())
    prompts = plan_job(config, "prompts", 1, {})
    prompts_result = [JobResult(prompts, TableRef("p", 4, "d"), {})]
    first = plan_job(config, "responses", 1, {"prompts": prompts_result}, ModelRef("a", "digest-a"), 0)
    moved = plan_job(config, "responses", 1, {"prompts": prompts_result}, ModelRef("b", "digest-a"), 0)
    other = plan_job(config, "responses", 1, {"prompts": prompts_result}, ModelRef("a", "digest-b"), 0)
    assert first.cache_key == moved.cache_key != other.cache_key
    with pytest.raises(ValueError, match="responses: inputs"):
        plan_job(config, "responses", 1, {}, ModelRef("a", "digest-a"), 0)
    with pytest.raises(ValueError, match="runs the model"):
        plan_job(config, "responses", 1, {"prompts": prompts_result}, None, 0)


def test_settings_that_cannot_be_hashed_are_refused():
    with pytest.raises(TypeError, match="cannot be hashed"):
        settings_digest({"engine": types.SimpleNamespace(x=1)})
    assert STAGE["checkpoint"].writes_model and not STAGE["judgments"].writes_model


def seed_jobs(config: CampaignConfig) -> tuple[Job, Job]:
    """The seed's two jobs (sft_data, then sft on the base model) as the seed flow plans them."""
    examples = plan_job(config, "sft_data", 0, {})
    trained = plan_job(config, "sft", 0, {"sft_data": [JobResult(examples, TableRef(examples.key, 4, "d"), {})]},
                       ModelRef("m", "base-digest"))
    return examples, trained


def test_the_seed_is_keyed_by_its_inputs_and_filed_outside_every_campaign():
    meta_rewarding = CampaignConfig.from_dict(base())
    baseline = CampaignConfig.from_dict({**base(), "name": "baseline", "mode": "self_rewarding",
                                         "iterations": [dict(ITERATION, train_judge=False)] * 2})
    (examples, trained), (baseline_examples, baseline_trained) = seed_jobs(meta_rewarding), seed_jobs(baseline)
    assert (examples.key, trained.key) == (baseline_examples.key, baseline_trained.key)
    assert trained.key == f"{SEED_FOLDER}/sft/all-{trained.cache_key}" and trained.campaign == "c"
    assert (trained.former_key, baseline_trained.former_key) == (
        f"c/iter-0/sft/all-{trained.cache_key}", f"baseline/iter-0/sft/all-{trained.cache_key}")
    # The iterations' stages stay in their campaign's folder.
    assert plan_job(meta_rewarding, "prompts", 1, {}).key.startswith("c/iter-1/prompts/all-")
    assert plan_job(baseline, "prompts", 1, {}).key.startswith("baseline/iter-1/prompts/all-")
    # Another SFT setting, base model or seed is another seed.
    other_settings = CampaignConfig.from_dict({**base(), "sft": {"path": str(SFT_FILE), "learning_rate": 1e-7}})
    other_seed = CampaignConfig.from_dict({**base(), "seed": 1})
    assert len({seed_jobs(config)[1].key for config in (meta_rewarding, other_settings, other_seed)}) == 3
    assert plan_job(meta_rewarding, "sft", 0, {"sft_data": [JobResult(examples, TableRef(examples.key, 4, "d"), {})]},
                    ModelRef("m", "other-base")).key != trained.key


def test_a_seed_kept_in_its_campaign_before_seeds_were_shared_is_found_there(tmp_path):
    config = CampaignConfig.from_dict({**base(), "artifact_root": str(tmp_path)})
    job = plan_job(config, "sft_data", 0, {})
    store = open_store(str(tmp_path))
    assert stored(store, job) == (None, None)
    before_sharing = dataclasses.replace(job, key=job.former_key, former_key=None)
    complete(store, before_sharing, pl.DataFrame({"x": [1]}), StageStats("sft_data", rows=1))
    result, why_not = stored(store, job)
    assert why_not is None and result.cached and result.job.key == job.former_key and result.computed_by == "c"
    # A seed at the shared key is the one used, by this campaign and by another, whose log says whose it is.
    complete(store, job, pl.DataFrame({"x": [2]}), StageStats("sft_data", rows=1))
    assert stored(store, job)[0].job.key == job.key and "reused" not in job_line(stored(store, job)[0])
    baseline = CampaignConfig.from_dict({**base(), "name": "baseline", "artifact_root": str(tmp_path)})
    reused = stored(store, plan_job(baseline, "sft_data", 0, {}))[0]
    assert (reused.job.key, reused.computed_by) == (job.key, "c") and "reused from campaign c" in job_line(reused)
    # An iteration stage has no former key: nothing is looked for elsewhere.
    assert plan_job(config, "prompts", 1, {}).former_key is None
