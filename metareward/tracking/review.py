"""What a person reviews on MLflow beside the metrics: on an iteration's run the judge audit, the health decision and
which stages did not run, and why; on the campaign run its prompt file and the latest model it trained."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from metareward.artifacts.store import ArtifactStore
from metareward.artifacts.tables import file_digest
from metareward.config.campaign import CampaignConfig
from metareward.pipeline.audit import audit_keys
from metareward.pipeline.health_gate import decision_json, decisions_markdown, recorded_decision
from metareward.pipeline.stages import EVALUATION_STAGES, ITERATION_STAGES, SEED_STAGES, why_not_run
from metareward.tracking.lineage import TAG
from metareward.tracking.tracked_datasets import log_datasets


def log_review(client, store: ArtifactStore, config: CampaignConfig, parent_run_id: str, run_id: str,
               iteration: int) -> None:
    """On iteration t's run: the stages that did not run with their reasons (tag metareward.stages_not_run and the
    run's description), the judge audit (audit/audit.html, audit.md, the label template) and, when one was taken,
    the health decision (tags metareward.health.decision, .decided_by and .note, health_decision.json), with
    every iteration's decisions as health_decisions.md on the campaign run."""
    stages = SEED_STAGES if iteration == 0 else ITERATION_STAGES + EVALUATION_STAGES
    not_run = {entry.name: why_not_run(config, entry.name, iteration) for entry in stages}
    lines = [f"{name}: {reason}" for name, reason in not_run.items() if reason]
    if lines:
        client.set_tag(run_id, f"{TAG}.stages_not_run", "\n".join(lines))
        client.set_tag(run_id, "mlflow.note.content", "Stages that did not run in this iteration:\n\n"
                       + "\n".join(f"- {line}" for line in lines))
    for name, key in audit_keys(config.name, iteration).items():
        if name in ("markdown", "html", "template") and store.exists(key):
            client.log_text(run_id, store.read_bytes(key).decode(), f"audit/{key.rsplit('/', 1)[1]}")
    decision = recorded_decision(store, config.name, iteration)
    if decision is None:
        return
    for field_name, tag in (("choice", "decision"), ("decided_by", "decided_by"), ("note", "note")):
        client.set_tag(run_id, f"{TAG}.health.{tag}", getattr(decision, field_name))
    client.log_text(run_id, decision_json(decision), "health_decision.json")
    client.log_text(parent_run_id, decisions_markdown(store, config.name, len(config.iterations)),
                    "health_decisions.md")


def link_campaign_run(client, config: CampaignConfig, parent_run_id: str, model, iteration: int,
                      registered_model: str) -> None:
    """The campaign run's lineage: the campaign's prompt file as its dataset input (once) and the latest model it
    trained (`model`, M_{t+1}: an MLflow LoggedModel) as its output, named with its registered version in the tag
    metareward.latest_model."""
    from mlflow.entities import LoggedModelOutput

    run = client.get_run(parent_run_id)
    name = f"{config.name}/prompt-file"
    if name not in {item.dataset.name for item in (run.inputs.dataset_inputs if run.inputs else [])}:
        path = Path(config.prompts.path)
        log_datasets(client, parent_run_id, {"prompts": {
            "name": name, "digest": file_digest(path), "source": str(path.resolve()), "rows": None, "shards": 1,
            "context": "generation", "schema": pl.Schema({config.prompts.column: pl.String})}})
    if model.model_id not in {output.model_id for output in (run.outputs.model_outputs if run.outputs else [])}:
        client.log_outputs(parent_run_id, [LoggedModelOutput(model.model_id, step=iteration)])
    client.set_tag(parent_run_id, f"{TAG}.latest_model",
                   f"{model.name} (registered model {registered_model}, version {iteration + 1})")
