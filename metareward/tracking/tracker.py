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
from pathlib import Path

import polars as pl

from metareward.artifacts.store import open_store
from metareward.artifacts.tables import file_digest
from metareward.config.campaign import CampaignConfig
from metareward.config.sections import redact
from metareward.pipeline.model_roles import evaluator_model
from metareward.pipeline.paper_tables import paper_tables
from metareward.tracking.figures import BIASES, WIN_RATE_SERIES, bias_figure, score_figure, win_rate_figure
from metareward.tracking.lineage import NOTE, TAG, ModelLineage, flatten_params
from metareward.tracking.record import IterationRecord, iteration_record, logged_key
from metareward.tracking.review import link_campaign_run, log_review
from metareward.tracking.tracked_datasets import log_datasets


class TrackingError(RuntimeError):
    """The MLflow tracking server or store cannot be used; the message names the URI and the setting."""


REQUEST_LIMITS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "15", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                  "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}
"""MLflow's HTTP settings for every Tracker unless the environment sets them: 15 s a request, 2 retries after
about 1 and 2 s. MLflow's own defaults (120 s, 7 retries, backoff factor 2) retry a server that is down for
about 4 minutes per call, which a campaign would wait out before its next model work; the pointers, metrics and
figures a campaign logs are small, so a healthy server answers well within these."""


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
        # MLflow reads its HTTP settings from the environment at every request; it takes no per-client ones.
        for name, value in REQUEST_LIMITS.items():
            os.environ.setdefault(name, value)
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
        self.lineage = ModelLineage(self.client, self.experiment_id, config.name, self.lineage_name())

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
            return self.client.create_experiment(name, artifact_location=self._artifact_location, tags={
                f"{TAG}.campaign": self.config.name,
                # Runs, models and charts, not the GenAI (traces) overview, are what a campaign logs.
                "mlflow.experimentKind": "custom_model_development",
                NOTE: f"Meta-Rewarding campaign {self.config.name}: a run per campaign with a nested run per "
                      "iteration; models M_1, M_2, … under Models and in the registered model "
                      f"{self.lineage_name()}. Switch the UI to *Model training* to see them."})
        except MlflowException as error:
            if "already exists" in str(error):
                return self.client.get_experiment_by_name(name).experiment_id
            raise TrackingError(f"MLflow at {redact(self.uri)} (tracking.uri / MLFLOW_TRACKING_URI): {error}") from None

    def lineage_name(self) -> str:
        """The registered model of the campaign's checkpoints."""
        return self.config.tracking.registered_model or self.config.name

    def run_link(self, run_id: str) -> str:
        """Where to see the run: its page in the MLflow UI, in the Model training view (credentials removed);
        for a local store, the command that serves it and the page's path."""
        page = f"#/experiments/{self.experiment_id}/runs/{run_id}?workflowType=machine_learning"
        if self.uri.startswith(("http://", "https://")):
            return f"{redact(self.uri).rstrip('/')}/{page}"
        return f"`mlflow ui --backend-store-uri {self.uri}`, then /{page}"

    # Runs ------------------------------------------------------------------------------------------------

    def campaign_run(self) -> str:
        """The campaign's run: the one a previous run of the same config created (set running again), or a
        new one with the flattened config as params and the config as `config.yaml`."""
        digest = config_digest(self.config)
        found = self.existing_campaign_run()
        if found:
            self.client.update_run(found, status="RUNNING")
            return found
        run = self.client.create_run(self.experiment_id, run_name=self.config.name, tags={
            f"{TAG}.kind": "campaign", f"{TAG}.campaign": self.config.name, f"{TAG}.config_digest": digest,
            f"{TAG}.artifact_root": redact(self.store.root),
            "mlflow.note.content": f"Meta-Rewarding campaign {self.config.name}: {len(self.config.iterations)} "
                                   f"iteration(s) from {self.config.model.path}; "
                                   f"artifacts in {redact(self.store.root)}",
        })
        self._log_params(run.info.run_id, flatten_params(self.config.model_dump(mode="json", exclude={"tracking"})))
        self.client.log_text(run.info.run_id, self.config.to_yaml(), "config.yaml")
        return run.info.run_id

    def iteration_run(self, parent_run_id: str, iteration: int, model_digest: str, model_uri: str) -> str:
        """Iteration t's run, nested under the campaign run: found again by (parent, iteration, M_t's
        digest) and set running, or created with the iteration's settings as params."""
        found = self.existing_iteration_run(parent_run_id, iteration, model_digest)
        if found:
            self.client.update_run(found.info.run_id, status="RUNNING")
            return found.info.run_id
        run = self.client.create_run(self.experiment_id, run_name="seed-sft" if iteration == 0 else f"iter-{iteration}",
                                     tags={
            "mlflow.parentRunId": parent_run_id, f"{TAG}.kind": "seed" if iteration == 0 else "iteration",
            f"{TAG}.campaign": self.config.name, f"{TAG}.iteration": str(iteration),
            f"{TAG}.model_digest": model_digest,
            f"{TAG}.model_uri": redact(model_uri), **self._evaluator_tags(iteration),
        })
        settings = self._training_settings(iteration) if iteration == 0 else (
            self.config.iterations[iteration - 1].model_dump(mode="json"))
        self._log_params(run.info.run_id, {**flatten_params(settings), "iteration": str(iteration),
                                           "model.uri": redact(model_uri), "model.digest": model_digest})
        return run.info.run_id

    def _training_settings(self, iteration: int) -> dict:
        """The settings of the iteration's training: the seed's SFT (0) or the iteration's DPO."""
        section = self.config.sft if iteration == 0 else self.config.iterations[iteration - 1].dpo
        return section.model_dump(mode="json")

    def _evaluator_tags(self, iteration: int) -> dict[str, str]:
        """Who judges the iteration's win rate: the evaluator's weights (or endpoint model) and digest."""
        if iteration == 0 or self.config.evaluation is None:
            return {}
        evaluator = evaluator_model(self.config)
        return {f"{TAG}.evaluator": redact(evaluator.uri), f"{TAG}.evaluator_digest": evaluator.model_id,
                f"{TAG}.evaluation_reference": self.config.evaluation.reference}

    def end_run(self, run_id: str, error: BaseException | None = None) -> None:
        """Mark a run FINISHED, or FAILED with the error's message as the `metareward.error` tag."""
        if error is not None:
            self.client.set_tag(run_id, f"{TAG}.error", f"{type(error).__name__}: {error}"[:5000])
        self.client.set_terminated(run_id, "FAILED" if error is not None else "FINISHED")

    def existing_campaign_run(self) -> str | None:
        """The id of the run a campaign of this config created, or None (nothing is changed)."""
        found = self._find_run(f"tags.`{TAG}.kind` = 'campaign' AND tags.`{TAG}.config_digest` = "
                               f"'{config_digest(self.config)}'")
        return found.info.run_id if found else None

    def existing_iteration_run(self, parent_run_id: str, iteration: int, model_digest: str):
        """Iteration t's run (an mlflow Run: status, tags) under the campaign run, on M_t with this digest, or
        None (nothing is changed)."""
        return self._find_run(f"tags.`mlflow.parentRunId` = '{parent_run_id}' AND tags.`{TAG}.iteration` = "
                              f"'{iteration}' AND tags.`{TAG}.model_digest` = '{model_digest}'")

    def _find_run(self, filter_string: str):
        runs = self.client.search_runs([self.experiment_id], filter_string=filter_string, max_results=1,
                                       order_by=["attributes.start_time DESC"])
        return runs[0] if runs else None

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
        """Log what the store holds of iteration t (tracking.record.iteration_record): its metrics on the iteration
        run and the paper's on the campaign run at step t, stage tables as dataset inputs, TRL's curves by step,
        the figures, the paper's tables so far (paper_tables.md on the campaign run), and — once trained — M_t and
        M_{t+1} as logged and registered models, the pair counts and training curves linked to M_{t+1} and the
        tables it was trained on. Only `stages` are read (those this run
        finished). An iteration whose checkpoint was already logged is skipped; a partial one (e.g. stopped by a
        health check) is logged as far as it got; an attempt an outage cut short can be made again, adding no second
        point, link, model or version."""
        run_tags = self.client.get_run(run_id).data.tags
        record = iteration_record(self.store, self.config.name, iteration, stages, run_tags.get(f"{TAG}.logged"))
        if record is None:
            return
        at = self._logging_time(run_id, run_tags, logged_key(record.manifests))
        log_datasets(self.client, run_id, record.datasets)
        model = None
        if record.checkpoint:
            model = self.lineage.log_models(run_id, iteration, record.checkpoint, record.datasets,
                                            run_tags.get(f"{TAG}.model_uri", ""), self._training_settings(iteration))
        # The run's scalars at step 0: its step axis is the trainer's, which TRL's curves below use.
        items = [self._metric(name, value, 0, at, model, record.linked_dataset(name))
                 for name, value in record.metrics.items()]
        training_set = record.datasets.get(record.training_set)
        items += [self._metric(point.name, point.value, point.step, at, model if point.last else None, training_set)
                  for point in record.training_curve]
        self._log_metric_items(run_id, items)
        self.client.log_dict(run_id, record.bookkeeping, "stages.json")
        self._log_metrics(parent_run_id, record.paper_metrics, iteration, at)
        if record.judgments is not None:
            self._log_figures(parent_run_id, run_id, record)
        if "eval/win_rate" in record.metrics:
            self._log_win_rate_figure(parent_run_id)
        self.client.log_text(parent_run_id, paper_tables(self.store, self.config.name), "paper_tables.md")
        log_review(self.client, self.store, self.config, parent_run_id, run_id, iteration)
        if model is not None and iteration > 0:
            link_campaign_run(self.client, self.config, parent_run_id, model, iteration, self.lineage_name())
        if record.logged_key:
            self.client.set_tag(run_id, f"{TAG}.logged", record.logged_key)

    def _logging_time(self, run_id: str, run_tags: dict[str, str], content: str) -> int:
        """The time (ms) an iteration's points are logged at: that of the first attempt to log this content (the
        digest of its stages' keys), kept in the run's `metareward.logging` tag, so that an attempt an outage cut
        short, made again, adds no second point (MLflow stores a point equal in key, step, value and time once);
        new content gets the time now, so that its points are the latest."""
        first, _, at = run_tags.get(f"{TAG}.logging", "").partition("@")
        if first == content and at.isdigit():
            return int(at)
        now = _millis()
        self.client.set_tag(run_id, f"{TAG}.logging", f"{content}@{now}")
        return now

    def _metric(self, name: str, value: float, step: int, at: int, model, dataset: dict | None):
        from mlflow.entities import Metric

        linked = model is not None and dataset is not None
        return Metric(name, value, at, step, model_id=model.model_id if linked else None,
                      dataset_name=dataset["name"] if linked else None,
                      dataset_digest=dataset["digest"] if linked else None)

    def _log_metrics(self, run_id: str, metrics: dict[str, float], step: int, at: int) -> None:
        from mlflow.entities import Metric

        self._log_metric_items(run_id, [Metric(key, value, at, step) for key, value in metrics.items()])

    def _log_figures(self, parent_run_id: str, run_id: str, record: IterationRecord) -> None:
        """score_shares.png on the iteration run (iteration t) and on the campaign run (iterations 1..t), and
        meta_judge_bias.png on the campaign run from its Table 5 metrics. At each run's artifact root, so MLflow's
        compare view shows them side by side."""
        name, iteration = self.config.name, record.iteration
        self.client.log_figure(run_id, score_figure({f"iteration {iteration}": record.judgments},
                                                    f"{name}: judge scores, iteration {iteration}"), "score_shares.png")
        by_iteration = {f"iteration {earlier}": judgments for earlier, judgments in record.earlier_judgments.items()}
        by_iteration[f"iteration {iteration}"] = record.judgments
        self.client.log_figure(parent_run_id, score_figure(by_iteration, f"{name}: judge scores by iteration "
                                                                         "(cf. paper Fig. 5)"), "score_shares.png")
        history = {bias: [(point.step, point.value)
                          for point in self.client.get_metric_history(parent_run_id, f"meta_judge/{bias}")]
                   for bias in BIASES}
        if any(history.values()):
            self.client.log_figure(parent_run_id, bias_figure(history, f"{name}: meta-judge biases by iteration "
                                                                       "(cf. paper Table 5)", range(1, iteration + 1)),
                                   "meta_judge_bias.png")

    def _log_win_rate_figure(self, parent_run_id: str) -> None:
        """win_rate.png on the campaign run: win rate and LC win rate of M_{t+1} with their 95% CIs, by iteration,
        from the campaign run's eval/ metrics."""
        history = {name: {m.step: m.value for m in self.client.get_metric_history(parent_run_id, f"eval/{name}")}
                   for name in WIN_RATE_SERIES}
        evaluation = self.config.evaluation
        self.client.log_figure(parent_run_id, win_rate_figure(history, (
            f"{self.config.name}: M_t+1 against {REFERENCE_LABELS[evaluation.reference]}, by iteration")),
            "win_rate.png")

    # Evaluations -----------------------------------------------------------------------------------------

    def log_evaluation(self, kind: str, model_uri: str, model_digest: str, metrics: dict[str, float],
                       input_path: str, results: pl.DataFrame) -> str:
        """A finished evaluation run (e.g. "judge-agreement") nested under this config's campaign run when
        there is one: its metrics, the evaluated file as an `evaluation` dataset input, the model as input
        (the campaign's logged model of that checkpoint), and the per-row results as `results.parquet`."""
        from mlflow.entities import LoggedModelInput

        parent = self.existing_campaign_run()
        tags = {f"{TAG}.kind": "evaluation", f"{TAG}.evaluation": kind, f"{TAG}.campaign": self.config.name,
                f"{TAG}.model_digest": model_digest, f"{TAG}.model_uri": redact(model_uri)}
        if parent:
            tags["mlflow.parentRunId"] = parent
        run_name = f"{kind} {model_digest[:8]}"
        run_id = self.client.create_run(self.experiment_id, run_name=run_name, tags=tags).info.run_id
        self._log_metrics(run_id, metrics, 0, _millis())
        path = Path(input_path).resolve()
        log_datasets(self.client, run_id, {"evaluation": {
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
    problem = server_problem(tracking_target(config)[0], timeout=10)
    if problem:
        raise TrackingError(f"{problem}: start it, or fix tracking.uri / MLFLOW_TRACKING_URI, or set "
                            "tracking.enabled: false")
    Tracker(config)


def server_problem(uri: str, timeout: float) -> str | None:
    """Why the tracking server at an http(s) URI cannot be used — it does not answer /health with 200 within
    `timeout` seconds — in words without credentials; None when it answers, or for a local store (no server)."""
    if not uri.startswith(("http://", "https://")):
        return None
    import httpx

    try:
        httpx.get(uri.rstrip("/") + "/health", timeout=timeout).raise_for_status()
    except httpx.HTTPError as error:
        return f"MLflow tracking server {redact(uri)} does not answer /health ({redact(str(error))})"
    return None


def log_evaluation(config: CampaignConfig, evaluation) -> str | None:
    """Log a finished evaluation (evaluation.EvaluationResult) as an MLflow run under the campaign's run when
    tracking is on (see Tracker.log_evaluation); returns its run id, or None with tracking off."""
    if not config.tracking.enabled:
        return None
    return Tracker(config).log_evaluation(evaluation.kind, evaluation.model_uri, evaluation.model_digest,
                                          evaluation.metrics, evaluation.input_path, evaluation.rows)


REFERENCE_LABELS = {"previous": "M_t", "seed": "M_1", "outputs": "the reference outputs"}


def _millis() -> int:
    return int(time.time() * 1000)
