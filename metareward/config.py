"""The whole campaign as one validated pydantic object: YAML in, YAML out, the paper's defaults as ours."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

Mode = Literal["meta_rewarding", "self_rewarding"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]


class ConfigError(ValueError):
    """A campaign configuration that cannot be used; the message names the file, the field and the fix."""


_URL_PASSWORD = re.compile(r"^[a-z][a-z0-9+.-]*://[^/@\s]*:[^/@\s]*@", re.IGNORECASE)


def _no_password(value: str | None, where: str, instead: str) -> str | None:
    """Refuse a URL with a user:password in it: a config travels to Prefect, MLflow and the artifact store."""
    if value is not None and _URL_PASSWORD.match(value):
        raise ValueError(f"{where} holds a password, and a config is stored with every run: {instead}")
    return value


class _Strict(BaseModel):
    # A misspelt field is an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Strict):
    """The seed model M_1 (or the checkpoint a campaign starts from)."""

    path: str = Field(
        description="Local model folder or hub id of the seed model (paper: Llama-3-8B-Instruct after SFT on EFT).",
    )
    dtype: Dtype = Field(
        default="auto",
        description="Weights dtype for inference and training; 'auto' keeps the checkpoint's own.",
    )
    chat_template: str | None = Field(
        default=None,
        description="Jinja chat template that replaces the tokenizer's own; None keeps the tokenizer's.",
    )

    @field_validator("path")
    @classmethod
    def _path_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("model.path is empty: give a local model folder or a hub id")
        return value


class PromptsConfig(_Strict):
    """Where the instruction prompts x come from (paper sec. 3.1: 20,000 generated prompts)."""

    path: str = Field(description="JSONL, Parquet or CSV file with one prompt per row.")
    column: str = Field(default="prompt", description="Name of the column that holds the prompt text.")


class SamplingConfig(_Strict):
    """Sampling parameters of one role (paper sec. 3.1: temperature 0.8, top_p 0.95)."""

    temperature: float = Field(default=0.8, ge=0.0, description="Sampling temperature (paper: 0.8).")
    top_p: float = Field(default=0.95, gt=0.0, le=1.0, description="Nucleus sampling mass (paper: 0.95).")
    max_tokens: int = Field(
        default=1024, ge=1, description="Most new tokens per completion (not stated in the paper)."
    )


class DPOConfig(_Strict):
    """DPO training of M_t into M_{t+1} (paper A.3)."""

    beta: float = Field(default=0.1, gt=0.0, description="β, DPO's KL strength (paper A.3: 0.1).")
    learning_rate: float = Field(default=5e-6, gt=0.0, description="Peak learning rate (paper A.3: 5e-6).")
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
        description="Epoch kept as M_{t+1} (paper A.3: 6, 4, 2, 2): training stops there, on the schedule of all "
        "num_epochs, so the weights are those the full run has after that epoch; None trains all epochs.",
    )
    global_batch_size: int = Field(
        default=32, ge=1, description="Pairs per optimizer step over all processes (paper A.3: 32)."
    )
    per_device_batch_size: int = Field(default=4, ge=1, description="Pairs per forward pass on one device.")
    num_processes: int = Field(default=1, ge=1, description="Training processes (GPUs); >1 uses accelerate.")
    accelerate_config: str = Field(
        default="deployments/accelerate/fsdp.yaml",
        description="`accelerate launch` config when num_processes > 1 (FSDP; deepspeed-zero3.yaml; ddp.yaml).",
    )
    max_length: int | None = Field(
        default=2048, ge=16, description="Longest prompt+completion in tokens; longer pairs are dropped."
    )
    lora_rank: int | None = Field(
        default=None, ge=1, description="LoRA rank r; None trains all weights (the paper's full fine-tuning)."
    )
    precompute_ref_log_probs: bool = Field(
        default=True, description="Compute the reference model's log-probs once before training."
    )

    @property
    def gradient_accumulation_steps(self) -> int:
        """Accumulation steps so that per-device batch × steps × processes = global batch."""
        return self.global_batch_size // (self.per_device_batch_size * self.num_processes)

    @model_validator(mode="after")
    def _consistent(self) -> DPOConfig:
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


class IterationConfig(_Strict):
    """One Meta-Rewarding iteration: data creation with M_t, then DPO into M_{t+1} (paper sec. 2, A.3)."""

    num_prompts: int | None = Field(
        default=5000, ge=1, description="Prompts sampled for this iteration (paper sec. 3.1: 5,000); None: all."
    )
    num_responses: int = Field(
        default=7, ge=2, description="K, actor responses per prompt (paper sec. 3.1: 7); K ≥ 2 to form a pair."
    )
    num_judgments: int = Field(
        default=11, ge=2, description="N, judgments per response (paper sec. 3.1: 11); N ≥ 2 for a variance."
    )
    actor_sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="Actor sampling.")
    judge_sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="Judge sampling.")
    meta_judge_sampling: SamplingConfig = Field(
        default_factory=SamplingConfig, description="Meta-judge sampling."
    )
    rho: float = Field(
        default=0.0,
        description="ρ, quality-tier parameter of length control (paper sec. 2.1); 0 disables it.",
    )
    max_chosen_response_chars: int | None = Field(
        default=None,
        ge=1,
        description="Drop actor pairs whose chosen response is longer (paper A.3: 2500 in iteration 1).",
    )
    train_judge: bool | None = Field(
        default=None,
        description="Add judge pairs to DPO (paper: iterations 1–2); None: yes in meta_rewarding mode.",
    )
    max_chosen_judgment_chars: int | None = Field(
        default=None,
        ge=1,
        description="Drop judge pairs whose chosen judgment is longer (paper A.3: 1100, then 1000).",
    )
    dpo: DPOConfig = Field(default_factory=DPOConfig, description="DPO settings of this iteration.")

    @field_validator("rho")
    @classmethod
    def _rho_in_range(cls, value: float) -> float:
        if not 0.0 <= value < 0.5:
            raise ValueError(
                f"ρ must be in [0, 0.5) so that the top and bottom quality tiers do not overlap "
                f"(paper sec. 2.1), got {value}: use e.g. 0 (no length control) or 0.32"
            )
        return value


class InferenceConfig(_Strict):
    """Which engine plays the three roles, and how (DESIGN.md, Inference)."""

    backend: Literal["transformers", "vllm", "openai"] = Field(
        default="transformers",
        description="transformers (in-process), vllm (servers from vLLM's own venv), openai (any compatible server).",
    )
    verdict_mode: Literal["free", "forced"] = Field(
        default="free",
        description="free: the paper's (parse the judge's own text); forced: justify, then sample the verdict "
        "from the allowed answers, so every judgment parses (small models).",
    )
    max_model_len: int | None = Field(
        default=None, ge=16, description="Context length; prompts that do not fit are skipped and counted."
    )
    batch_size: int = Field(default=16, ge=1, description="transformers: sequences per generate call.")
    torch_threads: int | None = Field(
        default=None, ge=1,
        description="transformers on CPU: torch threads while the model runs; None: torch's default, one per core "
        "(on the 2-core machine 2 threads were 1.8x faster than 1 when nothing else ran; 1 may win on a busy one).",
    )
    base_url: str | None = Field(
        default=None, description="openai: the server's URL (required); vllm: use this running server."
    )
    api_model: str | None = Field(default=None, description="openai: model name on the server; default model.path.")
    tokenizer: str | None = Field(
        default=None,
        description="openai: local tokenizer for token-id prompts and forced verdicts; default model.path "
        "when it is a local folder, else chat messages are sent.",
    )
    api_key_env: str = Field(default="OPENAI_API_KEY", description="openai: environment variable with the key.")
    vllm_python: str | None = Field(
        default=None, description="vllm: interpreter of vLLM's venv; default $METAREWARD_VLLM_PYTHON or .venv-vllm."
    )
    vllm_args: list[str] = Field(default_factory=list, description="vllm: extra server arguments.")
    gpus: int = Field(default=1, ge=1, description="vllm: servers, one per GPU (one on CPU).")
    max_concurrency: int = Field(default=16, ge=1, description="openai/vllm: requests in flight.")
    max_retries: int = Field(default=5, ge=0, description="openai/vllm: retries on 429/5xx/timeouts.")
    request_timeout_s: float = Field(default=600.0, gt=0, description="openai/vllm: seconds per request.")
    startup_timeout_s: float = Field(default=900.0, gt=0, description="vllm: seconds to wait for readiness.")

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str | None) -> str | None:
        value = _no_password(value, "inference.base_url", "give the key in the variable api_key_env names")
        # Clients add /v1 themselves: "http://host:8000/v1" would become .../v1/v1/completions.
        return value.rstrip("/").removesuffix("/v1") if value else value

    @model_validator(mode="after")
    def _openai_needs_url(self) -> InferenceConfig:
        if self.backend == "openai" and not self.base_url:
            raise ValueError("backend openai needs base_url, e.g. http://127.0.0.1:8000")
        return self


class HealthConfig(_Strict):
    """Checks on an iteration's data before it trains (paper sec. 3.5, 5: score saturation, positional
    bias). A threshold of None disables its check. An empty preference set is on_empty_preferences' case."""

    max_top_score_share: float | None = Field(
        default=0.9, ge=0, le=1, description="Problem when at least this share of valid judge scores is 5."
    )
    max_position_a_share: float | None = Field(
        default=0.9, ge=0, le=1, description="Problem when the meta-judge picks position A at least this often."
    )
    min_parse_rate: float | None = Field(
        default=0.2, ge=0, le=1, description="Problem when fewer judgments than this share have a valid score."
    )
    action: Literal["stop", "warn"] = Field(
        default="stop", description="stop: end the campaign before training; warn: log and go on."
    )


class TrackingConfig(_Strict):
    """MLflow lineage: an experiment per campaign, a run per campaign with a nested run per iteration,
    datasets, figures and the registered checkpoints (metareward/tracking.py)."""

    enabled: bool = Field(default=True, description="Log the campaign to MLflow; false logs nothing.")
    uri: str | None = Field(
        default=None,
        description="MLflow tracking URI without credentials (MLFLOW_TRACKING_URI, read where it is used, overrides "
        "it; MLFLOW_TRACKING_USERNAME/PASSWORD authenticate); default: a sqlite store "
        "{artifact_root}/_mlflow/mlflow.db for a local artifact root, ./mlflow/mlflow.db for an s3:// one.",
    )
    experiment: str | None = Field(default=None, description="Experiment name; default: the campaign name.")
    artifact_location: str | None = Field(
        default=None,
        description="Artifact location of a new experiment; default: beside a local sqlite store, the "
        "server's own for an http(s) tracking URI.",
    )
    registered_model: str | None = Field(
        default=None, description="Registered model of the trained checkpoints; default: the campaign name."
    )

    @field_validator("uri")
    @classmethod
    def _uri_without_password(cls, value: str | None) -> str | None:
        return _no_password(value, "tracking.uri", "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or "
                            "the whole URI in MLFLOW_TRACKING_URI (read where it is used, never stored)")


class OrchestrationConfig(_Strict):
    """How stage jobs run: where the model stages' shards run — in the iteration flow's own process (default),
    or each as a flow run of a Prefect `shard` deployment on a GPU work pool, one engine per worker
    (deployments/prefect.yaml) — and how failed jobs are retried."""

    shard_deployment: str | None = Field(
        default=None,
        description="'FLOW/DEPLOYMENT' (e.g. metareward-shard/shard-gpu) that runs responses, judgments and "
        "meta-judgments shards as separate flow runs; None runs them in-process.",
    )
    shard_poll_interval_s: float = Field(default=5.0, gt=0, description="Seconds between checks of shard flow runs.")
    retries: int = Field(
        default=3, ge=0, description="Retries of a stage job that failed for a reason that can heal (network, "
        "server errors, timeouts, an engine that died); bad input or a missing file is never retried."
    )
    retry_backoff_s: float = Field(
        default=5.0, ge=0, description="Seconds before the first retry; each next one waits twice as long."
    )


class CampaignConfig(_Strict):
    """A whole Meta-Rewarding campaign: seed model, prompts, where artifacts go, and the iterations."""

    name: str = Field(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="Campaign name; part of every artifact path and the MLflow experiment.",
    )
    mode: Mode = Field(
        default="meta_rewarding",
        description="meta_rewarding (paper) or self_rewarding (the paper's baseline: no meta-judge).",
    )
    model: ModelConfig
    prompts: PromptsConfig
    inference: InferenceConfig = Field(default_factory=InferenceConfig, description="Engine and verdict mode.")
    artifact_root: str = Field(
        default="./artifacts", description="Local folder or s3://bucket/prefix for every stage's Parquet "
        "(credentials in the AWS_* variables, never here)."
    )
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow lineage.")
    orchestration: OrchestrationConfig = Field(
        default_factory=OrchestrationConfig, description="In-process shards, or shard flow runs on a work pool."
    )
    seed: int = Field(default=0, ge=0, description="Seed of sampling, tie-breaking and prompt selection.")
    health: HealthConfig = Field(default_factory=HealthConfig, description="Checks before each training.")
    on_empty_preferences: Literal["stop", "keep_model"] = Field(
        default="stop",
        description="When an iteration yields no trainable pair: stop the campaign with a message, or keep "
        "M_t as M_{t+1} and go on.",
    )
    shard_size: int = Field(default=256, ge=1, description="Prompts per shard of every model stage.")
    iterations: list[IterationConfig] = Field(
        min_length=1, description="The iterations, in order (paper: 4, see A.3)."
    )

    @field_validator("artifact_root")
    @classmethod
    def _root_without_password(cls, value: str) -> str:
        return _no_password(value, "artifact_root", "put S3 credentials in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")

    @model_validator(mode="after")
    def _judge_training_follows_mode(self) -> CampaignConfig:
        for index, iteration in enumerate(self.iterations):
            if iteration.train_judge is None:
                iteration.train_judge = self.mode == "meta_rewarding"
            elif iteration.train_judge and self.mode == "self_rewarding":
                raise ValueError(
                    f"iterations[{index}].train_judge is true but mode is self_rewarding, which has no "
                    "meta-judge to make judge pairs: set train_judge: false or mode: meta_rewarding"
                )
        return self

    @classmethod
    def from_yaml(cls, path: str | Path) -> CampaignConfig:
        """Load and validate a YAML file; raise ConfigError naming the file, the field and the fix."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such config file") from None
        except IsADirectoryError:
            raise ConfigError(f"{path}: a folder, not a config file (give the campaign's YAML file)") from None
        except UnicodeDecodeError as error:
            raise ConfigError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML: {error}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of campaign settings, got {type(data).__name__}")
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "<config>") -> CampaignConfig:
        """Validate a plain mapping; raise ConfigError with one line per invalid field."""
        try:
            return cls.model_validate(data)
        except ValidationError as error:
            raise ConfigError(_describe(error, source)) from None

    def with_environment(self, environ: dict[str, str] | None = None) -> CampaignConfig:
        """A copy with METAREWARD_ARTIFACT_ROOT (when set) as artifact_root, validated like the config's own.
        Settings that may carry credentials are not copied: MLFLOW_TRACKING_URI, the AWS_* variables and the
        openai backend's key are read from the environment where they are used, and PREFECT_API_URL by Prefect,
        so they never reach Prefect's parameters, MLflow or the artifact store. Raises ConfigError."""
        environ = os.environ if environ is None else environ
        if not environ.get("METAREWARD_ARTIFACT_ROOT"):
            return self
        return CampaignConfig.from_dict({**self.model_dump(), "artifact_root": environ["METAREWARD_ARTIFACT_ROOT"]},
                                        source="METAREWARD_ARTIFACT_ROOT")

    def to_yaml(self) -> str:
        """The config as YAML that from_yaml reads back to an equal object (every default written out)."""
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False, allow_unicode=True)


def _describe(error: ValidationError, source: str) -> str:
    lines = [f"{source}: {error.error_count()} invalid setting(s)"]
    for item in error.errors():
        field = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in item["loc"]).lstrip(".")
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown setting: remove it or fix its spelling"
        lines.append(f"  {field or '(top level)'}: {message}")
    return "\n".join(lines)
