"""MLflow model lineage: logged models M_1, M_2, … of a campaign — each describing its parent (a link) and its
training sets; with a seed SFT, M_1's parent is the base model — and a registered-model version per model, version
t = M_t (alias m{t}), linked both ways the way mlflow.register_model links them; plus the redaction every MLflow
write goes through."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

from metareward.config.sections import redact
from metareward.pipeline.stages import STAGES

TAG = "metareward"
"""Prefix of every MLflow tag this project sets."""

NOTE = "mlflow.note.content"
"""The tag MLflow renders (markdown) as a run's, a logged model's or an experiment's description."""

_SECRET_KEY = re.compile(r"(password|secret|token|credential)", re.IGNORECASE)
_PARAM_VALUE_LIMIT = 6000


def flatten_params(value: Any, prefix: str = "") -> dict[str, str]:
    """A nested config as flat MLflow params ("iterations.0.dpo.beta" → "0.1"): URLs lose any user:password,
    keys that name a secret are left out, values are cut to MLflow's 6,000 characters."""
    flat: dict[str, str] = {}
    if isinstance(value, dict):
        for key, item in value.items():
            if not _SECRET_KEY.search(str(key)):
                flat.update(flatten_params(item, f"{prefix}{key}."))
    elif isinstance(value, list) and value and all(isinstance(item, dict) for item in value):
        for index, item in enumerate(value):
            flat.update(flatten_params(item, f"{prefix}{index}."))
    else:
        text = redact(json.dumps(value) if isinstance(value, list) else str(value))
        flat[prefix.rstrip(".")] = text[:_PARAM_VALUE_LIMIT]
    return flat


TRAINING_STAGES = tuple(stage.name for stage in STAGES if stage.dataset_context == "training")
"""The stages whose tables a trained checkpoint names as its training datasets."""


class ModelLineage:
    """Logged and registered models of one campaign in one experiment (explicit ids, no fluent state)."""

    def __init__(self, client, experiment_id: str, campaign: str, registered_model: str):
        self.client = client
        self.experiment_id = experiment_id
        self.campaign = campaign
        self.registered_model = registered_model

    def log_models(self, run_id: str, iteration: int, checkpoint: dict, datasets: dict[str, dict[str, Any]],
                   parent_uri: str, training: dict[str, Any]):
        """M_t as the iteration run's input model (registered as version t when it is not yet, as the seed
        M_1 is on the first iteration), and — unless the iteration kept M_t — M_{t+1} from the checkpoint
        stage's manifest as the run's output model: its parent, training datasets and settings, a
        description linking them, and its registered version. Iteration 0 is the seed's SFT: its input is the
        base model (logged, not registered) and its output M_1, version 1. Returns the output's logged model,
        or None."""
        from mlflow.entities import LoggedModelInput, LoggedModelOutput

        stats = checkpoint["stats"]
        parent_digest = checkpoint["model_id"]
        if iteration == 0:
            parent = self.logged_model(parent_digest, parent_uri, f"{self.campaign}-base", description=(
                f"The base model of the Meta-Rewarding campaign {self.campaign}: `{redact(parent_uri)}` (content "
                f"digest `{parent_digest}`), fine-tuned on judge data into M_1."))
            parent_version = None
        else:
            parent = self.logged_model(parent_digest, parent_uri, f"{self.campaign}-M{iteration}", description=(
                f"**M_{iteration}** of the Meta-Rewarding campaign {self.campaign}: `{redact(parent_uri)}` (content "
                f"digest `{parent_digest}`)" + (", the seed model." if iteration == 1 else ".")))
            parent_version = self.register(parent, iteration, run_id=None)
        self.client.log_inputs(run_id, models=[LoggedModelInput(parent.model_id)])
        if stats.get("kept_previous_model"):
            self.client.set_tag(run_id, f"{TAG}.kept_previous_model", "true")
            return None
        lineage = [{key: datasets[name][key] for key in ("name", "digest", "source", "rows")}
                   for name in TRAINING_STAGES if name in datasets]
        trained_on = "; ".join(f"`{d['name']}` ({d['rows']} rows)" for d in lineage)
        how = ("by SFT in [the seed stage]" if iteration == 0 else f"by DPO in [iteration {iteration}]")
        parent_link = f"[{parent.name}](#/experiments/{self.experiment_id}/models/{parent.model_id})" + (
            f" (registered version {parent_version})" if parent_version else "")
        child = self.logged_model(
            stats["model_id"], stats["model_uri"], f"{self.campaign}-M{iteration + 1}", source_run_id=run_id,
            params=flatten_params(training, "sft." if iteration == 0 else "dpo."),
            tags={f"{TAG}.parent_model_id": parent.model_id, f"{TAG}.parent_model_digest": parent_digest,
                  f"{TAG}.parent_model_uri": redact(parent_uri), f"{TAG}.training_datasets": json.dumps(lineage)},
            description=(
                f"**M_{iteration + 1}** of the Meta-Rewarding campaign {self.campaign}, trained {how}"
                f"(#/experiments/{self.experiment_id}/runs/{run_id}) from {parent_link} on {trained_on}. "
                f"Weights: `{redact(stats['model_uri'])}`."))
        # An attempt an outage cut short may have linked it already, and MLflow refuses the same link twice.
        outputs = self.client.get_run(run_id).outputs
        if child.model_id not in {output.model_id for output in (outputs.model_outputs if outputs else [])}:
            self.client.log_outputs(run_id, [LoggedModelOutput(child.model_id, step=iteration)])
        self.register(child, iteration + 1, run_id=run_id, parent_version=parent_version)
        return child

    def logged_model(self, digest: str, uri: str, name: str, source_run_id: str | None = None,
                     params: dict[str, str] | None = None, tags: dict[str, str] | None = None,
                     description: str | None = None):
        """The experiment's logged model of the checkpoint with this content digest, created (with its
        description and a `checkpoint.json` artifact pointing at the artifact store) when there is none yet, and
        completed when an earlier attempt created it but did not finish it (READY once returned)."""
        from mlflow.entities import LoggedModelStatus

        found = self.client.search_logged_models(
            [self.experiment_id], filter_string=f"tags.`{TAG}.model_digest` = '{digest}'", max_results=1)
        if found and found[0].status == LoggedModelStatus.READY:
            return found[0]
        model = found[0] if found else self.client.create_logged_model(
            self.experiment_id, name=name, source_run_id=source_run_id, params=params, model_type="causal-lm",
            tags={f"{TAG}.model_digest": digest, f"{TAG}.model_uri": redact(uri), **(tags or {}),
                  **({NOTE: description} if description else {})})
        with tempfile.TemporaryDirectory() as folder:
            pointer = {"model_uri": redact(uri), "model_digest": digest, "campaign": self.campaign,
                       "load": "metareward.training.models.resolve_model(model_uri) gives a local Hugging Face folder"}
            (Path(folder) / "checkpoint.json").write_text(json.dumps(pointer, indent=2))
            self.client.log_model_artifacts(model.model_id, folder)
        self.client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
        return model

    def register(self, model, index: int, run_id: str | None, parent_version: str | None = None) -> str:
        """The registered version of a logged model M_index, created when there is none (alias m{index}, tags
        naming its parent version, the logged model's mlflow.modelVersions tag pointing back as
        mlflow.register_model sets it; both set again when found, as an earlier attempt may have stopped before).
        Returns its version."""
        name = self.registered_model
        digest = model.tags[f"{TAG}.model_digest"]
        existing = self.client.search_model_versions(f"name = '{name}' AND tags.`{TAG}.model_digest` = '{digest}'")
        version = str(existing[0].version) if existing else self._new_version(model, index, run_id, parent_version)
        self.client.set_registered_model_alias(name, f"m{index}", version)
        linked = json.loads(model.tags.get("mlflow.modelVersions", "[]"))
        if {"name": name, "version": version} not in linked:
            self.client.set_logged_model_tags(model.model_id, {"mlflow.modelVersions": json.dumps(
                linked + [{"name": name, "version": version}])})
        return version

    def _new_version(self, model, index: int, run_id: str | None, parent_version: str | None) -> str:
        """A new version of the registered model (created first when there is none) for logged model M_index."""
        from mlflow.exceptions import MlflowException

        name = self.registered_model
        try:
            self.client.create_registered_model(name, description=(
                f"Checkpoints of the Meta-Rewarding campaign {self.campaign}: version t is M_t (alias m{{t}}), "
                "version 1 the seed model M_1."))
        except MlflowException as error:
            if "already exists" not in str(error):
                raise
        origin = (f"trained in iteration {index - 1} from version {parent_version}" if parent_version
                  else "the seed SFT's model, trained from the base model" if index == 1 and run_id
                  else "the model the campaign started from")
        version = self.client.create_model_version(
            name, source=f"models:/{model.model_id}", run_id=run_id, model_id=model.model_id,
            description=f"M_{index} of {self.campaign}, {origin}.",
            tags={f"{TAG}.model_digest": model.tags[f"{TAG}.model_digest"],
                  f"{TAG}.model_uri": model.tags[f"{TAG}.model_uri"], f"{TAG}.iteration_model": f"M_{index}",
                  f"{TAG}.parent_model_version": parent_version or "",
                  **({f"{TAG}.training_datasets": model.tags[f"{TAG}.training_datasets"]}
                     if f"{TAG}.training_datasets" in model.tags else {})})
        return str(version.version)
