"""The whole campaign as one validated pydantic object: YAML in, YAML out, the paper's defaults as ours."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from metareward.config.schedule import PaperScheduleWarning, schedule_departures
from metareward.config.sections import (  # noqa: F401 (ConfigError is imported from here)
    ConfigError,
    HealthConfig,
    InferenceConfig,
    OrchestrationConfig,
    Strict,
    TrackingConfig,
    form_schema,
    no_password,
    redact,
)
from metareward.config.training import DPOConfig, SFTConfig, TrainingConfig  # noqa: F401 (imported from here)

_CREDENTIAL_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_USERNAME",
                         "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN", "PREFECT_API_AUTH_STRING",
                         "PREFECT_API_KEY")


Mode = Literal["meta_rewarding", "self_rewarding"]
Dtype = Literal["auto", "float32", "bfloat16", "float16"]


class ModelConfig(Strict):
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


class PromptsConfig(Strict):
    """Where the instruction prompts x come from (paper sec. 3.1: 20,000 generated prompts)."""

    path: str = Field(description="JSONL, Parquet or CSV file with one prompt per row.")
    column: str = Field(default="prompt", description="Name of the column that holds the prompt text.")


class SamplingConfig(Strict):
    """Sampling parameters of one role (paper sec. 3.1: temperature 0.8, top_p 0.95)."""

    temperature: float = Field(default=0.8, ge=0.0, description="Sampling temperature (paper: 0.8).")
    top_p: float = Field(default=0.95, gt=0.0, le=1.0, description="Nucleus sampling mass (paper: 0.95).")
    max_tokens: int = Field(
        default=1024, ge=1, description="Most new tokens per completion (not stated in the paper)."
    )


class IterationConfig(Strict):
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
        description="ρ, quality-tier parameter of length control (paper sec. 2.1), in [0, 0.5); 0 disables it.",
        # In the schema too, so that Prefect's run form refuses 0.6 before a run starts; the validator below
        # gives the same rule its explanation.
        json_schema_extra={"minimum": 0, "exclusiveMaximum": 0.5},
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
    # Ablations of the meta-judge step (defaults: the paper, sec. 2.2).
    positional_weights: bool = Field(
        default=True,
        description="Weight a battle won in the first position by ω1 = win_2nd/(win_1st+win_2nd) and one won in "
        "the second by ω2 (paper sec. 2.2); false: ω1 = ω2 = ½. Applies to battle_rule weighted.",
    )
    battle_rule: Literal["weighted", "both_orders_agree", "both_orders_or_tie"] = Field(
        default="weighted",
        description="weighted (paper): each order's verdict is a weighted win; both_orders_agree: a judgment wins a "
        "battle only when it wins in both orders, and a split (each won one order) counts for neither; "
        "both_orders_or_tie (NeMo-Aligner's self-rewarding trainer): the same, but a split is a tie, one win each way.",
    )
    meta_judge_sees_scores: bool = Field(
        default=True,
        description="Show the meta-judge whole judgments (paper); false: each judgment without its 'Score: X' line, "
        "so the meta-judge weighs the reasoning, not the number.",
    )
    meta_judged_responses: Literal["highest_variance", "all"] = Field(
        default="highest_variance",
        description="Which responses' judgments the meta-judge compares and judge pairs come from: the one with the "
        "highest score variance per prompt (paper sec. 2.2), or all (K times the meta-judge calls).",
    )

    @field_validator("rho")
    @classmethod
    def _rho_in_range(cls, value: float) -> float:
        if not 0.0 <= value < 0.5:
            raise ValueError(
                f"ρ must be in [0, 0.5) so that the top and bottom quality tiers do not overlap "
                f"(paper sec. 2.1), got {value}: use e.g. 0 (no length control) or 0.32"
            )
        return value


class EvaluatorConfig(Strict):
    """The fixed model that compares two answers with the paper's A.2 prompt (AlpacaEval's
    alpaca_eval_clf_gpt4_turbo): local weights run by an engine, or a model served over HTTP."""

    model: ModelConfig | None = Field(
        default=None,
        description="The evaluator's weights (folder, hub id, builtin:…); their content digest names the evaluator "
        "in cache keys and in MLflow. Leave empty for an endpoint whose weights you do not have (named by "
        "inference.api_model).",
    )
    inference: InferenceConfig = Field(
        default_factory=lambda: InferenceConfig(verdict_mode="forced"),
        description="How the evaluator runs: transformers, vllm, or openai (base_url, api_model). verdict_mode "
        "forced reads the next-token probabilities of m and M (AlpacaEval 2's weighted annotator: the preference is "
        "the trained answer's share); free parses the evaluator's text.",
    )
    max_tokens: int = Field(
        default=16, ge=1, description="Free verdicts: most tokens of the evaluator's answer (one identifier asked)."
    )
    allow_trained_model: bool = Field(
        default=False,
        description="Allow an evaluator that is M_t or M_{t+1}, the model this iteration trains (it would judge its "
        "own answers); off by default.",
    )

    @model_validator(mode="after")
    def _named(self) -> EvaluatorConfig:
        if self.model is None and not (self.inference.backend == "openai" and self.inference.api_model):
            raise ValueError("the evaluator needs model (its weights) or, for an endpoint, inference.backend openai "
                             "with base_url and api_model")
        return self


class EvaluationConfig(Strict):
    """Win rate of M_{t+1} against a reference on held-out prompts, after every iteration's training: both
    orders, identical answers ½, AlpacaEval 2's win rate, standard error and length-controlled win rate
    (paper.win_rate), with our bootstrap 95% CIs."""

    prompts: PromptsConfig = Field(
        description="Held-out prompts (JSONL, Parquet or CSV); none may be a training prompt (checked before a run)."
    )
    num_prompts: int | None = Field(
        default=None, ge=1, description="Prompts evaluated, a seeded sample of the file; None: all."
    )
    reference: Literal["previous", "seed", "outputs"] = Field(
        default="previous",
        description="What M_{t+1} is compared with: previous (M_t), seed (M_1), or outputs (reference_outputs).",
    )
    reference_outputs: str | None = Field(
        default=None,
        description="reference outputs: a file of fixed answers with columns instruction and output (AlpacaEval's "
        "model outputs JSON, or JSONL/Parquet/CSV), one for every evaluated prompt.",
    )
    sampling: SamplingConfig = Field(
        default_factory=SamplingConfig,
        description="How the compared models answer (default: the paper's actor sampling; its evaluation "
        "sampling is not stated).",
    )
    evaluator: EvaluatorConfig = Field(description="The fixed model that picks the better answer.")
    bootstrap: int = Field(default=1000, ge=1, description="Bootstrap resamples of prompts for the 95% CIs.")

    @model_validator(mode="after")
    def _reference_given(self) -> EvaluationConfig:
        if (self.reference == "outputs") != (self.reference_outputs is not None):
            raise ValueError("set reference_outputs exactly when reference is outputs (the file of reference answers)")
        return self


def _campaign_schema(schema: dict) -> None:
    form_schema(schema)
    # The cross-field rule a JSON schema can state, so Prefect refuses it before a run starts: the baseline
    # (self_rewarding) has no meta-judge, so no iteration trains the judge.
    schema["if"] = {"properties": {"mode": {"const": "self_rewarding"}}, "required": ["mode"]}
    schema["then"] = {
        "properties": {"iterations": {"items": {"properties": {"train_judge": {"not": {"const": True}}}}}}
    }


class CampaignConfig(Strict):
    """A whole Meta-Rewarding campaign: seed model, prompts, where artifacts go, and the iterations."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, json_schema_extra=_campaign_schema)

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
    sft: SFTConfig | None = Field(
        default=None,
        description="Stage 0: supervised fine-tuning of model.path on judge data into M_1 (paper: SFT on EFT); "
        "None: model.path is M_1.",
    )
    evaluation: EvaluationConfig | None = Field(
        default=None, description="Win rate of every trained model on held-out prompts; None: no evaluation."
    )

    @field_validator("artifact_root")
    @classmethod
    def _root_without_password(cls, value: str) -> str:
        return no_password(value, "artifact_root", "put S3 credentials in AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY")

    @model_validator(mode="after")
    def _warn_where_defaults_leave_the_paper(self) -> CampaignConfig:
        # Before _judge_training_follows_mode, which fills in train_judge: unset is still None here.
        departures = schedule_departures(self.mode, self.iterations)
        if departures:
            warnings.warn(PaperScheduleWarning(
                f"campaign {self.name}: settings left at a default that is not the paper's schedule (A.3); set them "
                "(to the paper's value, or to keep the default) and this warning goes:\n  " + "\n  ".join(departures)),
                stacklevel=2)
        return self

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

    def setting_sources(self, environ: dict[str, str] | None = None) -> list[str]:
        """One line per deployment setting: its value and where it came from (the config or the variable that
        overrides it), for a run's log. Secrets appear by variable name only, URLs without user:password."""
        environ = os.environ if environ is None else environ

        def origin(variable: str, config_value: str | None, what: str, default: str) -> str:
            if environ.get(variable):
                return f"{what}: {redact(environ[variable])} (from ${variable})"
            if config_value:
                return f"{what}: {redact(config_value)} (from the config)"
            return f"{what}: {default}"

        lines = [
            origin("METAREWARD_ARTIFACT_ROOT", self.artifact_root, "artifact root", ""),
            origin("MLFLOW_TRACKING_URI", self.tracking.uri, "MLflow tracking URI",
                   "a sqlite store beside the artifacts (neither $MLFLOW_TRACKING_URI nor tracking.uri set)"),
            "Ray cluster: " + (f"{self.orchestration.ray_address} (from the config)" if self.orchestration.ray_address
                               else f"{environ['RAY_ADDRESS']} (from $RAY_ADDRESS)" if environ.get("RAY_ADDRESS")
                               else "none (the model stages and training run in this process)"),
            origin("AWS_ENDPOINT_URL_S3", None, "S3 endpoint", "AWS's own (no $AWS_ENDPOINT_URL_S3)"),
            origin("PREFECT_API_URL", None, "Prefect API", "an ephemeral local API (no $PREFECT_API_URL)"),
        ]
        secrets = [name for name in _CREDENTIAL_VARIABLES + ((self.inference.api_key_env,)
                                                             if self.inference.api_key_env else ())
                   if environ.get(name)]
        lines.append("credentials from the environment: " + (", ".join(f"${name}" for name in secrets) or "none"))
        return lines

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
