"""Training with TRL — DPO of M_t into M_{t+1}, and the seed's SFT on judge data into M_1 — full or LoRA (merged),
stopped at the kept epoch of the full schedule, in one process or under `accelerate launch` on this machine, with
checkpoints to resume from (a Ray Train gang runs the same training: placement.gang)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import polars as pl

from metareward.config.training import DPOConfig, TrainingConfig
from metareward.host.ports import free_port
from metareward.host.stopping import raise_if_stopped
from metareward.training.checkpoints import CheckpointStore
from metareward.training.logs import TrainingResult
from metareward.training.process import PAIRS_FILE, load_tokenizer, train_here
from metareward.training.sharing import read_sharing


class EmptyTrainingSetError(ValueError):
    """Nothing left to train on."""


class EmptyPreferenceSetError(EmptyTrainingSetError):
    """No usable preference pair: nothing to train on (e.g. every prompt's scores tied)."""


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
    checkpoints: CheckpointStore | None = None,
) -> TrainingResult:
    """Train M_t (a saved model folder) with TRL's DPOTrainer on a dpo_dataset table and save M_{t+1}.

    Paper defaults come from `settings` (β, lr, cosine, epochs, global batch = per-device × accumulation ×
    processes). Training stops after `checkpoint_epoch` (default: the last) with the learning-rate schedule
    of all `num_epochs` — the weights the full run has at the end of that epoch — and that model is saved
    with save_pretrained (model, tokenizer, chat template) into output_dir/"model" with its digest written
    last; no other epoch is written. The summary counts epochs_trained and epochs_scheduled. LoRA adapters are
    merged so the result loads without peft. With num_processes > 1 the training runs in that many processes
    under `accelerate launch` (settings.accelerate_config). chat_template (model.chat_template) replaces the
    tokenizer's own, as it does for inference. With `checkpoints`, a checkpoint is kept there every
    settings.save_steps steps and the training resumes from the latest one it finds (result.resumed_from_step).
    Raises EmptyPreferenceSetError when no pair is left after dropping over-long ones.
    """
    return _train("dpo", model_path, dataset, settings, output_dir, seed, dtype, chat_template, checkpoints)


def train_sft(
    model_path: str | Path,
    examples: pl.DataFrame,
    settings: TrainingConfig,
    output_dir: str | Path,
    seed: int = 0,
    dtype: str = "auto",
    chat_template: str | None = None,
    checkpoints: CheckpointStore | None = None,
) -> TrainingResult:
    """Fine-tune the base model with TRL's SFTTrainer on the seed's judge examples (tables.SFT_EXAMPLES: prompt
    and completion messages; the loss on the completion only) and save M_1 — stopped at the kept epoch, saved,
    merged, launched and checkpointed as train_dpo does. Raises EmptyTrainingSetError when no example is left after
    dropping over-long ones."""
    return _train("sft", model_path, examples, settings, output_dir, seed, dtype, chat_template, checkpoints)


def _train(kind: str, model_path, table: pl.DataFrame, settings: TrainingConfig, output_dir, seed: int, dtype: str,
           chat_template: str | None, checkpoints: CheckpointStore | None) -> TrainingResult:
    started = time.perf_counter()
    output_dir = Path(output_dir)
    too_long = write_training_set(kind, model_path, table, settings, output_dir, chat_template)
    if settings.num_processes > 1:
        result = _train_with_accelerate(kind, model_path, settings, output_dir, seed, dtype, chat_template, checkpoints)
    else:
        result = train_here(kind, model_path, settings, output_dir, seed, dtype, chat_template, checkpoints)
    result.pairs_too_long = too_long
    result.seconds = time.perf_counter() - started
    return result


def write_training_set(kind: str, model_path, table: pl.DataFrame, settings: TrainingConfig, output_dir: Path,
                       chat_template: str | None) -> int:
    """Write the rows a training reads to output_dir/pairs.parquet, the over-long ones dropped; returns how many
    were. Raises EmptyPreferenceSetError (DPO) or EmptyTrainingSetError (SFT) when none is left."""
    output_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(model_path, chat_template)
    table, too_long = drop_overlong(table, tokenizer, settings.max_length, COLUMNS[kind])
    if table.is_empty():
        error, what = (EmptyPreferenceSetError, "preference pair") if kind == "dpo" else (EmptyTrainingSetError,
                                                                                          "SFT example")
        raise error(f"no {what} to train on ({too_long} dropped as longer than max_length={settings.max_length})")
    # One file that every training process reads (under `accelerate launch` the ranks must share the
    # tokenised datasets cache that the main process writes beside it).
    table.select("prompt", *COLUMNS[kind]).write_parquet(output_dir / PAIRS_FILE)
    return too_long


def _train_with_accelerate(kind: str, model_path, settings: TrainingConfig, output_dir: Path, seed: int, dtype: str,
                           chat_template: str | None, checkpoints: CheckpointStore | None) -> TrainingResult:
    """The training in settings.num_processes processes under `accelerate launch` (FSDP, ZeRO-3, DDP, as
    settings.accelerate_config says); rank 0 saves the checkpoint and reports the result in result.json."""
    config_file = read_sharing(settings.accelerate_config, f"{kind}.accelerate_config").path
    (output_dir / "settings.json").write_text(json.dumps({
        "kind": kind, "settings": settings.model_dump(mode="json"), "chat_template": chat_template,
        "checkpoints": dataclasses.asdict(checkpoints) if checkpoints else None}))
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
        "--num_processes", str(settings.num_processes), "--main_process_port", str(free_port()),
        "-m", "metareward.training.trainer", "--model", str(model_path), "--output", str(output_dir),
        "--seed", str(seed), "--dtype", dtype,
    ]
    launch = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        while True:
            try:
                output, _ = launch.communicate(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                raise_if_stopped(f"{kind} training under accelerate launch")
    except BaseException:
        # Stopped, or this thread interrupted (SIGTERM, Ctrl-C): accelerate's launcher passes SIGTERM on to every
        # rank, and the last checkpoint stays in the store for the re-run.
        launch.terminate()
        try:
            launch.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            launch.kill()
            launch.communicate()
        raise
    if launch.returncode != 0:
        # The tail of the output, not only its "Error" lines: the failing rank's own traceback precedes torch's
        # ChildFailedError summary, which alone does not say what went wrong.
        tail = [line for line in output.splitlines() if line.strip()][-40:]
        raise RuntimeError(f"accelerate launch ({settings.num_processes} processes) failed (exit "
                           f"{launch.returncode}):\n" + "\n".join(tail))
    report = json.loads((output_dir / "result.json").read_text())
    return TrainingResult(**{**report, "checkpoint": Path(report["checkpoint"])})


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
    checkpoints = CheckpointStore(**written["checkpoints"]) if written["checkpoints"] else None
    result = train_here(kind, arguments.model, settings, output, arguments.seed, arguments.dtype,
                        written["chat_template"], checkpoints)
    if result is not None:
        report = {**dataclasses.asdict(result), "checkpoint": str(result.checkpoint)}
        (output / "result.json").write_text(json.dumps(report, default=float))


if __name__ == "__main__":
    main()
