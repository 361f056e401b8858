"""MLflow model lineage: logged models M_1, M_2, … of a campaign, each naming its parent and training datasets, and
a registered-model version per trained checkpoint; plus the redaction every MLflow write goes through."""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path
from typing import Any

import polars as pl

from metareward.stages import STAGES

TAG = "metareward"
"""Prefix of every MLflow tag this project sets."""

_SECRET_KEY = re.compile(r"(password|secret|token|credential)", re.IGNORECASE)
_URL_USERINFO = re.compile(r"(?P<scheme>[a-z][a-z0-9+.-]*://)[^/@\s]+@", re.IGNORECASE)
_PARAM_VALUE_LIMIT = 6000


def redact(text: str) -> str:
    """The text with any URL's user:password replaced by ***."""
    return _URL_USERINFO.sub(r"\g<scheme>***@", text)


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
                   curves: pl.DataFrame, parent_uri: str, dpo: dict[str, Any]) -> None:
        """M_t as the iteration run's input model; unless the iteration kept M_t, M_{t+1} (from the checkpoint
        stage's manifest) as its output model with its parent, training datasets and DPO settings, its final
        training metrics linked to it and the DPO dataset, and a registered version."""
        from mlflow.entities import LoggedModelInput, LoggedModelOutput

        stats = checkpoint["stats"]
        parent_digest = checkpoint["model_id"]
        parent = self.logged_model(parent_digest, parent_uri, f"{self.campaign}-M{iteration}")
        self.client.log_inputs(run_id, models=[LoggedModelInput(parent.model_id)])
        if stats.get("kept_previous_model"):
            self.client.set_tag(run_id, f"{TAG}.kept_previous_model", "true")
            return
        lineage = [{key: datasets[name][key] for key in ("name", "digest", "source")}
                   for name in TRAINING_STAGES if name in datasets]
        child = self.logged_model(
            stats["model_id"], stats["model_uri"], f"{self.campaign}-M{iteration + 1}", source_run_id=run_id,
            params=flatten_params(dpo, "dpo."),
            tags={f"{TAG}.parent_model_id": parent.model_id, f"{TAG}.parent_model_digest": parent_digest,
                  f"{TAG}.parent_model_uri": redact(parent_uri), f"{TAG}.training_datasets": json.dumps(lineage)})
        self.client.log_outputs(run_id, [LoggedModelOutput(child.model_id, step=iteration)])
        if curves.height and "dpo_dataset" in datasets:
            last = curves.sort("step").row(-1, named=True)
            for column, value in last.items():
                if column != "step" and value is not None:
                    self.client.log_metric(run_id, f"final/{column}", float(value), step=iteration,
                                           model_id=child.model_id, dataset_name=datasets["dpo_dataset"]["name"],
                                           dataset_digest=datasets["dpo_dataset"]["digest"])
        self._register(run_id, child, parent_digest, parent_uri, lineage)

    def logged_model(self, digest: str, uri: str, name: str, source_run_id: str | None = None,
                     params: dict[str, str] | None = None, tags: dict[str, str] | None = None):
        """The experiment's logged model of the checkpoint with this content digest, created (with a
        `checkpoint.json` artifact pointing at the artifact store) when there is none yet."""
        from mlflow.entities import LoggedModelStatus

        found = self.client.search_logged_models(
            [self.experiment_id], filter_string=f"tags.`{TAG}.model_digest` = '{digest}'", max_results=1)
        if found:
            return found[0]
        model = self.client.create_logged_model(
            self.experiment_id, name=name, source_run_id=source_run_id, params=params, model_type="causal-lm",
            tags={f"{TAG}.model_digest": digest, f"{TAG}.model_uri": redact(uri), **(tags or {})})
        with tempfile.TemporaryDirectory() as folder:
            pointer = {"model_uri": redact(uri), "model_digest": digest, "campaign": self.campaign,
                       "load": "metareward.models.resolve_model(model_uri) gives a local Hugging Face folder"}
            (Path(folder) / "checkpoint.json").write_text(json.dumps(pointer, indent=2))
            self.client.log_model_artifacts(model.model_id, folder)
        self.client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
        return model

    def _register(self, run_id: str, model, parent_digest: str, parent_uri: str, lineage: list[dict]) -> None:
        from mlflow.exceptions import MlflowException

        name = self.registered_model
        if self.client.search_model_versions(f"name = '{name}' AND run_id = '{run_id}'"):
            return
        try:
            self.client.create_registered_model(name, description=f"Checkpoints of the Meta-Rewarding campaign "
                                                                  f"{self.campaign}, one version per iteration")
        except MlflowException as error:
            if "already exists" not in str(error):
                raise
        parent_versions = self.client.search_model_versions(
            f"name = '{name}' AND tags.`{TAG}.model_digest` = '{parent_digest}'")
        parent_version = parent_versions[0].version if parent_versions else ""
        self.client.create_model_version(
            name, source=f"models:/{model.model_id}", run_id=run_id, model_id=model.model_id,
            description=f"Trained from {'version ' + str(parent_version) if parent_version else redact(parent_uri)} "
                        f"on {', '.join(d['name'] for d in lineage)}",
            tags={f"{TAG}.model_digest": model.tags[f"{TAG}.model_digest"],
                  f"{TAG}.model_uri": model.tags[f"{TAG}.model_uri"],
                  f"{TAG}.parent_model_version": str(parent_version),
                  f"{TAG}.parent_model_uri": redact(parent_uri), f"{TAG}.training_datasets": json.dumps(lineage)})
