"""The stage registry: every setting of the config is in some stage's key or declared unable to change a table, a
runner takes exactly its stage's settings, and a changed setting recomputes its stage and what follows, nothing else."""

from __future__ import annotations

import inspect
import json
import types
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from metareward.config import CampaignConfig
from metareward.context import ModelRef
from metareward.jobs import JobResult, plan_job, settings_digest, shard_inputs, sharding
from metareward.stages import NOT_IN_ANY_TABLE, STAGE, STAGES, stage
from metareward.store import TableRef
from tests.conftest import PROMPT_FILE

ITERATION = {"num_prompts": 4, "num_responses": 3, "num_judgments": 3}


def base(backend: str = "transformers") -> dict:
    """A two-iteration campaign as the raw mapping a user writes (train_judge left to `mode`)."""
    inference = {"backend": backend}
    if backend == "openai":
        inference["base_url"] = "http://127.0.0.1:9"
    return {"name": "c", "model": {"path": "m"}, "prompts": {"path": str(PROMPT_FILE)}, "inference": inference,
            "shard_size": 2, "iterations": [dict(ITERATION), dict(ITERATION)]}


def settings_by_stage(config: CampaignConfig) -> dict[tuple[int, str], str]:
    return {(t, entry.name): settings_digest(entry.settings(config, t))
            for t in range(1, len(config.iterations) + 1) for entry in STAGES}


# Values that the generic rule below would make invalid.
SPECIAL = {"iterations[].dpo.global_batch_size": 64, "iterations[].dpo.checkpoint_epoch": 4, "iterations[].dpo.per_device_batch_size": 8,
           "inference.backend": "vllm", "mode": "self_rewarding"}


def leaf_fields(model: type[BaseModel], prefix: str = "") -> list[tuple[str, object]]:
    """(path, annotation) of every setting, "iterations[].dpo.beta" for a field of every iteration."""
    found = []
    for name, field in model.model_fields.items():
        annotation = field.annotation
        args = typing.get_args(annotation)
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            found += leaf_fields(annotation, f"{prefix}{name}.")
        elif typing.get_origin(annotation) is list and args and issubclass(args[0], BaseModel):
            found += leaf_fields(args[0], f"{prefix}{name}[].")
        else:
            found.append((f"{prefix}{name}", annotation))
    return found


def alternative(path: str, annotation, value, tmp_path: Path):
    """Another valid value of the setting."""
    if path in SPECIAL:
        return SPECIAL[path]
    if path == "prompts.path":
        other = tmp_path / "other.jsonl"
        other.write_text('{"prompt": "a prompt of another file"}\n')
        return str(other)
    if typing.get_origin(annotation) is typing.Literal:
        return next(choice for choice in typing.get_args(annotation) if choice != value)
    if typing.get_origin(annotation) is list:
        return ["--max-num-seqs", "8"]
    kinds = [kind for kind in typing.get_args(annotation) if kind is not type(None)] or [annotation]
    kind = typing.get_origin(kinds[0]) or kinds[0]
    if typing.get_origin(kinds[0]) is typing.Literal:
        return next(choice for choice in typing.get_args(kinds[0]) if choice != value)
    if kind is bool:
        return not value
    if kind is int:
        return 64 if value is None else value + 1
    if kind is float:
        return 0.5 if value is None else value + 0.05
    if kind is str:
        return "http://127.0.0.1:9/x" if value is None else value + "x"
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
            value = alternative(path, annotation, current(config, path), tmp_path)
            if path == "inference.backend" and value == backend:
                value = "transformers"
            other = CampaignConfig.from_dict(perturbed(raw, path, value))
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
        assert keywords == set(entry.settings(config, 1)), entry.name


def test_registry_is_in_figure_1_order_and_consistent():
    names = [entry.name for entry in STAGES]
    assert names == ["prompts", "responses", "judgments", "actor_pairs", "meta_judgments", "judgment_elo",
                     "judge_pairs", "dpo_dataset", "checkpoint"]
    for index, entry in enumerate(STAGES):
        assert set(entry.inputs) <= set(names[:index]), f"{entry.name} reads a later stage"
        assert set(entry.optional_inputs) <= set(entry.inputs)
        assert set(entry.report_columns) <= set(entry.schema), entry.name
        assert entry.dataset_context in (None, "generation", "evaluation", "training")
        if entry.sharded:
            assert "prompts" in entry.inputs and entry.uses_model, entry.name
    with pytest.raises(KeyError, match="no stage 'judgment'; the stages are"):
        stage("judgment")


def planned_keys(config: CampaignConfig, iteration: int = 1) -> dict[str, list[str]]:
    """Every job key of an iteration, each table's digest standing for its key: a job whose key changes
    writes a different table, as recomputing it would."""
    model = ModelRef("m", "model-digest")
    results: dict[str, list[JobResult]] = {}
    for entry in STAGES:
        given = {name: results[name] for name in entry.inputs if name in results}
        owner = model if entry.uses_model else None
        if entry.sharded:
            jobs = [plan_job(config, entry.name, iteration, shard_inputs(given, index), owner, index)
                    for index in range(sharding(config, given))]
        else:
            jobs = [plan_job(config, entry.name, iteration, given, owner)]
        results[entry.name] = [JobResult(job, TableRef(job.key, 4, job.cache_key), {}) for job in jobs]
    return {name: [result.job.cache_key for result in shard] for name, shard in results.items()}


def recomputed(change: dict) -> set[str]:
    raw = base()
    for path, value in change.items():
        raw = perturbed(raw, path, value)
    before, after = planned_keys(CampaignConfig.from_dict(base())), planned_keys(CampaignConfig.from_dict(raw))
    return {name for name in before if before[name] != after[name]}


def test_a_changed_judge_sampling_setting_recomputes_judgments_and_what_follows_not_responses():
    assert recomputed({"iterations[].judge_sampling": {"temperature": 0.7}}) == {
        "judgments", "actor_pairs", "meta_judgments", "judgment_elo", "judge_pairs", "dpo_dataset", "checkpoint"}


def test_a_changed_rho_recomputes_actor_pairs_and_what_follows_only():
    assert recomputed({"iterations[].rho": 0.32}) == {"actor_pairs", "dpo_dataset", "checkpoint"}


def test_on_empty_preferences_is_in_the_checkpoint_key():
    assert recomputed({"on_empty_preferences": "keep_model"}) == {"checkpoint"}


def test_deployment_settings_recompute_nothing():
    assert recomputed({"tracking": {"uri": "http://mlflow:5000"}, "health": {"action": "warn"},
                       "inference.max_concurrency": 64, "orchestration": {"shard_deployment": "a/b"}}) == set()


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
