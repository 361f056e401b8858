"""The sections of a campaign's config that say how it runs rather than what it computes — the inference engine,
health checks, MLflow tracking, orchestration — and what every section shares: strict fields, no passwords."""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class ConfigError(ValueError):
    """A campaign configuration that cannot be used; the message names the file, the field and the fix."""


URL_PASSWORD = re.compile(r"^[a-z][a-z0-9+.-]*://[^/@\s]*:[^/@\s]*@", re.IGNORECASE)


def no_password(value: str | None, where: str, instead: str) -> str | None:
    """Refuse a URL with a user:password in it: a config travels to Prefect, MLflow and the artifact store."""
    if value is not None and URL_PASSWORD.match(value):
        raise ValueError(f"{where} holds a password, and a config is stored with every run: {instead}")
    return value


_URL_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.IGNORECASE)


def redact(text: str) -> str:
    """The text with any URL's user:password replaced by ***."""
    return _URL_USERINFO.sub(r"\g<scheme>***@", text)


_PRIMITIVES = {"string", "integer", "number", "boolean", "array"}


def form_schema(schema: dict) -> None:
    """A section's JSON schema as Prefect's run form shows it: an optional setting whose default is None is a plain
    field that may be left empty (its absence is None), not a choice between its type and "None"."""
    for field in schema.get("properties", {}).values():
        options = field.get("anyOf", [])
        kinds = [option for option in options if option.get("type") != "null"]
        if field.get("default", ...) is None and len(options) == 2 and len(kinds) == 1 and (
                kinds[0].get("type") in _PRIMITIVES):
            field.pop("anyOf")
            field.pop("default")
            field.update(kinds[0])


class Strict(BaseModel):
    """A config section: a misspelt field is an error, not a silently ignored setting; an optional setting left
    empty in a form ("") is None."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, json_schema_extra=form_schema)

    @model_validator(mode="before")
    @classmethod
    def _empty_is_none(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        optional = {name for name, field in cls.model_fields.items() if field.default is None}
        return {key: None if key in optional and value == "" else value for key, value in data.items()}


def _inference_schema(schema: dict) -> None:
    form_schema(schema)
    schema["if"] = {"properties": {"backend": {"const": "openai"}}, "required": ["backend"]}
    schema["then"] = {"required": ["base_url"]}


class InferenceConfig(Strict):
    """Which engine plays the three roles, and how (DESIGN.md, Inference)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, json_schema_extra=_inference_schema)

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
    tensor_parallel_size: int = Field(
        default=1, ge=1,
        description="vllm: GPUs per engine replica, vLLM's --tensor-parallel-size (a replica's GPUs are on one node).",
    )
    replicas: int | None = Field(
        default=None, ge=1,
        description="vllm: engine replicas serving the same model (vLLM's --data-parallel-size on one node, with its "
        "own load balancing); None: the visible GPUs ÷ tensor_parallel_size (one on CPU).",
    )
    max_concurrency: int = Field(default=16, ge=1, description="openai/vllm: requests in flight.")
    max_retries: int = Field(default=5, ge=0, description="openai/vllm: retries on 429/5xx/timeouts.")
    request_timeout_s: float = Field(default=600.0, gt=0, description="openai/vllm: seconds per request.")
    startup_timeout_s: float = Field(default=900.0, gt=0, description="vllm: seconds to wait for readiness.")

    @model_validator(mode="before")
    @classmethod
    def _gpus_is_gone(cls, data: Any) -> Any:
        if isinstance(data, dict) and "gpus" in data:
            raise ValueError(f"inference.gpus ({data['gpus']}) is replaced by inference.replicas (engine replicas) and "
                             "inference.tensor_parallel_size (GPUs per replica): write replicas: "
                             f"{data['gpus']} for one GPU per engine as before")
        return data

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, value: str | None) -> str | None:
        value = no_password(value, "inference.base_url", "give the key in the variable api_key_env names")
        # Clients add /v1 themselves: "http://host:8000/v1" would become .../v1/v1/completions.
        return value.rstrip("/").removesuffix("/v1") if value else value

    @model_validator(mode="after")
    def _openai_needs_url(self) -> InferenceConfig:
        if self.backend == "openai" and not self.base_url:
            raise ValueError("backend openai needs base_url, e.g. http://127.0.0.1:8000")
        return self


HealthChoice = Literal["continue", "drop_judge_pairs", "keep_model", "stop"]
"""What a person (or health.on_timeout) may decide when an iteration's health checks fail."""


class HealthConfig(Strict):
    """Checks on an iteration's data before it trains (paper sec. 3.5, 5: score saturation, positional
    bias), what happens when one fails, and the judge audit every iteration publishes. A threshold of None disables
    its check. An empty preference set is on_empty_preferences' case."""

    max_top_score_share: float | None = Field(
        default=0.9, ge=0, le=1, description="Problem when at least this share of valid judge scores is 5."
    )
    max_position_a_share: float | None = Field(
        default=0.9, ge=0, le=1, description="Problem when the meta-judge picks position A at least this often."
    )
    min_parse_rate: float | None = Field(
        default=0.2, ge=0, le=1, description="Problem when fewer judgments than this share have a valid score."
    )
    action: Literal["stop", "warn", "ask"] = Field(
        default="stop",
        description="stop: end the campaign before training; warn: log and go on; ask: pause the iteration (its "
        "engines released) until a person decides in the Prefect UI's form, or on the terminal of a `metareward "
        "run` attached to one (decisions: continue, drop_judge_pairs, keep_model, stop).",
    )
    ask_timeout_s: float | None = Field(
        default=86400.0, gt=0,
        description="With action ask: how long to wait for a decision before on_timeout applies; None waits for "
        "ever, and a top-level run of a deployment then suspends (its process exits until resumed).",
    )
    on_timeout: HealthChoice = Field(
        default="stop",
        description="With action ask: the decision when nobody answers within ask_timeout_s, or at once when "
        "nobody can be asked (no Prefect server and no terminal).",
    )
    audit_samples: int = Field(
        default=8, ge=0,
        description="Prompts (a seeded sample) in each iteration's judge audit: responses, judge scores and "
        "reasoning, the meta-judged response's verdicts and Elo; 0: no audit.",
    )


class TrackingConfig(Strict):
    """MLflow lineage: an experiment per campaign, a run per campaign with a nested run per iteration,
    datasets, figures and the registered checkpoints (metareward/tracking/tracker.py)."""

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
        return no_password(value, "tracking.uri", "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or "
                            "the whole URI in MLFLOW_TRACKING_URI (read where it is used, never stored)")


class OrchestrationConfig(Strict):
    """How stage jobs run: where the model stages' jobs run — in the iteration flow's own process (default), on the
    engine replicas of a Ray cluster (ray_address), or each shard as a flow run of a Prefect `shard` deployment on a
    GPU work pool, one engine per worker (deployments/prefect.yaml) — and how failed jobs are retried."""

    shard_deployment: str | None = Field(
        default=None,
        description="'FLOW/DEPLOYMENT' (e.g. metareward-shard/shard-gpu) that runs responses, judgments and "
        "meta-judgments shards as separate flow runs; None runs them in-process.",
    )
    shard_poll_interval_s: float = Field(default=5.0, gt=0, description="Seconds between checks of shard flow runs.")
    shard_timeout_s: float = Field(
        default=86400.0, gt=0,
        description="Seconds a stage waits for its shard flow runs (shard_deployment) before it cancels those not "
        "finished (a GPU node that stays NotReady, a worker that never picks the run up) and fails, to be retried.",
    )
    ray_address: str | None = Field(
        default=None,
        description="Ray cluster (ray://host:10001, host:6379 or auto) whose engine replicas run the model stages' "
        "jobs, a free replica taking the next shard; None: RAY_ADDRESS from the environment, and without it no Ray "
        "(the jobs run in this process).",
    )
    placement_timeout_s: float = Field(
        default=600.0, gt=0,
        description="Ray: seconds to wait for the cluster to place every engine replica, or every worker of a "
        "training gang, before the stage fails saying which GPUs are missing.",
    )
    training_max_failures: int = Field(
        default=3, ge=0,
        description="Ray: how many times a training gang that lost a worker (node removed, process killed, spot "
        "reclaim) restarts from its last checkpoint before the training job fails (Ray Train's "
        "FailureConfig.max_failures, and max_preemption_failures for reclaimed nodes).",
    )
    retries: int = Field(
        default=3, ge=0, description="Retries of a stage job that failed for a reason that can heal (network, "
        "server errors, timeouts, an engine that died); bad input or a missing file is never retried."
    )
    retry_backoff_s: float = Field(
        default=5.0, ge=0, description="Seconds before the first retry; each next one waits twice as long."
    )
    lease_ttl_s: float = Field(
        default=120.0, gt=0,
        description="Seconds the campaign's lease ({artifact_root}/{campaign}/_lease.json) outlives its last renewal: "
        "the run that holds it renews it every third of this; another run of the campaign is refused until it "
        "expires, and takes it over then (its holder died). Hosts' clocks must agree well within it.",
    )
    lease_wait_s: float = Field(
        default=0.0, ge=0,
        description="Seconds a run waits for the campaign's lease while another run holds it, before it stops "
        "naming that run; 0 stops at once.",
    )

    @model_validator(mode="after")
    def _one_placement(self) -> OrchestrationConfig:
        if self.ray_address and self.shard_deployment:
            raise ValueError("ray_address and shard_deployment both place the model stages' shards: set one")
        return self
