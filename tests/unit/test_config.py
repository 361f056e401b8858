"""CampaignConfig: paper defaults, the shipped paper recipe, YAML round trip, and errors that name the fix."""

from pathlib import Path

import pytest

from metareward.config.campaign import CampaignConfig, ConfigError, IterationConfig
from metareward.config.schedule import PaperScheduleWarning

REPO = Path(__file__).resolve().parents[2]
MINIMAL = {"name": "c1", "model": {"path": "m"}, "prompts": {"path": "p.jsonl"}, "iterations": [{}]}


def test_defaults_are_the_papers():
    config = CampaignConfig.from_dict(MINIMAL)
    iteration = config.iterations[0]
    assert config.mode == "meta_rewarding"
    assert (iteration.num_responses, iteration.num_judgments, iteration.num_prompts) == (7, 11, 5000)
    assert (iteration.actor_sampling.temperature, iteration.actor_sampling.top_p) == (0.8, 0.95)
    assert iteration.rho == 0.0
    assert iteration.train_judge is True
    dpo = iteration.dpo
    assert (dpo.beta, dpo.learning_rate, dpo.lr_scheduler_type, dpo.global_batch_size, dpo.num_epochs) == (
        0.1, 5e-6, "cosine", 32, 10,
    )
    assert dpo.gradient_accumulation_steps == 8


def test_paper_recipe_file_encodes_a3():
    config = CampaignConfig.from_yaml(REPO / "deployments/configs/paper-llama3-8b.yaml")
    iterations = config.iterations
    assert [it.rho for it in iterations] == [0.0, 0.32, 0.32, 0.4]
    assert [it.train_judge for it in iterations] == [True, True, False, False]
    assert [it.max_chosen_judgment_chars for it in iterations[:2]] == [1100, 1000]
    assert [it.max_chosen_response_chars for it in iterations] == [2500, None, None, None]
    assert [it.dpo.checkpoint_epoch for it in iterations] == [6, 4, 2, 2]
    assert all((it.num_prompts, it.num_responses, it.num_judgments) == (5000, 7, 11) for it in iterations)


def test_the_one_gpu_recipe_trains_the_papers_seed_with_lora():
    one = CampaignConfig.from_yaml(REPO / "deployments/configs/paper-llama3-8b-1gpu.yaml").sft
    eight = CampaignConfig.from_yaml(REPO / "deployments/configs/paper-llama3-8b.yaml").sft
    # The same SFT on EFT (A.3: 10 epochs, epoch 5 kept, global batch 32, cosine) with LoRA r = 64 on one GPU, at
    # 10× A.3's learning rate as its DPO takes 10× A.3's (5e-5 for 5e-6).
    assert (one.path, one.num_epochs, one.kept_epoch, one.global_batch_size, one.lr_scheduler_type) == (
        eight.path, eight.num_epochs, eight.kept_epoch, eight.global_batch_size, eight.lr_scheduler_type)
    assert (one.lora_rank, one.num_processes, eight.lora_rank) == (64, 1, None)
    assert one.learning_rate == pytest.approx(10 * eight.learning_rate) == pytest.approx(5e-7)


def test_yaml_round_trip(tmp_path):
    config = CampaignConfig.from_yaml(REPO / "deployments/configs/paper-llama3-8b.yaml")
    path = tmp_path / "out.yaml"
    path.write_text(config.to_yaml())
    assert CampaignConfig.from_yaml(path) == config


def test_self_rewarding_mode_trains_no_judge():
    config = CampaignConfig.from_dict({**MINIMAL, "mode": "self_rewarding"})
    assert config.iterations[0].train_judge is False
    with pytest.raises(ConfigError, match=r"iterations\[0\]\.train_judge.*set train_judge: false"):
        CampaignConfig.from_dict({**MINIMAL, "mode": "self_rewarding", "iterations": [{"train_judge": True}]})


@pytest.mark.parametrize(
    ("override", "field", "hint"),
    [
        ({"rho": 0.5}, r"iterations\[0\]\.rho", r"\[0, 0\.5\)"),
        ({"rho": -0.1}, r"iterations\[0\]\.rho", r"\[0, 0\.5\)"),
        ({"num_responses": 1}, r"iterations\[0\]\.num_responses", "greater than or equal to 2"),
        ({"num_judgments": 1}, r"iterations\[0\]\.num_judgments", "greater than or equal to 2"),
        ({"dpo": {"per_device_batch_size": 5}}, r"iterations\[0\]\.dpo", "not a multiple"),
        ({"dpo": {"checkpoint_epoch": 11}}, r"iterations\[0\]\.dpo", "keep an epoch that is trained"),
        ({"actor_sampling": {"top_p": 0}}, r"iterations\[0\]\.actor_sampling\.top_p", "greater than 0"),
        ({"temprature": 0.7}, r"iterations\[0\]\.temprature", "unknown setting"),
    ],
)
def test_invalid_settings_name_the_field_and_the_fix(override, field, hint):
    with pytest.raises(ConfigError) as error:
        CampaignConfig.from_dict({**MINIMAL, "iterations": [override]}, source="camp.yaml")
    message = str(error.value)
    assert message.startswith("camp.yaml:")
    assert __import__("re").search(field + ".*" + hint, message), message


def test_file_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        CampaignConfig.from_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        CampaignConfig.from_yaml(bad)
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        CampaignConfig.from_yaml(listing)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"name: \xff\xfe")
    with pytest.raises(ConfigError, match="not UTF-8"):
        CampaignConfig.from_yaml(binary)


def test_missing_required_and_bad_name():
    with pytest.raises(ConfigError, match="model: Field required"):
        CampaignConfig.from_dict({"name": "c", "prompts": {"path": "p"}, "iterations": [{}]})
    with pytest.raises(ConfigError, match="name: String should match pattern"):
        CampaignConfig.from_dict({**MINIMAL, "name": "bad name/with slash"})
    with pytest.raises(ConfigError, match="iterations: List should have at least 1 item"):
        CampaignConfig.from_dict({**MINIMAL, "iterations": []})


def test_assignment_is_validated_too():
    iteration = IterationConfig()
    with pytest.raises(ValueError, match="0.5"):
        iteration.rho = 0.7


def test_sft_section_defaults_are_a3():
    config = CampaignConfig.from_dict({**MINIMAL, "sft": {"path": "eft.jsonl"}})
    sft = config.sft
    assert (sft.num_epochs, sft.learning_rate, sft.global_batch_size, sft.lr_scheduler_type, sft.checkpoint_epoch) == (
        10, 5e-8, 32, "cosine", 5)
    assert sft.kept_epoch == 5 and "path" not in sft.training().model_dump()
    assert CampaignConfig.from_dict(MINIMAL).sft is None
    with pytest.raises(ConfigError, match=r"sft\.path: Field required"):
        CampaignConfig.from_dict({**MINIMAL, "sft": {}})
    with pytest.raises(ConfigError, match=r"sft.*keep an epoch that is trained"):
        CampaignConfig.from_dict({**MINIMAL, "sft": {"path": "eft.jsonl", "num_epochs": 3}})


def test_ablation_switch_defaults_are_the_papers_and_unknown_values_are_named():
    iteration = CampaignConfig.from_dict(MINIMAL).iterations[0]
    assert (iteration.positional_weights, iteration.battle_rule, iteration.meta_judge_sees_scores,
            iteration.meta_judged_responses) == (True, "weighted", True, "highest_variance")
    for field, value in (("battle_rule", "majority"), ("meta_judged_responses", "lowest_variance")):
        with pytest.raises(ConfigError, match=rf"iterations\[0\]\.{field}"):
            CampaignConfig.from_dict({**MINIMAL, "iterations": [{field: value}]})


EVALUATION = {"prompts": {"path": "heldout.jsonl"}, "evaluator": {"model": {"path": "judge"}}}


def test_evaluation_section_defaults_and_rules():
    evaluation = CampaignConfig.from_dict({**MINIMAL, "evaluation": EVALUATION}).evaluation
    assert (evaluation.reference, evaluation.bootstrap, evaluation.num_prompts) == ("previous", 1000, None)
    assert evaluation.evaluator.inference.verdict_mode == "forced" and not evaluation.evaluator.allow_trained_model
    endpoint = {"inference": {"backend": "openai", "base_url": "http://judge:8000/v1", "api_model": "llama-70b"}}
    assert CampaignConfig.from_dict({**MINIMAL, "evaluation": {**EVALUATION, "evaluator": endpoint}}).evaluation
    for evaluation, message in [
        ({**EVALUATION, "reference": "outputs"}, "set reference_outputs exactly when reference is outputs"),
        ({**EVALUATION, "reference_outputs": "gpt4.json"}, "set reference_outputs exactly when reference is outputs"),
        ({**EVALUATION, "bootstrap": 0}, r"evaluation\.bootstrap"),
        ({**EVALUATION, "evaluator": {}}, "the evaluator needs model"),
        ({**EVALUATION, "evaluator": {"inference": {"backend": "openai", "base_url": "http://judge:8000/v1"}}},
         "the evaluator needs model"),
        ({**EVALUATION, "reference": "best"}, r"evaluation\.reference"),
    ]:
        with pytest.raises(ConfigError, match=message):
            CampaignConfig.from_dict({**MINIMAL, "evaluation": evaluation})


SIZES_ONLY = {"num_prompts": 100, "num_responses": 4, "num_judgments": 5}


def test_a_config_that_sets_only_sizes_is_warned_with_each_setting_the_paper_schedules_otherwise():
    four = {**MINIMAL, "iterations": [dict(SIZES_ONLY) for _ in range(4)]}
    with pytest.warns(PaperScheduleWarning) as caught:
        CampaignConfig.from_dict(four)
    [warning] = caught
    header, *lines = str(warning.message).splitlines()
    assert header.startswith("campaign c1: settings left at a default that is not the paper's schedule (A.3)")
    assert [line.strip() for line in lines] == [
        "iterations[0].max_chosen_response_chars: none (the default); the paper: 2500",
        "iterations[0].max_chosen_judgment_chars: none (the default); the paper: 1100",
        "iterations[0].dpo.checkpoint_epoch: none (the default: epoch 10 of 10 kept); the paper: 6",
        "iterations[1].rho: 0.0 (the default); the paper: 0.32",
        "iterations[1].max_chosen_judgment_chars: none (the default); the paper: 1000",
        "iterations[1].dpo.checkpoint_epoch: none (the default: epoch 10 of 10 kept); the paper: 4",
        "iterations[2].train_judge: true (the default in mode meta_rewarding); the paper: false",
        "iterations[2].rho: 0.0 (the default); the paper: 0.32",
        "iterations[2].dpo.checkpoint_epoch: none (the default: epoch 10 of 10 kept); the paper: 2",
        "iterations[3].train_judge: true (the default in mode meta_rewarding); the paper: false",
        "iterations[3].rho: 0.0 (the default); the paper: 0.4",
        "iterations[3].dpo.checkpoint_epoch: none (the default: epoch 10 of 10 kept); the paper: 2",
    ]
    # The baseline's schedule (A.3, Self-Rewarding): ρ 0.1 in iteration 4, epochs 5, 1, 2, 2; no judge to train.
    with pytest.warns(PaperScheduleWarning) as caught:
        CampaignConfig.from_dict({**four, "mode": "self_rewarding"})
    assert [line.strip() for line in str(caught[0].message).splitlines()[1:]] == [
        "iterations[0].max_chosen_response_chars: none (the default); the paper: 2500",
        "iterations[0].dpo.checkpoint_epoch: none (the default: epoch 10 of 10 kept); the paper: 5",
        "iterations[1].dpo.checkpoint_epoch: none (the default: epoch 10 of 10 kept); the paper: 1",
        "iterations[2].dpo.checkpoint_epoch: none (the default: epoch 10 of 10 kept); the paper: 2",
        "iterations[3].rho: 0.0 (the default); the paper: 0.1",
        "iterations[3].dpo.checkpoint_epoch: none (the default: epoch 10 of 10 kept); the paper: 2",
    ]


def test_settings_a_config_sets_are_its_own_choice_and_the_shipped_configs_are_not_warned(recwarn):
    paper = [dict(SIZES_ONLY, rho=rho, train_judge=judge, max_chosen_response_chars=response,
                  max_chosen_judgment_chars=judgment, dpo={"checkpoint_epoch": epoch})
             for rho, judge, response, judgment, epoch in ((0.0, True, 2500, 1100, 6), (0.32, True, None, 1000, 4),
                                                          (0.32, False, None, None, 2), (0.4, False, None, None, 2))]
    CampaignConfig.from_dict({**MINIMAL, "iterations": paper})
    # Set explicitly, a value that is not the paper's is not a silent default: no warning.
    chosen = [dict(SIZES_ONLY, rho=0.0, train_judge=True, max_chosen_response_chars=None,
                   max_chosen_judgment_chars=None, dpo={"checkpoint_epoch": None}) for _ in range(4)]
    CampaignConfig.from_dict({**MINIMAL, "iterations": chosen})
    # A schedule of other than the paper's 10 epochs (the demo's 1) has no paper epoch to keep; a fifth iteration
    # has no paper value at all.
    short = [dict(item, dpo={"num_epochs": 1}) for item in paper] + [dict(SIZES_ONLY, train_judge=False)]
    CampaignConfig.from_dict({**MINIMAL, "iterations": short})
    for path in sorted((REPO / "deployments/configs").glob("*.yaml")):
        CampaignConfig.from_yaml(path)
    assert not [warning for warning in recwarn if warning.category is PaperScheduleWarning]
    # Settings written out in full (config show, a Prefect run's parameters) are all set: no warning either.
    with pytest.warns(PaperScheduleWarning):
        loose = CampaignConfig.from_dict({**MINIMAL, "iterations": [dict(SIZES_ONLY) for _ in range(4)]})
    recwarn.clear()
    CampaignConfig.from_dict(loose.model_dump())
    assert not [warning for warning in recwarn if warning.category is PaperScheduleWarning]
