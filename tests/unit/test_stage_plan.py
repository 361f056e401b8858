"""Which stages a campaign runs is decided once, by the registry (stages.why_not_run): the iteration and seed flows run
exactly the stages `metareward stages CONFIG --iteration T` lists as run, in every mode — meta-rewarding and
self-rewarding, with and without an sft section, with and without an evaluation section, each reference — and each
stage runs the model of its role. The flows run here with their stage tasks replaced by a recorder (no Prefect
API, no model): what is tested is the flows' and the registry's decisions, not the stages' work."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import pytest

import flows.iteration as iteration_module
import tasks.stages as stage_tasks
from cli import main
from metareward.config.campaign import CampaignConfig
from metareward.pipeline.context import ModelRef
from metareward.pipeline.health_gate import CHECKS_PASSED, decided
from metareward.pipeline.stages import SEED_STAGES, STAGE

REPO = Path(__file__).resolve().parents[2]
EVALUATION = {"prompts": {"path": "deployments/prompts/heldout-20.jsonl"}, "num_prompts": 4,
              "evaluator": {"model": {"path": "evaluator-weights"}}}


def campaign(mode: str, sft: bool, evaluation: str | None) -> CampaignConfig:
    data = CampaignConfig.from_yaml(REPO / "deployments/configs/demo.yaml").model_dump(mode="json")
    data.update(name=f"plan-{mode}", mode=mode, evaluation=None, sft=None)
    if mode == "self_rewarding":
        for settings in data["iterations"]:
            settings["train_judge"] = False
    if sft:
        data["sft"] = {"path": "deployments/sft/eft-example.jsonl"}
    if evaluation:
        data["evaluation"] = {**EVALUATION, "reference": evaluation}
        if evaluation == "outputs":
            data["evaluation"]["reference_outputs"] = "deployments/prompts/heldout-20.jsonl"
    return CampaignConfig.model_validate(data)


MODES = [pytest.param(mode, sft, evaluation, id=f"{mode}-{'sft' if sft else 'no_sft'}-{evaluation or 'no_eval'}")
         for mode in ("meta_rewarding", "self_rewarding") for sft in (False, True)
         for evaluation in (None, "previous", "seed", "outputs")]


class RoleModels:
    """Stands in for model_roles.IterationModels (which reads digests of real weights): a model per role, named by
    the role, and M_{t+1} once the training stage has written it."""

    def __init__(self, config, iteration, policy):
        self.policy, self.trained = policy, None

    def trained_by(self, stats):
        self.trained = ModelRef(stats["model_uri"], stats["model_id"])
        return self.trained

    def of(self, role):
        if role == "trained":
            assert self.trained is not None, "the trained model was asked for before training"
            return self.trained
        return None if role is None else self.policy if role in ("policy", "base") else ModelRef(role, role)


@pytest.fixture
def recorded(monkeypatch, tmp_path):
    """Run the flows' bodies with every stage task recorded as (iteration, stage, model uri) instead of run."""
    calls: list[tuple[int, str, str | None]] = []

    def stage_task(**options):
        def run(config, name, iteration, shard, model, upstream, wait_for=None):
            calls.append((iteration, name, model.uri if model else None))
            missing = set(STAGE[name].required_inputs) - set(upstream)
            assert not missing, f"{name} ran without {missing}"
            return SimpleNamespace(stats={"rows": 1, "model_uri": f"trained-by-{name}", "model_id": "m"}, cached=True,
                                   table=SimpleNamespace(rows=1), job=None)
        return run

    monkeypatch.setattr(stage_tasks, "run_stage", SimpleNamespace(with_options=stage_task))
    monkeypatch.setattr(stage_tasks, "write_stage_manifest", lambda *args, **kwargs: None)
    monkeypatch.setattr(stage_tasks, "sharding", lambda config, given: 1)
    monkeypatch.setattr(stage_tasks, "get_run_logger", lambda: logging.getLogger("test"))
    monkeypatch.setattr(stage_tasks, "IterationModels", RoleModels)
    monkeypatch.setattr(iteration_module, "check_health", lambda *args, **kwargs: [])
    monkeypatch.setattr(iteration_module, "publish_audit", lambda *args, **kwargs: None)
    monkeypatch.setattr(iteration_module, "gated_data", lambda **tables: {})
    monkeypatch.setattr(iteration_module, "health_gate", lambda config, iteration, *args: decided(
        "continue", iteration, CHECKS_PASSED, {}, []))

    @contextmanager
    def iteration_run(config, iteration, model_path):
        stages = stage_tasks.IterationStages(config, iteration, ModelRef(model_path, "policy"))
        yield stages

    monkeypatch.setattr(iteration_module, "iteration_run", iteration_run)
    monkeypatch.setattr(stage_tasks, "result_storage", lambda config: tmp_path)
    return calls


def listed(config: CampaignConfig, iteration: int, tmp_path: Path, capsys) -> list[str]:
    """The stages `metareward stages CONFIG --iteration T` lists as run, in its order (the seed's for T = 0)."""
    path = tmp_path / "campaign.yaml"
    path.write_text(config.to_yaml())
    assert main(["stages", str(path), "--iteration", str(max(iteration, 1))]) == 0
    run: list[str] = []
    for line in capsys.readouterr().out.splitlines():
        if "<-" in line and not line.startswith(" "):
            run.append(line.split()[0])
        elif line.strip().startswith("not run:"):
            run.pop()
    seed = {entry.name for entry in SEED_STAGES}
    return [name for name in run if (name in seed) == (iteration == 0)]


@pytest.mark.parametrize(("mode", "sft", "evaluation"), MODES)
def test_a_campaign_runs_exactly_the_stages_the_cli_lists(mode, sft, evaluation, recorded, tmp_path, capsys):
    config = campaign(mode, sft, evaluation)
    if config.sft:
        iteration_module.seed_flow.fn(config)
    for iteration in range(1, len(config.iterations) + 1):
        iteration_module.iteration_flow.fn(config, iteration, f"M{iteration}")
    ran = {iteration: [name for t, name, _ in recorded if t == iteration] for iteration in range(3)}
    for iteration in range(3):
        assert ran[iteration] == listed(config, iteration, tmp_path, capsys), f"iteration {iteration}"
    assert bool(ran[0]) == sft
    judge_training = {"meta_judgments", "judgment_elo", "judge_pairs"}
    assert bool(judge_training & set(ran[1])) == (mode == "meta_rewarding")
    assert not judge_training & set(ran[2])  # the demo trains the judge in iteration 1 only
    assert ("reference_answers" in ran[1]) == (evaluation in ("previous", "seed"))
    assert ("win_rate" in ran[1]) == (evaluation is not None)


@pytest.mark.parametrize("evaluation", ["previous", "seed"])
def test_each_stage_runs_the_model_of_its_role(evaluation, recorded):
    config = campaign("meta_rewarding", False, evaluation)
    iteration_module.iteration_flow.fn(config, 1, "M1")
    models = {name: model for _, name, model in recorded}
    assert {models[name] for name in ("responses", "judgments", "meta_judgments", "checkpoint")} == {"M1"}
    assert models["eval_answers"] == "trained-by-checkpoint"
    assert models["reference_answers"] == "reference"
    assert models["win_rate"] == "evaluator"
    assert models["actor_pairs"] is None and models["judgment_elo"] is None
