"""Training with TRL — DPO of M_t into M_{t+1}, and the seed's SFT on judge data into M_1 — full or LoRA (merged),
stopped at the kept epoch of the full schedule, in one process or under `accelerate launch`."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from metareward.config.training import DPOConfig, TrainingConfig
from metareward.host.ports import free_port
from metareward.training.models import write_model_digest

TRAINING_METRICS = {
    "dpo": ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "learning_rate",
            "grad_norm", "epoch"),
    "sft": ("loss", "mean_token_accuracy", "learning_rate", "grad_norm", "epoch"),
}
"""What TRL logs every step of each kind of training, kept in the stage's table."""

AFTER_TRAINING = {"dpo": ("loss", "rewards/accuracies", "rewards/margins"), "sft": ("loss", "mean_token_accuracy")}
"""What the trained model scores on its own training set, kept as {name}_after in the stage's statistics."""


def log_schema(kind: str) -> pl.Schema:
    """A training stage's table: one row per logged step with TRL's metrics of that kind ("dpo", "sft")."""
    return pl.Schema({"step": pl.Int64, **{name.replace("/", "_"): pl.Float64 for name in TRAINING_METRICS[kind]}})


TRAINING_LOG = log_schema("dpo")
"""The checkpoint stage's table: one row per logged DPO step (TRL's loss, rewards/…, learning rate)."""
SFT_LOG = log_schema("sft")
"""The seed SFT stage's table: one row per logged SFT step (loss, token accuracy, learning rate)."""


def training_log_table(history: list[dict[str, Any]], kind: str = "dpo") -> pl.DataFrame:
    """TRL's log_history as a table with log_schema(kind) (the final summary entry left out)."""
    rows = [
        {"step": int(entry.get("step", index + 1)),
         **{name.replace("/", "_"): float(entry[name]) if name in entry else None for name in TRAINING_METRICS[kind]}}
        for index, entry in enumerate(history)
        if "loss" in entry
    ]
    return pl.DataFrame(rows, schema=log_schema(kind))


class EmptyTrainingSetError(ValueError):
    """Nothing left to train on."""


class EmptyPreferenceSetError(EmptyTrainingSetError):
    """No usable preference pair: nothing to train on (e.g. every prompt's scores tied)."""


@dataclass
class TrainingResult:
    """The new checkpoint folder (complete: model_id.txt written last), its digest, TRL's log and counts."""

    checkpoint: Path
    model_id: str
    log_history: list[dict[str, Any]]
    pairs_trained: int
    pairs_too_long: int
    seconds: float
    summary: dict[str, float] = field(default_factory=dict)


def drop_overlong(dataset: pl.DataFrame, tokenizer, max_length: int | None,
                  completions: tuple[str, ...]) -> tuple[pl.DataFrame, int]:
    """Rows whose prompt plus longest completion column exceeds max_length tokens are dropped and counted: TRL
    would truncate them, and a truncated judgment loses its verdict line."""
    if max_length is None or dataset.is_empty():
        return dataset, 0
    keep = []
    for row in dataset.select("prompt", *completions).iter_rows():
        prompt_ids = tokenizer.apply_chat_template(row[0], add_generation_prompt=True, tokenize=True, return_dict=True)
        completion = max(len(tokenizer.encode(m[0]["content"], add_special_tokens=False)) for m in row[1:])
        keep.append(len(prompt_ids["input_ids"]) + completion + 1 <= max_length)
    mask = pl.Series(keep, dtype=pl.Boolean)
    return dataset.filter(mask), int((~mask).sum())


COLUMNS = {"dpo": ("chosen", "rejected"), "sft": ("completion",)}
"""The completion columns beside `prompt` that each kind of training reads."""


def train_dpo(
    model_path: str | Path,
    dataset: pl.DataFrame,
    settings: DPOConfig,
    output_dir: str | Path,
    seed: int = 0,
    dtype: str = "auto",
    chat_template: str | None = None,
) -> TrainingResult:
    """Train M_t (a saved model folder) with TRL's DPOTrainer on a dpo_dataset table and save M_{t+1}.

    Paper defaults come from `settings` (β, lr, cosine, epochs, global batch = per-device × accumulation ×
    processes). Training stops after `checkpoint_epoch` (default: the last) with the learning-rate schedule
    of all `num_epochs` — the weights the full run has at the end of that epoch — and that model is saved
    with save_pretrained (model, tokenizer, chat template) into output_dir/"model" with its digest written
    last; no other epoch is written. The summary counts epochs_trained and epochs_scheduled. LoRA adapters are
    merged so the result loads without peft. With num_processes > 1 the training runs in that many processes
    under `accelerate launch` (settings.accelerate_config). chat_template (model.chat_template) replaces the
    tokenizer's own, as it does for inference. Raises EmptyPreferenceSetError when no pair is left after
    dropping over-long ones.
    """
    return _train("dpo", model_path, dataset, settings, output_dir, seed, dtype, chat_template)


def train_sft(
    model_path: str | Path,
    examples: pl.DataFrame,
    settings: TrainingConfig,
    output_dir: str | Path,
    seed: int = 0,
    dtype: str = "auto",
    chat_template: str | None = None,
) -> TrainingResult:
    """Fine-tune the base model with TRL's SFTTrainer on the seed's judge examples (tables.SFT_EXAMPLES: prompt
    and completion messages; the loss on the completion only) and save M_1 — stopped at the kept epoch, saved,
    merged and launched as train_dpo does. Raises EmptyTrainingSetError when no example is left after dropping
    over-long ones."""
    return _train("sft", model_path, examples, settings, output_dir, seed, dtype, chat_template)


def _train(kind: str, model_path, table: pl.DataFrame, settings: TrainingConfig, output_dir, seed: int, dtype: str,
           chat_template: str | None) -> TrainingResult:
    started = time.perf_counter()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = _tokenizer(model_path, chat_template)
    table, too_long = drop_overlong(table, tokenizer, settings.max_length, COLUMNS[kind])
    if table.is_empty():
        error, what = (EmptyPreferenceSetError, "preference pair") if kind == "dpo" else (EmptyTrainingSetError,
                                                                                          "SFT example")
        raise error(f"no {what} to train on ({too_long} dropped as longer than max_length={settings.max_length})")
    # One file that every training process reads (under `accelerate launch` the ranks must share the
    # tokenised datasets cache that the main process writes beside it).
    table.select("prompt", *COLUMNS[kind]).write_parquet(output_dir / PAIRS_FILE)
    if settings.num_processes > 1:
        result = _train_with_accelerate(kind, model_path, settings, output_dir, seed, dtype, chat_template)
    else:
        result = _train_in_process(kind, model_path, settings, output_dir, seed, dtype, chat_template)
    result.pairs_trained, result.pairs_too_long = len(table), too_long
    result.seconds = time.perf_counter() - started
    return result


PAIRS_FILE = "pairs.parquet"


def _tokenizer(model_path, chat_template: str | None):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def dpo_arguments(settings: DPOConfig, output_dir: Path, seed: int, torch_dtype, on_gpu: bool):
    """TRL's DPOConfig for our settings: the paper's β and reference log-probs, and the common arguments."""
    from trl import DPOConfig as TRLDPOConfig

    return TRLDPOConfig(beta=settings.beta, precompute_ref_log_probs=settings.precompute_ref_log_probs,
                        **_common_arguments(settings, output_dir, seed, torch_dtype, on_gpu))


def sft_arguments(settings: TrainingConfig, output_dir: Path, seed: int, torch_dtype, on_gpu: bool):
    """TRL's SFTConfig for our settings: loss on the completion (the judgment) only, no packing, and the
    common arguments."""
    from trl import SFTConfig as TRLSFTConfig

    return TRLSFTConfig(completion_only_loss=True, packing=False,
                        **_common_arguments(settings, output_dir, seed, torch_dtype, on_gpu))


@contextmanager
def _quiet() -> Iterator[None]:
    """What TRL and PEFT print on their own, silenced while they run: the progress bar of TRL's reference log-probs
    (it reads TQDM_DISABLE, not the trainer's disable_tqdm) and the FutureWarning of their own reads of the model's
    deprecated `is_gradient_checkpointing` (trl/models/utils.py, peft/peft_model.py) — nothing of ours to change."""
    previous = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                                    category=FutureWarning)
            yield
    finally:
        if previous is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = previous


def _common_arguments(settings: TrainingConfig, output_dir: Path, seed: int, torch_dtype, on_gpu: bool) -> dict:
    """The paper's learning rate, schedule and global batch over all `num_epochs` (so that epoch e of a run
    stopped there is epoch e of the full run), logging every step, no checkpoint writes (the kept model is
    saved once, at the end), bf16 on a GPU that has it."""
    import torch

    return dict(
        output_dir=str(output_dir),
        learning_rate=settings.learning_rate,
        lr_scheduler_type=settings.lr_scheduler_type,
        warmup_steps=settings.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of all steps
        num_train_epochs=settings.num_epochs,
        per_device_train_batch_size=settings.per_device_batch_size,
        per_device_eval_batch_size=settings.per_device_batch_size,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        max_length=settings.max_length,
        save_strategy="no",
        logging_steps=1,
        report_to=[],
        bf16=on_gpu and torch_dtype in ("auto", torch.bfloat16) and torch.cuda.is_bf16_supported(),
        use_cpu=not on_gpu,
        seed=seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
        # TRL's default, under the name transformers 5.24 uses (TRL's own `gradient_checkpointing` is deprecated).
        activation_checkpointing=True,
    )


def stop_after_epoch(epoch: int):
    """A TrainerCallback that ends training once `epoch` epochs are done: the learning-rate schedule is still
    the one of the full run (its steps are counted from num_train_epochs), so the weights at that point are
    those the full run would have saved at the end of `epoch` (paper A.3 keeps epoch 6, 4, 2, 2 of 10)."""
    from transformers import TrainerCallback

    class StopAfterEpoch(TrainerCallback):
        def on_epoch_end(self, args, state, control, **kwargs):
            if state.epoch is not None and round(state.epoch) >= epoch:
                control.should_training_stop = True
            return control

    return StopAfterEpoch()


def _train_in_process(kind: str, model_path, settings: TrainingConfig, output_dir: Path, seed: int, dtype: str,
                      chat_template: str | None) -> TrainingResult | None:
    """The training itself on output_dir/pairs.parquet, in this process: alone, or as one rank under
    `accelerate launch` (then ranks other than 0 return None). Stops at the kept epoch."""
    import torch
    from datasets import Dataset, disable_progress_bars
    from transformers import AutoModelForCausalLM, PrinterCallback
    from trl import DPOTrainer, SFTTrainer

    disable_progress_bars()

    tokenizer = _tokenizer(model_path, chat_template)
    on_gpu = torch.cuda.is_available()
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch_dtype)
    peft_config = None
    if settings.lora_rank:
        from peft import LoraConfig

        peft_config = LoraConfig(r=settings.lora_rank, lora_alpha=2 * settings.lora_rank, lora_dropout=0.0,
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    train_set = Dataset.from_parquet(str(output_dir / PAIRS_FILE), cache_dir=str(output_dir / "datasets-cache"))
    trainer_type, arguments = (DPOTrainer, dpo_arguments) if kind == "dpo" else (SFTTrainer, sft_arguments)
    with _quiet():
        trainer = trainer_type(model=model, args=arguments(settings, output_dir / "trainer", seed, torch_dtype,
                                                           on_gpu),
                               train_dataset=train_set, processing_class=tokenizer, peft_config=peft_config,
                               callbacks=[stop_after_epoch(settings.kept_epoch)]
                               if settings.kept_epoch < settings.num_epochs else None)
        # Every logged step is kept in the log history (the stage's table, MLflow's curves), not printed.
        trainer.remove_callback(PrinterCallback)
        trainer.train()
        # How the kept model does on its own training set (DPO: against the reference log-probs computed before
        # training): a step's logged loss is the one it starts from, so a one-step DPO logs only ln 2.
        trainer.eval_dataset = trainer.train_dataset
        after = trainer.evaluate()
    trained = output_dir / "trained"
    trainer.save_model(str(trained))  # every rank: under FSDP the full state dict is gathered to rank 0
    if not trainer.is_world_process_zero():
        return None
    final = output_dir / "model"
    if settings.lora_rank:
        _save_merged(trained, model_path, final, tokenizer, torch_dtype)
    else:
        shutil.rmtree(final, ignore_errors=True)
        trained.rename(final)
    # The Trainer pickles its arguments beside the weights, its scratch folder's path included: the same weights
    # got another digest on every run (and every later table other ids).
    (final / "training_args.bin").unlink(missing_ok=True)
    model_id = write_model_digest(final)
    history = [dict(entry) for entry in trainer.state.log_history]
    summary = {**summarize_log(history, kind), "epochs_trained": float(round(trainer.state.epoch or 0)),
               "epochs_scheduled": float(settings.num_epochs),
               **{f"{name.replace('/', '_')}_after": float(after[f"eval_{name}"]) for name in AFTER_TRAINING[kind]
                  if f"eval_{name}" in after}}
    return TrainingResult(final, model_id, history, pairs_trained=train_set.num_rows, pairs_too_long=0,
                          seconds=0.0, summary=summary)


def _train_with_accelerate(kind: str, model_path, settings: TrainingConfig, output_dir: Path, seed: int, dtype: str,
                           chat_template: str | None) -> TrainingResult:
    """The training in settings.num_processes processes under `accelerate launch` (FSDP, ZeRO-3, DDP, as
    settings.accelerate_config says); rank 0 saves the checkpoint and reports the result in result.json."""
    config_file = Path(settings.accelerate_config)
    if not config_file.is_file():
        raise FileNotFoundError(f"{kind}.accelerate_config {config_file} does not exist (see deployments/accelerate/)")
    (output_dir / "settings.json").write_text(json.dumps({"kind": kind, "settings": settings.model_dump(mode="json"),
                                                          "chat_template": chat_template}))
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
        "--num_processes", str(settings.num_processes), "--main_process_port", str(free_port()),
        "-m", "metareward.training.trainer", "--model", str(model_path), "--output", str(output_dir),
        "--seed", str(seed), "--dtype", dtype,
    ]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        # The tail of the output, not only its "Error" lines: the failing rank's own traceback precedes torch's
        # ChildFailedError summary, which alone does not say what went wrong.
        output = [line for line in (completed.stdout + completed.stderr).splitlines() if line.strip()][-40:]
        raise RuntimeError(f"accelerate launch ({settings.num_processes} processes) failed (exit "
                           f"{completed.returncode}):\n" + "\n".join(output))
    report = json.loads((output_dir / "result.json").read_text())
    return TrainingResult(Path(report["checkpoint"]), report["model_id"], report["log_history"],
                          report["pairs_trained"], report["pairs_too_long"], report["seconds"], report["summary"])



def main(argv: list[str] | None = None) -> None:
    """Entry point of each process under `accelerate launch` (see _train_with_accelerate)."""
    parser = argparse.ArgumentParser(description="one training process (DPO or SFT)")
    parser.add_argument("--model", required=True)
    parser.add_argument("--output", required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="auto")
    arguments = parser.parse_args(argv)
    output = Path(arguments.output)
    written = json.loads((output / "settings.json").read_text())
    kind = written["kind"]
    settings = (DPOConfig if kind == "dpo" else TrainingConfig).model_validate(written["settings"])
    result = _train_in_process(kind, arguments.model, settings, output, arguments.seed, arguments.dtype,
                               written["chat_template"])
    if result is not None:
        report = {**{k: v for k, v in result.__dict__.items()}, "checkpoint": str(result.checkpoint)}
        (output / "result.json").write_text(json.dumps(report, default=float))


def _save_merged(adapter: Path, base_path, target: Path, tokenizer, torch_dtype) -> Path:
    """The base model with the trained LoRA adapter merged in, saved as a plain checkpoint."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=torch_dtype)
    with _quiet():
        model = PeftModel.from_pretrained(base, str(adapter)).merge_and_unload()
    shutil.rmtree(target, ignore_errors=True)
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return target


def summarize_log(history: list[dict[str, Any]], kind: str = "dpo") -> dict[str, float]:
    """First and last value of each metric TRL logged (loss, rewards/…), e.g. {'loss_first': …}."""
    summary: dict[str, float] = {}
    for name in TRAINING_METRICS[kind]:
        values = [entry[name] for entry in history if name in entry and "train_runtime" not in entry]
        if values:
            key = name.replace("/", "_")
            summary[f"{key}_first"], summary[f"{key}_last"] = float(values[0]), float(values[-1])
    return summary


if __name__ == "__main__":
    main()
