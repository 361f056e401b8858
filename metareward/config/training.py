"""The training sections of a campaign's config: what DPO (every iteration) and the seed's SFT (stage 0) share —
schedule, epochs and the kept one, batch sizes, processes, LoRA — and what each adds (paper A.3)."""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import Field, model_validator

from metareward.config.sections import Strict


class TrainingConfig(Strict):
    """What every training of the campaign shares: schedule over num_epochs, the epoch kept, the global batch
    and how it is split over devices and processes, sequence length, full weights or LoRA."""

    learning_rate: float = Field(default=5e-6, gt=0.0, description="Peak learning rate (paper A.3: 5e-6 for DPO).")
    lr_scheduler_type: Literal["cosine", "linear", "constant", "constant_with_warmup"] = Field(
        default="cosine", description="Learning-rate schedule (paper A.3: cosine)."
    )
    warmup_ratio: float = Field(default=0.0, ge=0.0, lt=1.0, description="Share of steps spent warming up.")
    num_epochs: int = Field(
        default=10, ge=1, description="Epochs the learning-rate schedule spans (paper A.3: 10)."
    )
    checkpoint_epoch: int | None = Field(
        default=None,
        ge=1,
        description="Epoch kept as the trained model (paper A.3: DPO 6, 4, 2, 2; SFT 5): training stops there, on "
        "the schedule of all num_epochs, so the weights are those the full run has after that epoch; None trains "
        "all epochs.",
    )
    global_batch_size: int = Field(
        default=32, ge=1, description="Examples per optimizer step over all processes (paper A.3: 32)."
    )
    per_device_batch_size: int = Field(default=4, ge=1, description="Examples per forward pass on one device.")
    num_processes: int = Field(
        default=1, ge=1,
        description="Training processes, one GPU each: with a Ray cluster (orchestration.ray_address) a Ray Train "
        "gang across its nodes; without one, >1 runs them on this machine under `accelerate launch`.",
    )
    accelerate_config: str = Field(
        default="deployments/accelerate/fsdp.yaml",
        description="How num_processes > 1 share the model — FSDP (fsdp.yaml), DeepSpeed ZeRO-3 (deepspeed-zero3.yaml) "
        "or DDP (ddp.yaml) — for `accelerate launch` and for a Ray Train gang alike.",
    )
    save_steps: int | None = Field(
        default=100, ge=1,
        description="Optimizer steps between checkpoints (weights, optimizer, scheduler, RNG and data position) kept "
        "in the artifact store under the training job's key until its model is written: a killed or retried training "
        "resumes from the last one. None: no checkpoints, a failure trains again from the start.",
    )
    activation_checkpointing: bool = Field(
        default=True,
        description="Recompute activations in the backward pass instead of keeping them (TRL's default): far less "
        "memory for about a third more compute; the trained weights are the same either way.",
    )
    max_length: int | None = Field(
        default=2048, ge=16,
        description="Longest prompt+completion in tokens; longer examples are dropped and counted (truncating "
        "them would cut the verdict line off a judgment).",
    )
    lora_rank: int | None = Field(
        default=None, ge=1, description="LoRA rank r; None trains all weights (the paper's full fine-tuning)."
    )

    UNHASHED: ClassVar[frozenset[str]] = frozenset({"save_steps", "activation_checkpointing"})
    """Fields that change how a training runs (memory, what it can resume from), never the weights it trains: left out
    of the training stage's cache key."""

    def cache_key_form(self) -> dict:
        """The settings as a training stage's cache key hashes them: all but UNHASHED."""
        return self.model_dump(mode="json", exclude=set(self.UNHASHED))

    @property
    def gradient_accumulation_steps(self) -> int:
        """Accumulation steps so that per-device batch × steps × processes = global batch."""
        return self.global_batch_size // (self.per_device_batch_size * self.num_processes)

    @property
    def kept_epoch(self) -> int:
        """The epoch whose weights are kept: checkpoint_epoch, or the last."""
        return self.checkpoint_epoch or self.num_epochs

    @model_validator(mode="after")
    def _consistent(self) -> TrainingConfig:
        per_step = self.per_device_batch_size * self.num_processes
        if self.global_batch_size % per_step:
            raise ValueError(
                f"global_batch_size {self.global_batch_size} is not a multiple of per_device_batch_size × "
                f"num_processes = {per_step}: change per_device_batch_size so that it divides "
                f"{self.global_batch_size // self.num_processes}"
            )
        if self.checkpoint_epoch is not None and self.checkpoint_epoch > self.num_epochs:
            raise ValueError(
                f"checkpoint_epoch {self.checkpoint_epoch} > num_epochs {self.num_epochs}: "
                "keep an epoch that is trained, or raise num_epochs"
            )
        return self


class DPOConfig(TrainingConfig):
    """DPO training of M_t into M_{t+1} (paper A.3: 10 epochs, lr 5e-6, β 0.1, global batch 32, cosine)."""

    beta: float = Field(default=0.1, gt=0.0, description="β, DPO's KL strength (paper A.3: 0.1).")
    precompute_ref_log_probs: bool = Field(
        default=True, description="Compute the reference model's log-probs once before training."
    )


class SFTConfig(TrainingConfig):
    """The seed's supervised fine-tuning on judge data, stage 0 (paper sec. 3.1 "SFT on EFT"; A.3: 10 epochs,
    lr 5e-8, global batch 32, cosine, epoch 5 kept): model.path is the base model, the result is M_1."""

    path: str = Field(
        description="JSONL, Parquet or CSV file of judge examples: columns `instruction`, `response` (rendered into "
        "the judge prompt, paper A.1) and `judgment` (the target, ending in 'Score: X' with X in 0–5); see README.",
    )
    learning_rate: float = Field(default=5e-8, gt=0.0, description="Peak learning rate (paper A.3: 5e-8).")
    checkpoint_epoch: int | None = Field(
        default=5, ge=1, description="Epoch kept as M_1 (paper A.3: 5 of 10); None keeps the last."
    )

    def training(self) -> TrainingConfig:
        """The training settings alone (the file is read by the sft_data stage, whose table is keyed by its
        content, not its path)."""
        return TrainingConfig.model_validate(self.model_dump(exclude={"path"}))
