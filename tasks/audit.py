"""The judge audit task of an iteration flow: a seeded sample of its prompts with the judge's scores and reasoning,
the meta-judge's verdicts and the Elo ranking (metareward/pipeline/audit.py), kept in the store beside the
iteration's tables — with a label template — and shown as the iteration's `…-audit` Prefect artifact."""

from __future__ import annotations

import io

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.settings import get_current_settings

from metareward.artifacts.store import open_store
from metareward.config.campaign import CampaignConfig
from metareward.pipeline.audit import audit_html, audit_keys, audit_markdown, judge_audit
from metareward.pipeline.context import ModelRef
from metareward.pipeline.jobs import JobResult
from metareward.tracking.figures import score_figure
from tasks.common import artifact_key


@task(name="judge-audit", task_run_name="judge audit iter-{iteration}", cache_policy=NO_CACHE)
def publish_audit(config: CampaignConfig, iteration: int, model: ModelRef, prompts: list[JobResult],
                  responses: list[JobResult], judgments: list[JobResult], meta_judgments: list[JobResult] | None,
                  judgment_elo: list[JobResult] | None) -> str | None:
    """Publish iteration t's judge audit (health.audit_samples prompts; none when 0 or nothing was judged): the
    markdown and HTML pages and the label template in the store under iter-{t}/audit/, and the markdown as the
    iteration's audit artifact. Returns where a person opens it: the artifact's page in the Prefect UI when there is
    a server, else the markdown's URI in the store."""
    tables = {"prompts": prompts, "responses": responses, "judgments": judgments, "meta_judgments": meta_judgments,
              "judgment_elo": judgment_elo}
    if not config.health.audit_samples or not judgments:
        return None
    store = open_store(config.artifact_root)
    audit = judge_audit(store, config.name, iteration, model.model_id,
                        {name: [result.table for result in results] for name, results in tables.items() if results},
                        config.health.audit_samples, config.seed)
    keys = audit_keys(config.name, iteration)
    template = io.BytesIO()
    audit.label_template().write_csv(template)
    store.write_bytes(keys["template"], template.getvalue())
    command = f"metareward audit label {config.name} --iteration {iteration} FILE"
    markdown = audit_markdown(audit, command, store.uri(keys["template"]))
    store.write_bytes(keys["markdown"], markdown.encode())
    png = io.BytesIO()
    title = f"{config.name}: judge scores, iteration {iteration}"
    score_figure({f"iteration {iteration}": audit.scores}, title).savefig(png, format="png")
    store.write_bytes(keys["html"], audit_html(audit, png.getvalue()).encode())
    key = artifact_key(config.name, f"iter-{iteration}-audit")
    artifact_id = create_markdown_artifact(key=key, markdown=markdown,
                             description=f"{config.name}: iteration {iteration}'s judge audit ({len(audit.prompts)} "
                             "prompts: scores, reasoning, verdicts, Elo)")
    ui = get_current_settings().ui_url
    link = f"{ui.rstrip('/')}/artifacts/artifact/{artifact_id}" if ui and get_current_settings().api.url else \
        store.uri(keys["markdown"])
    get_run_logger().info("judge audit of iteration %d: %d prompts with their scores, reasoning and verdicts: %s "
                          "(HTML: %s; label template: %s)", iteration, len(audit.prompts), link,
                          store.uri(keys["html"]), store.uri(keys["template"]))
    return link
