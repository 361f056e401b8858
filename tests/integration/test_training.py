"""DPO and the seed's SFT with TRL on the tiny model: the loss falls, training stops at the kept epoch with the full
run's weights of that epoch, the model reloads and generates, LoRA is merged, over-long pairs are dropped and counted,
and an empty preference set stops or carries M_t forward."""

from __future__ import annotations

import json

import polars as pl
import pytest

from metareward.artifacts.tables import DPO_DATASET
from metareward.config.campaign import DPOConfig, SFTConfig
from metareward.inference.base import GenerationRequest
from metareward.inference.transformers_backend import TransformersBackend
from metareward.pipeline.input_files import load_sft_examples
from metareward.training.logs import SFT_LOG, training_log_table
from metareward.training.models import compute_model_digest, model_digest
from metareward.training.trainer import EmptyPreferenceSetError, EmptyTrainingSetError, train_dpo, train_sft
from tests.conftest import REPO
from tests.integration.campaigns import cli_environment, run_cli, write_config

pytestmark = pytest.mark.slow


def dataset(n: int = 16, prompt_words: int = 3) -> pl.DataFrame:
    rows = [
        {"prompt_id": str(i), "prompt": [{"role": "user", "content": f"Question {i}? " + "why " * prompt_words}],
         "chosen": [{"role": "assistant", "content": "A clear, short answer."}],
         "rejected": [{"role": "assistant", "content": "no no no no no no"}],
         "kind": "actor", "iteration": 1, "model_id": "m"}
        for i in range(n)
    ]
    return pl.DataFrame(rows, schema=DPO_DATASET)


FAST = dict(global_batch_size=8, per_device_batch_size=4, learning_rate=1e-3, max_length=256)


def full_run_epoch_weights(model_path, data: pl.DataFrame, settings: DPOConfig, folder, epoch: int) -> dict:
    """What DPO did before it stopped at the kept epoch: all num_epochs trained, a checkpoint saved every
    epoch; the state dict of epoch `epoch`'s checkpoint."""
    import dataclasses

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOTrainer

    from metareward.training.process import dpo_arguments

    data.select("prompt", "chosen", "rejected").write_parquet(folder / "pairs.parquet")
    arguments = dataclasses.replace(dpo_arguments(settings, folder / "runs", 0, torch.float32, on_gpu=False),
                                    save_strategy="epoch", save_only_model=True, save_total_limit=None)
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32), args=arguments,
                         train_dataset=Dataset.from_parquet(str(folder / "pairs.parquet")),
                         processing_class=AutoTokenizer.from_pretrained(model_path))
    trainer.train()
    steps_per_epoch = trainer.state.global_step // settings.num_epochs
    kept = folder / "runs" / f"checkpoint-{steps_per_epoch * epoch}"
    return AutoModelForCausalLM.from_pretrained(kept, dtype=torch.float32).state_dict()


def test_dpo_stops_at_the_kept_epoch_with_the_weights_of_the_full_run(tmp_path, tiny_model):
    import torch
    from transformers import AutoModelForCausalLM

    settings = DPOConfig(num_epochs=3, checkpoint_epoch=2, **FAST)
    result = train_dpo(tiny_model, dataset(), settings, tmp_path / "stopped")
    losses = [entry["loss"] for entry in result.log_history if "loss" in entry]
    assert losses[-1] < losses[0] - 0.1
    assert result.summary["rewards_accuracies_last"] > 0.5
    assert result.model_id == (result.checkpoint / "model_id.txt").read_text().strip()
    assert result.model_id == compute_model_digest(result.checkpoint) != model_digest(tiny_model)
    # Two of three epochs trained, the learning rate still following the 3-epoch cosine, nothing else saved.
    assert max(e["epoch"] for e in result.log_history if "loss" in e) == 2
    assert (result.summary["epochs_trained"], result.summary["epochs_scheduled"]) == (2, 3)
    # The kept policy evaluated on its own pairs: below ln 2 (the reference's loss), mostly preferring chosen.
    assert result.summary["loss_after"] < 0.6931 - 0.1 and result.summary["rewards_accuracies_after"] > 0.5
    assert result.summary["rewards_margins_after"] > 0
    rates = [e["learning_rate"] for e in result.log_history if "loss" in e]
    assert rates[-1] > 0.2 * FAST["learning_rate"]  # a 2-epoch schedule would have decayed to ~0 here
    assert not list((tmp_path / "stopped").rglob("checkpoint-*"))

    expected = full_run_epoch_weights(tiny_model, dataset(), settings, tmp_path, epoch=2)
    stopped = AutoModelForCausalLM.from_pretrained(result.checkpoint, dtype=torch.float32).state_dict()
    assert stopped.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(stopped[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    initial = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).state_dict()
    assert any(not torch.equal(initial[name], tensor) for name, tensor in expected.items())

    table = training_log_table(result.log_history)
    assert table.height == len(losses) and table["loss"].to_list() == losses
    backend = TransformersBackend(result.checkpoint, dtype="float32")
    try:
        output = backend.generate([GenerationRequest(({"role": "user", "content": "Hi"},), n=1, max_tokens=5)])
        assert output[0].completions[0].n_tokens >= 1
    finally:
        backend.close()


def test_a_bf16_training_in_one_process_steps_float32_master_weights(tmp_path, tiny_model):
    """At the paper's learning rate (5e-6) bf16 weights would round most updates away (4 pure-bf16 steps moved 7.8 %
    of the tiny model's weights). The steps run on float32 masters, and the kept model is saved in bf16: on CPU, where
    no autocast applies, exactly the float32 training's weights rounded once."""
    import torch
    from safetensors.torch import load_file

    settings = DPOConfig(num_epochs=1, global_batch_size=4, per_device_batch_size=4, learning_rate=5e-6,
                         max_length=256)
    half = train_dpo(tiny_model, dataset(), settings, tmp_path / "bf16", dtype="bfloat16")
    full = train_dpo(tiny_model, dataset(), settings, tmp_path / "fp32", dtype="float32")
    kept, reference = (load_file(str(r.checkpoint / "model.safetensors")) for r in (half, full))
    assert json.loads((half.checkpoint / "config.json").read_text())["dtype"] == "bfloat16"
    assert all(kept[name].dtype == torch.bfloat16 and torch.equal(kept[name], reference[name].to(torch.bfloat16))
               for name in reference)
    base = load_file(str(tiny_model / "model.safetensors"))
    moved = sum(int((kept[n] != base[n].to(torch.bfloat16)).sum()) for n in base)
    assert moved > 0.2 * sum(t.numel() for t in base.values())  # pure bf16 steps moved 0.078 of them


def test_seed_sft_learns_the_judgments_and_stops_at_the_kept_epoch(tmp_path, tiny_model):
    examples = load_sft_examples(REPO / "deployments" / "sft" / "eft-example.jsonl")
    settings = SFTConfig(path="unused", num_epochs=3, checkpoint_epoch=2, **{**FAST, "max_length": 2048}).training()
    result = train_sft(tiny_model, examples, settings, tmp_path / "sft")
    losses = [entry["loss"] for entry in result.log_history if "loss" in entry]
    assert losses[-1] < losses[0] - 0.1
    assert (result.summary["epochs_trained"], result.summary["epochs_scheduled"]) == (2, 3)
    assert result.summary["loss_after"] < losses[0] and "mean_token_accuracy_after" in result.summary
    assert result.pairs_trained == examples.height and result.pairs_too_long == 0
    assert result.model_id == compute_model_digest(result.checkpoint) != model_digest(tiny_model)
    assert not list((tmp_path / "sft").rglob("checkpoint-*"))
    table = training_log_table(result.log_history, "sft")
    assert table.columns == list(SFT_LOG) and table["loss"].to_list() == losses
    # Examples longer than max_length are dropped and counted; none left is an error that says so.
    with pytest.raises(EmptyTrainingSetError, match="no SFT example to train on"):
        train_sft(tiny_model, examples, settings.model_copy(update={"max_length": 16}), tmp_path / "short")


def test_lora_is_merged_into_a_plain_checkpoint(tmp_path, tiny_model):
    result = train_dpo(tiny_model, dataset(), DPOConfig(num_epochs=1, lora_rank=8, **FAST), tmp_path)
    files = {p.name for p in result.checkpoint.iterdir()}
    assert "adapter_config.json" not in files and "model.safetensors" in files
    config = json.loads((result.checkpoint / "config.json").read_text())
    assert "quantization_config" not in config
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(result.checkpoint)
    assert not any("lora" in name for name, _ in model.named_parameters())
    assert result.model_id != model_digest(tiny_model)


def test_the_same_training_in_another_folder_gives_the_same_model_id(tmp_path, tiny_model):
    settings = DPOConfig(num_epochs=1, lora_rank=8, **FAST)
    first = train_dpo(tiny_model, dataset(), settings, tmp_path / "a")
    second = train_dpo(tiny_model, dataset(), settings, tmp_path / "elsewhere" / "b")
    assert first.model_id == second.model_id  # no trainer pickle with the output path beside the weights
    assert "training_args.bin" not in {path.name for path in first.checkpoint.iterdir()}


def test_overlong_pairs_are_dropped_and_counted(tmp_path, tiny_model):
    mixed = pl.concat([dataset(8), dataset(8, prompt_words=400).with_columns(pl.col("prompt_id") + "-long")])
    result = train_dpo(tiny_model, mixed, DPOConfig(num_epochs=1, **FAST), tmp_path)
    assert (result.pairs_trained, result.pairs_too_long) == (8, 8)
    with pytest.raises(EmptyPreferenceSetError, match="8 dropped as longer than max_length=256"):
        train_dpo(tiny_model, dataset(8, prompt_words=400), DPOConfig(num_epochs=1, **FAST), tmp_path / "none")


def test_empty_preference_set_stops_the_campaign_or_carries_the_model_forward(tmp_path, tiny_model):
    # Greedy everywhere: a prompt's K responses are identical (one left after de-duplication → no actor
    # pair) and so are its judgments, whose meta-judge battles are then symmetric (equal Elo → no judge pair).
    greedy = {role: {"temperature": 0.0, "max_tokens": 8}
              for role in ("actor_sampling", "judge_sampling", "meta_judge_sampling")}
    # Greedy meta-judging of identical judgments always picks one position: not what this test is about.
    root = tmp_path / "artifacts"
    env = cli_environment(tmp_path / "prefect")
    config = write_config(tmp_path, tiny_model, str(root), on_empty_preferences="stop", iterations=2,
                          iteration_overrides=greedy, health={"max_position_a_share": None})
    stopped = run_cli(["run", str(config)], env)
    assert stopped.returncode != 0
    assert "iteration 1: no preference pair to train on" in stopped.stdout + stopped.stderr
    assert "set on_empty_preferences: keep_model" in stopped.stdout + stopped.stderr
    assert not list(root.glob("tiny/iter-1/checkpoint/*.json"))

    # Switched to keep_model, the same campaign goes on: the checkpoint's key changed, M_1 is carried to
    # iteration 2, and the tables before it come from the store.
    config = write_config(tmp_path, tiny_model, str(root), on_empty_preferences="keep_model", iterations=2,
                          iteration_overrides=greedy, health={"max_position_a_share": None})
    kept = run_cli(["run", str(config)], env)
    assert kept.returncode == 0, kept.stderr[-3000:]
    assert (kept.stdout + kept.stderr).count("Finished in state Cached") >= 8
    responses = pl.concat([pl.read_parquet(p) for p in (root / "tiny" / "iter-2/responses").glob("*.parquet")])
    assert set(responses["model_id"]) == {model_digest(tiny_model)}


def test_multi_process_training_under_accelerate_launch(tmp_path, tiny_model):
    settings = DPOConfig(num_epochs=1, num_processes=2, accelerate_config="deployments/accelerate/ddp.yaml",
                         **{**FAST, "per_device_batch_size": 2})
    assert settings.gradient_accumulation_steps == 2  # 2 per device × 2 accumulation × 2 processes = 8
    result = train_dpo(tiny_model, dataset(), settings, tmp_path)
    assert result.pairs_trained == 16 and (result.checkpoint / "model_id.txt").is_file()
    assert result.model_id == compute_model_digest(result.checkpoint) != model_digest(tiny_model)
    assert any("loss" in entry for entry in result.log_history)
    # Two ranks really trained: 16 pairs, 2 per device, 2 accumulation steps, 2 processes → 2 steps.
    assert max(entry.get("step", 0) for entry in result.log_history) == 2


def test_shipped_accelerate_configs_parse():
    from accelerate.commands.config.config_args import load_config_from_file

    for name, kind in [("fsdp", "FSDP"), ("deepspeed-zero3", "DEEPSPEED"), ("ddp", "MULTI_GPU")]:
        config = load_config_from_file(f"deployments/accelerate/{name}.yaml")
        assert str(config.distributed_type).endswith(kind)
