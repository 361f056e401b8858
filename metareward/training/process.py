"""One training process with TRL — alone, as a rank under `accelerate launch`, or as a worker of a Ray Train gang:
TRL's arguments for our settings, the stop at the kept epoch, checkpoints kept in the artifact store and resumed
from, the reference log-probs computed across the ranks, and the kept model saved as a plain checkpoint."""

from __future__ import annotations

import logging
import os
import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from metareward.config.training import DPOConfig, TrainingConfig
from metareward.host.faults import hold, training_step_hold
from metareward.host.stopping import raise_if_stopped
from metareward.training.checkpoints import CheckpointStore, uploading_callback
from metareward.training.export import save_gathered
from metareward.training.logs import AFTER_TRAINING, TrainingResult, summarize_log
from metareward.training.merge import merge_lora
from metareward.training.models import read_model_config, write_model_digest

log = logging.getLogger(__name__)

PAIRS_FILE = "pairs.parquet"
"""The rows a training reads, written into its folder (write_training_set)."""

def load_tokenizer(model_path, chat_template: str | None):
    """The model's tokenizer, with chat_template (model.chat_template) in place of its own and a pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_path))
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def dpo_arguments(settings: DPOConfig, output_dir: Path, seed: int, torch_dtype, on_gpu: bool,
                  keep_checkpoints: bool = False):
    """TRL's DPOConfig for our settings: the paper's β and reference log-probs, and the common arguments."""
    from trl import DPOConfig as TRLDPOConfig

    return TRLDPOConfig(beta=settings.beta, precompute_ref_log_probs=settings.precompute_ref_log_probs,
                        **_common_arguments(settings, output_dir, seed, torch_dtype, on_gpu, keep_checkpoints))


def sft_arguments(settings: TrainingConfig, output_dir: Path, seed: int, torch_dtype, on_gpu: bool,
                  keep_checkpoints: bool = False):
    """TRL's SFTConfig for our settings: loss on the completion (the judgment) only, no packing, and the
    common arguments."""
    from trl import SFTConfig as TRLSFTConfig

    return TRLSFTConfig(completion_only_loss=True, packing=False,
                        **_common_arguments(settings, output_dir, seed, torch_dtype, on_gpu, keep_checkpoints))


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


def _common_arguments(settings: TrainingConfig, output_dir: Path, seed: int, torch_dtype, on_gpu: bool,
                      keep_checkpoints: bool) -> dict:
    """The paper's learning rate, schedule and global batch over all `num_epochs` (so that epoch e of a run
    stopped there is epoch e of the full run), logging every step, a checkpoint every save_steps when
    keep_checkpoints, and on a GPU autocast in the model's half-precision dtype (bf16 where the GPU has it, fp16)."""
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
        # Checkpoints every save_steps when they are kept (in the artifact store, see train_here); the Trainer keeps
        # only the latest locally. Without them nothing is written before the kept model.
        save_strategy="steps" if settings.save_steps and keep_checkpoints else "no",
        save_steps=settings.save_steps or 1,  # read only when saving
        save_total_limit=1,
        logging_steps=1,
        report_to=[],
        bf16=on_gpu and torch_dtype == torch.bfloat16 and torch.cuda.is_bf16_supported(),
        fp16=on_gpu and torch_dtype == torch.float16,
        use_cpu=not on_gpu,
        seed=seed,
        dataloader_num_workers=0,
        disable_tqdm=True,
        # Under the name transformers 5.24 uses (TRL's own `gradient_checkpointing` is deprecated).
        activation_checkpointing=settings.activation_checkpointing,
    )


def stop_after_epoch(epoch: int):
    """A TrainerCallback that ends training once `epoch` epochs are done: the learning-rate schedule is still
    the one of the full run (its steps are counted from num_train_epochs), so the weights at that point are
    those the full run would have saved at the end of `epoch` (paper A.3 keeps epoch 6, 4, 2, 2 of 10). No
    checkpoint is kept at that last step: a training resumed from it would start epoch `epoch` + 1 (the Trainer
    stops only at an epoch's end) and train past the kept weights."""
    from transformers import TrainerCallback

    class StopAfterEpoch(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.epoch is not None and state.epoch >= epoch - 1e-6:
                control.should_save = False
            return control

        def on_epoch_end(self, args, state, control, **kwargs):
            if state.epoch is not None and round(state.epoch) >= epoch:
                control.should_training_stop = True
            return control

    return StopAfterEpoch()


def train_here(kind: str, model_path, settings: TrainingConfig, output_dir: Path, seed: int, dtype: str,
               chat_template: str | None, checkpoints: CheckpointStore | None = None) -> TrainingResult | None:
    """The training itself on output_dir/pairs.parquet, in this process: alone, or as one rank of several (under
    `accelerate launch` or Ray Train; ranks other than 0 return None). Stops at the kept epoch. With
    `checkpoints`, every rank resumes from the latest complete checkpoint there (fetched once per node) and a
    checkpoint is kept every settings.save_steps steps."""
    import torch
    from datasets import Dataset, disable_progress_bars
    from transformers import AutoModelForCausalLM, PrinterCallback
    from trl import SFTTrainer

    disable_progress_bars()
    tokenizer = load_tokenizer(model_path, chat_template)
    on_gpu = torch.cuda.is_available()
    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    weights_dtype = _weights_dtype(model_path, torch_dtype)
    # Float32 master weights for a full fine-tuning in half precision that no sharding upcasts (FSDP and DeepSpeed
    # keep their own): bf16 weights would round most updates of the paper's learning rates away (5e-6 moves a weight
    # of 0.02 by 1/24 of bf16's spacing there); on a GPU the steps run in autocast of that dtype all the same.
    master = (torch.float32 if not settings.lora_rank and weights_dtype in (torch.bfloat16, torch.float16)
              and not _sharded_by_accelerate(on_gpu) else weights_dtype)
    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=master)
    peft_config = None
    if settings.lora_rank:
        from peft import LoraConfig

        peft_config = LoraConfig(r=settings.lora_rank, lora_alpha=2 * settings.lora_rank, lora_dropout=0.0,
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    train_set = Dataset.from_parquet(str(output_dir / PAIRS_FILE), cache_dir=str(output_dir / "datasets-cache"))
    keep = checkpoints is not None and settings.save_steps is not None
    if kind == "dpo":
        import polars as pl

        # The pairs' row hashes tell a kept reference apart from another training set's (read only when kept).
        pair_hashes = pl.read_parquet(output_dir / PAIRS_FILE).hash_rows().to_list() if keep else []
        trainer_type, arguments = _dpo_trainer(checkpoints if keep else None, pair_hashes), dpo_arguments
    else:
        trainer_type, arguments = SFTTrainer, sft_arguments
    callbacks = [_stop_when_asked(kind)]
    if settings.kept_epoch < settings.num_epochs:
        callbacks.append(stop_after_epoch(settings.kept_epoch))
    fault = training_step_hold(STAGE_OF[kind])
    if fault is not None:
        callbacks.append(_hold_at_step(*fault))
    resume, resumed_from = None, 0
    if keep:
        callbacks.append(uploading_callback(checkpoints))
        step = checkpoints.latest()
        if step is not None:
            resume, resumed_from = str(checkpoints.fetch(step)), step
    with _quiet():
        trainer = trainer_type(model=model, args=arguments(settings, output_dir / "trainer", seed, weights_dtype,
                                                           on_gpu, keep),
                               train_dataset=train_set, processing_class=tokenizer, peft_config=peft_config,
                               callbacks=callbacks)
        # Every logged step is kept in the log history (the stage's table, MLflow's curves), not printed.
        trainer.remove_callback(PrinterCallback)
        trainer.train(resume_from_checkpoint=resume)
        if resume and int(os.environ.get("LOCAL_RANK", "0")) == 0:
            checkpoints.drop_local()  # every rank of the node loaded it before the first step's collectives
        # How the kept model does on its own training set (DPO: against the reference log-probs computed before
        # training): a step's logged loss is the one it starts from, so a one-step DPO logs only ln 2.
        trainer.eval_dataset = trainer.train_dataset
        after = trainer.evaluate()
    trained = output_dir / "trained"
    if trainer.is_fsdp_enabled and not settings.lora_rank:
        # Every rank: one parameter gathered at a time, never the whole model on rank 0 (a LoRA adapter is small).
        save_gathered(trainer.model, trained, trainer.is_world_process_zero(), dtype=weights_dtype)
        if trainer.is_world_process_zero():
            tokenizer.save_pretrained(trained)
    else:
        if master != weights_dtype:
            trainer.model.to(weights_dtype)  # saved in the model's dtype: the float32 masters were for the steps
        trainer.save_model(str(trained))  # every rank
    if not trainer.is_world_process_zero():
        return None
    final = output_dir / "model"
    if settings.lora_rank:
        merge_lora(trained, model_path, final, None if torch_dtype == "auto" else torch_dtype)
        tokenizer.save_pretrained(final)
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
                          seconds=0.0, summary=summary, resumed_from_step=resumed_from,
                          reference_reused=getattr(trainer, "reference_reused", False))


def _weights_dtype(model_path, torch_dtype):
    """The dtype the model's weights are trained and saved in: `torch_dtype`, or for "auto" what transformers loads:
    config.json's dtype, else its weights' (the first floating-point tensor of its safetensors files), else
    float32."""
    import torch

    if torch_dtype != "auto":
        return torch_dtype
    config = read_model_config(model_path)
    named = config.get("dtype") or config.get("torch_dtype")
    if isinstance(named, str) and isinstance(getattr(torch, named, None), torch.dtype):
        return getattr(torch, named)
    from safetensors import safe_open

    stored = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}
    for file in sorted(Path(model_path).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for name in handle.keys():
                kind = handle.get_slice(name).get_dtype()
                if kind in stored:
                    return stored[kind]
    return torch.float32


def _sharded_by_accelerate(on_gpu: bool) -> bool:
    """Whether this process is a rank that FSDP or DeepSpeed shares the model across (they keep float32 master
    weights themselves): accelerate launch, or a Ray Train gang given an FSDP config, says so in the environment —
    on GPUs only, since accelerate turns FSDP on for GPU processes (a CPU gang given fsdp.yaml trains as DDP)."""
    return on_gpu and any(os.environ.get(name, "false").lower() == "true"
                          for name in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"))


STAGE_OF = {"dpo": "checkpoint", "sft": "sft"}
"""The stage that runs each kind of training."""


def _stop_when_asked(kind: str):
    """A TrainerCallback that ends an in-process training after the step under way when the run is cancelled or
    terminated (metareward.host.stopping): the last checkpoint in the store stays for the re-run to resume from."""
    from transformers import TrainerCallback

    class StopWhenAsked(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            raise_if_stopped(f"{kind} training at step {state.global_step}")
            return control

    return StopWhenAsked()


def _hold_at_step(step: int, rank: int, release: Path):
    from transformers import TrainerCallback

    class HoldAtStep(TrainerCallback):  # test-only (host.faults.FAULT_ENVIRONMENT)
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == step and args.process_index == rank:
                hold(release)
            return control

    return HoldAtStep()


def _dpo_trainer(checkpoints: CheckpointStore | None, pair_hashes: list[int]):
    """TRL's DPOTrainer with the reference log-probs precomputed on every rank's share of the pairs and gathered
    by every rank into its own copy of the dataset. TRL's own precompute has rank 0 write them to a cache file
    beside the dataset that the other ranks then read: a rank on another node of a Ray cluster has no such file.
    The values are TRL's (its compute_ref_log_probs, float32). With `checkpoints`, rank 0 keeps them beside the
    checkpoints with the training set's row hashes (`pair_hashes`), and a resumed training whose pairs hash the same
    reads them from there instead of running the reference model again (`reference_reused`; rank 0 decides and tells
    the others, so that every rank runs the same collectives). DeepSpeed keeps TRL's precompute, which needs its
    inference engine."""
    import torch
    from accelerate.utils import broadcast_object_list
    from datasets import Value
    from torch.utils.data import DataLoader
    from trl import DPOTrainer

    class DPOTrainerOnAnyNode(DPOTrainer):
        reference_reused = False

        def _precompute_ref_logps(self, dataset, name, batch_size):
            if self.is_deepspeed_enabled:
                return super()._precompute_ref_logps(dataset, name, batch_size)
            kept = self._kept_reference(dataset) if checkpoints and name == "train" else None
            if kept is not None:
                chosen, rejected = kept
                self.reference_reused = True
            else:
                chosen, rejected = self._reference_log_probs(dataset, batch_size)
                if checkpoints and name == "train" and self.accelerator.is_main_process:
                    try:
                        checkpoints.keep_reference(chosen, rejected, pair_hashes)
                    except Exception as error:  # the training goes on; a resumed one computes them again
                        log.warning("the reference log-probs could not be kept at %s (%s): a resumed training "
                                    "computes them again", checkpoints.uri(), error)
            return (dataset.add_column("ref_chosen_logps", chosen, feature=Value("float32"))
                    .add_column("ref_rejected_logps", rejected, feature=Value("float32")))

        def _kept_reference(self, dataset) -> tuple[list[float], list[float]] | None:
            found = [None]
            if self.accelerator.is_main_process and len(pair_hashes) == dataset.num_rows:
                table = checkpoints.read_reference(pair_hashes)
                if table is not None:
                    found = [(table["ref_chosen_logps"].to_list(), table["ref_rejected_logps"].to_list())]
            broadcast_object_list(found, from_process=0)
            return found[0]

        def _reference_log_probs(self, dataset, batch_size) -> tuple[list[float], list[float]]:
            loader = self.accelerator.prepare(DataLoader(dataset, batch_size=batch_size, shuffle=False,
                                                         collate_fn=self.data_collator,
                                                         num_workers=self.args.dataloader_num_workers))
            chosen, rejected = [], []
            for batch in loader:
                values = self.compute_ref_log_probs(self.ref_model or self.model, batch)
                batch_chosen, batch_rejected = self.accelerator.gather_for_metrics(values)
                chosen.append(batch_chosen.float().cpu())
                rejected.append(batch_rejected.float().cpu())
            return torch.cat(chosen).tolist(), torch.cat(rejected).tolist()

    return DPOTrainerOnAnyNode
