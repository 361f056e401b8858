"""MLflow lineage of a campaign: experiment, campaign and iteration runs, datasets, metrics, figures, models.

Layout in MLflow (one experiment per campaign):

- a **campaign run** (tag `metareward.kind=campaign`) with the flattened config as params and the per-stage
  metrics of every iteration at step = iteration, so iterations compare as curves;
- a nested **iteration run** per iteration (`metareward.kind=iteration`) with its settings as params, its
  stage and evaluation metrics, TRL's training curves (`train/…`), every stage table as a dataset input
  (source = its URI in the artifact store, digest = its Parquet digest; contexts generation, evaluation,
  training), the score-distribution figure, M_t as its input model and M_{t+1} as its output model;
- **logged models** M_1, M_2, … (tags: content digest and artifact-store URI; M_{t+1} names its parent and
  training datasets) and a **registered model** version per trained checkpoint, whose tags point at the
  parent version: model t → its source run → its datasets and input model t−1.

Everything is read back from the artifact store (stage manifests and tables), so logging is idempotent:
runs are found again by their tags, an iteration already logged completely is skipped, and a resumed
campaign continues the same runs instead of creating new ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import polars as pl

from metareward.config import CampaignConfig
from metareward.lineage import TAG, ModelLineage, flatten_params, redact
from metareward.manifests import read_stage_table, stage_manifests
from metareward.report import iteration_report, score_distribution_figure
from metareward.stages import stage
from metareward.store import open_store
from metareward.tables import file_digest


class TrackingError(RuntimeError):
    """The MLflow tracking server or store cannot be used; the message names the URI and the setting."""


def tracking_target(config: CampaignConfig) -> tuple[str, str | None]:
    """The tracking URI and the artifact location of a new experiment. The URI is MLFLOW_TRACKING_URI when set
    (read here, where it is used: it may hold credentials, so it is never copied into the config), else
    tracking.uri; unset, it is a sqlite store in
    `{artifact_root}/_mlflow` (local artifact root) or `./mlflow` (s3:// root), with artifacts beside it;
    for a sqlite URI the artifacts go beside its database; an http(s) server keeps its own location."""
    settings = config.tracking
    uri = os.environ.get("MLFLOW_TRACKING_URI") or settings.uri
    if uri is None:
        store = open_store(config.artifact_root)
        folder = Path(store.root) / "_mlflow" if store.protocol == "file" else Path("mlflow").resolve()
        folder.mkdir(parents=True, exist_ok=True)
        uri = f"sqlite:///{folder / 'mlflow.db'}"
    location = settings.artifact_location
    if location is None and uri.startswith("sqlite:///"):
        database = Path(uri.removeprefix("sqlite:///"))
        database.parent.mkdir(parents=True, exist_ok=True)
        location = (database.parent.resolve() / "artifacts").as_uri()
    return uri, location


def config_digest(config: CampaignConfig) -> str:
    """Digest of everything in the config except its tracking settings: a campaign run is continued only
    by a re-run of the same campaign."""
    data = config.model_dump(mode="json", exclude={"tracking"})
    return hashlib.blake2b(json.dumps(data, sort_keys=True).encode(), digest_size=8).hexdigest()


class Tracker:
    """MLflow logging of one campaign (see the module docstring). Uses MlflowClient with explicit run ids,
    never the fluent active-run state, so Prefect's threads and nested flows cannot mix runs up."""

    def __init__(self, config: CampaignConfig):
        import mlflow
        from mlflow import MlflowClient

        self.config = config
        self.store = open_store(config.artifact_root)
        self.uri, self._artifact_location = tracking_target(config)
        # MLflow prints "View run … at: URL" with the tracking URI, credentials included; runs are linked
        # from the iteration's log and summary instead, redacted.
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
        # Registering a version from "models:/<id>" resolves the logged model through the fluent URIs. Setting
        # them also exports MLFLOW_TRACKING_URI to this process's environment, where engines and training
        # subprocesses would inherit it (credentials included) and later configs would read it: put it back.
        exported = os.environ.get("MLFLOW_TRACKING_URI")
        mlflow.set_tracking_uri(self.uri)
        mlflow.set_registry_uri(self.uri)
        if exported is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = exported
        self.client = MlflowClient(self.uri, self.uri)
        self.experiment_id = self._experiment()
        self.lineage = ModelLineage(self.client, self.experiment_id, config.name,
                                    config.tracking.registered_model or config.name)

    def _experiment(self) -> str:
        from mlflow.exceptions import MlflowException

        name = self.config.tracking.experiment or self.config.name
        try:
            existing = self.client.get_experiment_by_name(name)
            if existing is not None:
                if existing.lifecycle_stage == "deleted":
                    raise TrackingError(f"MLflow experiment {name!r} at {redact(self.uri)} is deleted: restore it "
                                        "(mlflow experiments restore) or set tracking.experiment")
                return existing.experiment_id
            return self.client.create_experiment(name, artifact_location=self._artifact_location,
                                                 tags={f"{TAG}.campaign": self.config.name})
        except MlflowException as error:
            if "already exists" in str(error):
                return self.client.get_experiment_by_name(name).experiment_id
            raise TrackingError(f"MLflow at {redact(self.uri)} (tracking.uri / MLFLOW_TRACKING_URI): {error}") from None

    # Runs ------------------------------------------------------------------------------------------------

    def campaign_run(self) -> str:
        """The campaign's run: the one a previous run of the same config created (set running again), or a
        new one with the flattened config as params and the config as `config.yaml`."""
        digest = config_digest(self.config)
        found = self._existing_campaign_run()
        if found:
            self.client.update_run(found, status="RUNNING")
            return found
        run = self.client.create_run(self.experiment_id, run_name=self.config.name, tags={
            f"{TAG}.kind": "campaign", f"{TAG}.campaign": self.config.name, f"{TAG}.config_digest": digest,
            f"{TAG}.artifact_root": redact(self.store.root),
            "mlflow.note.content": f"Meta-Rewarding campaign {self.config.name}: {len(self.config.iterations)} "
                                   f"iteration(s) from {self.config.model.path}; artifacts in {redact(self.store.root)}",
        })
        self._log_params(run.info.run_id, flatten_params(self.config.model_dump(mode="json", exclude={"tracking"})))
        self.client.log_text(run.info.run_id, self.config.to_yaml(), "config.yaml")
        return run.info.run_id

    def iteration_run(self, parent_run_id: str, iteration: int, model_digest: str, model_uri: str) -> str:
        """Iteration t's run, nested under the campaign run: found again by (parent, iteration, M_t's
        digest) and set running, or created with the iteration's settings as params."""
        found = self._find_run(f"tags.`mlflow.parentRunId` = '{parent_run_id}' AND tags.`{TAG}.iteration` = "
                               f"'{iteration}' AND tags.`{TAG}.model_digest` = '{model_digest}'")
        if found:
            self.client.update_run(found, status="RUNNING")
            return found
        run = self.client.create_run(self.experiment_id, run_name=f"iter-{iteration}", tags={
            "mlflow.parentRunId": parent_run_id, f"{TAG}.kind": "iteration", f"{TAG}.campaign": self.config.name,
            f"{TAG}.iteration": str(iteration), f"{TAG}.model_digest": model_digest,
            f"{TAG}.model_uri": redact(model_uri),
        })
        settings = self.config.iterations[iteration - 1].model_dump(mode="json")
        self._log_params(run.info.run_id, {**flatten_params(settings), "iteration": str(iteration),
                                           "model.uri": redact(model_uri), "model.digest": model_digest})
        return run.info.run_id

    def end_run(self, run_id: str, error: BaseException | None = None) -> None:
        """Mark a run FINISHED, or FAILED with the error's message as the `metareward.error` tag."""
        if error is not None:
            self.client.set_tag(run_id, f"{TAG}.error", f"{type(error).__name__}: {error}"[:5000])
        self.client.set_terminated(run_id, "FAILED" if error is not None else "FINISHED")

    def _existing_campaign_run(self) -> str | None:
        return self._find_run(f"tags.`{TAG}.kind` = 'campaign' AND tags.`{TAG}.config_digest` = "
                              f"'{config_digest(self.config)}'")

    def _find_run(self, filter_string: str) -> str | None:
        runs = self.client.search_runs([self.experiment_id], filter_string=filter_string, max_results=1,
                                       order_by=["attributes.start_time DESC"])
        return runs[0].info.run_id if runs else None

    def _log_params(self, run_id: str, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(key, value) for key, value in params.items()]
        for start in range(0, len(items), 100):  # MLflow's limit of params per batch
            self.client.log_batch(run_id, params=items[start:start + 100])

    def _log_metric_items(self, run_id: str, items: list) -> None:
        for start in range(0, len(items), 500):  # well under MLflow's 1,000 metrics per batch
            self.client.log_batch(run_id, metrics=items[start:start + 500])

    # One iteration ---------------------------------------------------------------------------------------

    def log_iteration(self, parent_run_id: str, run_id: str, iteration: int, stages: list[str]) -> None:
        """Log what the store holds of iteration t: stage statistics and the evaluation report as metrics
        (iteration run, and campaign run at step t), stage tables as dataset inputs, TRL's curves, the
        score-distribution figures, and — once trained — M_{t+1} as a logged and registered model with its
        lineage. Only `stages` are read (those this run finished: another config of the same campaign may
        have left manifests of later stages). An iteration whose checkpoint was already logged is skipped;
        a partial one (e.g. stopped by a health check) is logged as far as it got."""
        campaign = stage_manifests(self.store, self.config.name)
        manifests = {stage: manifest for stage, manifest in campaign.get(iteration, {}).items() if stage in stages}
        if not manifests:
            return
        checkpoint = manifests.get("checkpoint")
        logged_key = checkpoint["shards"]["all"]["cache_key"] if checkpoint else None
        run_tags = self.client.get_run(run_id).data.tags
        if logged_key and run_tags.get(f"{TAG}.logged") == logged_key:
            return
        tables = {name: read_stage_table(self.store, manifest, list(stage(name).report_columns))
                  for name, manifest in manifests.items() if stage(name).report_columns}
        metrics = {**_stage_metrics(manifests), **iteration_report(tables)}
        self._log_metrics(run_id, metrics, step=iteration)
        self._log_metrics(parent_run_id, metrics, step=iteration)
        datasets = {name: self._dataset(manifest) for name, manifest in manifests.items()
                    if stage(name).dataset_context}
        self._log_datasets(run_id, datasets)
        if "judgments" in tables:
            self._log_score_figures(parent_run_id, run_id, iteration, tables["judgments"], campaign)
        if checkpoint:
            curves = read_stage_table(self.store, checkpoint)
            self._log_training_curves(run_id, curves)
            self.lineage.log_models(run_id, iteration, checkpoint, datasets, curves, run_tags.get(f"{TAG}.model_uri", ""),
                                    self.config.iterations[iteration - 1].dpo.model_dump(mode="json"))
            self.client.set_tag(run_id, f"{TAG}.logged", logged_key)

    def _log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = _millis()
        self._log_metric_items(run_id, [Metric(key, value, now, step) for key, value in metrics.items()])

    def _dataset(self, manifest: dict) -> dict[str, Any]:
        shards = [shard for _, shard in sorted(manifest["shards"].items())]
        if len(shards) == 1:
            source, digest = shards[0]["uri"], shards[0]["digest"]
        else:
            source = self.store.uri(manifest["key"])
            digest = hashlib.blake2b("".join(s["digest"] for s in shards).encode(), digest_size=8).hexdigest()
        return {"name": f"{self.config.name}/iter-{manifest['iteration']}/{manifest['stage']}", "digest": digest,
                "source": source, "rows": manifest["rows"], "shards": len(shards),
                "context": stage(manifest["stage"]).dataset_context, "schema": stage(manifest["stage"]).schema}

    def _log_datasets(self, run_id: str, datasets: dict[str, dict[str, Any]]) -> None:
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import Dataset, DatasetInput, InputTag

        inputs = []
        for dataset in datasets.values():
            with warnings.catch_warnings():  # local paths match MLflow's local source twice; it picks either
                warnings.simplefilter("ignore", UserWarning)
                source = resolve_dataset_source(dataset["source"])
            meta = MetaDataset(source, name=dataset["name"], digest=dataset["digest"],
                               schema=_mlflow_schema(dataset["schema"]))
            fields = meta.to_dict()
            fields["profile"] = json.dumps({"num_rows": dataset["rows"], "shards": dataset["shards"]})
            inputs.append(DatasetInput(Dataset(**fields), tags=[
                InputTag("mlflow.data.context", dataset["context"])]))
        self.client.log_inputs(run_id, datasets=inputs)

    def _log_score_figures(self, parent_run_id: str, run_id: str, iteration: int, judgments: pl.DataFrame,
                           campaign: dict[int, dict[str, dict]]) -> None:
        """The iteration's score figure, and the campaign run's overlay of iterations 1..t (earlier
        iterations' judgments read from the store's manifests in `campaign`)."""
        scores = judgments["score"].to_list()
        self.client.log_figure(run_id, score_distribution_figure(
            {f"iteration {iteration}": scores},
            title=f"{self.config.name}: judge scores, iteration {iteration}"), "figures/score_distribution.png")
        by_iteration = {
            f"iteration {earlier}": read_stage_table(self.store, manifests["judgments"], ["score"])["score"].to_list()
            for earlier, manifests in campaign.items() if earlier < iteration and "judgments" in manifests}
        by_iteration[f"iteration {iteration}"] = scores
        self.client.log_figure(parent_run_id, score_distribution_figure(
            by_iteration, title=f"{self.config.name}: judge scores by iteration (cf. paper Fig. 5)"),
            "figures/score_distribution_by_iteration.png")

    def _log_training_curves(self, run_id: str, curves: pl.DataFrame) -> None:
        from mlflow.entities import Metric

        now = _millis()
        self._log_metric_items(run_id, [
            Metric(f"train/{column}", float(value), now, int(step))
            for row in curves.iter_rows(named=True) for column, value in row.items()
            if column != "step" and (step := row["step"]) is not None and value is not None])

    # Evaluations -----------------------------------------------------------------------------------------

    def log_evaluation(self, kind: str, model_uri: str, model_digest: str, metrics: dict[str, float],
                       input_path: str, results: pl.DataFrame) -> str:
        """A finished evaluation run (e.g. "judge-agreement") nested under this config's campaign run when
        there is one: its metrics, the evaluated file as an `evaluation` dataset input, the model as input
        (the campaign's logged model of that checkpoint), and the per-row results as `results.parquet`."""
        from mlflow.entities import LoggedModelInput

        parent = self._existing_campaign_run()
        tags = {f"{TAG}.kind": "evaluation", f"{TAG}.evaluation": kind, f"{TAG}.campaign": self.config.name,
                f"{TAG}.model_digest": model_digest, f"{TAG}.model_uri": redact(model_uri)}
        if parent:
            tags["mlflow.parentRunId"] = parent
        run_id = self.client.create_run(self.experiment_id, run_name=f"{kind} {model_digest[:8]}", tags=tags).info.run_id
        self._log_metrics(run_id, metrics, step=0)
        path = Path(input_path).resolve()
        self._log_datasets(run_id, {"evaluation": {
            "name": f"{self.config.name}/evaluation/{path.name}", "digest": file_digest(path), "source": str(path),
            "rows": results.height, "shards": 1, "context": "evaluation", "schema": results.schema}})
        model = self.lineage.logged_model(model_digest, model_uri, f"{self.config.name}-{model_digest[:8]}")
        self.client.log_inputs(run_id, models=[LoggedModelInput(model.model_id)])
        with tempfile.TemporaryDirectory() as folder:
            results.write_parquet(Path(folder) / "results.parquet")
            self.client.log_artifact(run_id, str(Path(folder) / "results.parquet"))
        self.end_run(run_id)
        return run_id


def check_tracking(config: CampaignConfig) -> None:
    """Fail fast when tracking is on and MLflow cannot be used: an http(s) server must answer /health
    within 10 s, and the experiment must exist or be creatable. Raises TrackingError naming the URI."""
    if not config.tracking.enabled:
        return
    uri, _ = tracking_target(config)
    if uri.startswith(("http://", "https://")):
        import httpx

        try:
            httpx.get(uri.rstrip("/") + "/health", timeout=10).raise_for_status()
        except httpx.HTTPError as error:
            raise TrackingError(f"MLflow tracking server {redact(uri)} does not answer /health ({error}): start "
                                "it, or fix tracking.uri / MLFLOW_TRACKING_URI, or set tracking.enabled: false")
    Tracker(config)


def log_evaluation(config: CampaignConfig, evaluation) -> str | None:
    """Log a finished evaluation (evaluation.EvaluationResult) as an MLflow run under the campaign's run when
    tracking is on (see Tracker.log_evaluation); returns its run id, or None with tracking off."""
    if not config.tracking.enabled:
        return None
    return Tracker(config).log_evaluation(evaluation.kind, evaluation.model_uri, evaluation.model_digest,
                                          evaluation.metrics, evaluation.input_path, evaluation.rows)


def start_iteration(config: CampaignConfig, iteration: int, model_digest: str, model_uri: str) -> dict[str, str] | None:
    """Open (or reopen, on a re-run) the campaign run and iteration t's nested run; their ids, or None when
    tracking is off."""
    if not config.tracking.enabled:
        return None
    tracker = Tracker(config)
    parent = tracker.campaign_run()
    return {"campaign": parent, "iteration": tracker.iteration_run(parent, iteration, model_digest, model_uri)}


def finish_iteration(config: CampaignConfig, iteration: int, runs: dict[str, str], stages: list[str],
                     error: str | None = None) -> None:
    """Log the given finished stages of iteration t from the store (Tracker.log_iteration) and end its run:
    FAILED with the error's text, or FINISHED. The campaign run ends too when t failed (FAILED) or was the
    config's last (FINISHED)."""
    tracker = Tracker(config)
    tracker.log_iteration(runs["campaign"], runs["iteration"], iteration, stages)
    failure = RuntimeError(error) if error else None
    tracker.end_run(runs["iteration"], failure)
    if failure is not None or iteration == len(config.iterations):
        tracker.end_run(runs["campaign"], failure)


def _stage_metrics(manifests: dict[str, dict]) -> dict[str, float]:
    """The numeric statistics of every stage manifest, as "{stage}/{statistic}"; the model-call counters
    (requests, tokens, parse failures, …) only for the stages that call the model."""
    metrics = {}
    for name, manifest in manifests.items():
        for key, value in manifest["stats"].items():
            if key in _MODEL_CALL_STATS and not stage(name).uses_model:
                continue
            if isinstance(value, (int, float)):
                metrics[f"{name}/{key}"] = float(value)
    return metrics


_MODEL_CALL_STATS = {"requests", "skipped_prompts", "dropped_duplicates", "parse_failures", "parse_failure_rate",
                     "prompt_tokens", "completion_tokens", "tokens_per_second"}


def _mlflow_schema(schema: pl.Schema):
    from mlflow.types import ColSpec, Schema

    return Schema([ColSpec(_mlflow_type(dtype), name) for name, dtype in schema.items()])


def _mlflow_type(dtype: pl.DataType):
    from mlflow.types import DataType
    from mlflow.types.schema import Array, Object, Property

    if isinstance(dtype, pl.List):
        return Array(_mlflow_type(dtype.inner))
    if isinstance(dtype, pl.Struct):
        return Object([Property(field.name, _mlflow_type(field.dtype)) for field in dtype.fields])
    if dtype in (pl.Int32, pl.Int16, pl.Int8):
        return DataType.integer
    if dtype in (pl.Int64, pl.UInt32, pl.UInt64):
        return DataType.long
    if dtype in (pl.Float32, pl.Float64):
        return DataType.double
    if dtype == pl.Boolean:
        return DataType.boolean
    return DataType.string


def _millis() -> int:
    return int(time.time() * 1000)
