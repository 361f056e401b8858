"""Prefect tasks: judge agreement with labelled rankings, and the AlpacaEval 2 and Arena-Hard exports into the artifact
store."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from metareward.artifacts.store import open_store
from metareward.config.campaign import CampaignConfig
from metareward.pipeline.arena_hard import export_arena_hard
from metareward.pipeline.evaluation import EvaluationResult, evaluate_judge_agreement, export_alpaca_eval
from metareward.tracking.tracker import log_evaluation
from tasks.common import GPU_TAG, RETRIED

_OPTIONS = {**RETRIED, "cache_policy": NO_CACHE, "tags": [GPU_TAG]}


@task(name="judge-agreement", **_OPTIONS)
def judge_agreement(config: CampaignConfig, rankings: str, model: str | None, num_judgments: int | None) -> dict:
    """Agreement, agreement without ties and Spearman with their 95% CIs (see evaluate_judge_agreement)."""
    estimates, evaluation = evaluate_judge_agreement(config, rankings, model, num_judgments)
    log_evaluation(config, evaluation)
    return {name: estimate.as_dict() for name, estimate in estimates.items()}


@task(name="alpaca-eval-export", **_OPTIONS)
def alpaca_eval_export(config: CampaignConfig, prompts: str, model: str | None) -> str:
    """The model's answers in AlpacaEval's format, stored at {campaign}/evaluations/{digest}/alpaca_eval.json
    in the artifact store; returns that URI."""
    return _stored_export(config, lambda local: export_alpaca_eval(config, prompts, local, model),
                          lambda export: "alpaca_eval.json")


@task(name="arena-hard-export", **_OPTIONS)
def arena_hard_export(config: CampaignConfig, questions: str, model: str | None) -> str:
    """The model's answers to an Arena-Hard question file in Arena-Hard's answer format, stored at
    {campaign}/evaluations/{digest}/arena-hard/{model id}.jsonl in the artifact store (Arena-Hard names a model
    by its answer file); returns that URI."""
    return _stored_export(config, lambda local: export_arena_hard(config, questions, local, model),
                          lambda export: f"arena-hard/{export.rows['model_id'][0]}.jsonl")


def _stored_export(config: CampaignConfig, export_to: Callable[[Path], EvaluationResult],
                   name: Callable[[EvaluationResult], str]) -> str:
    """Run an export into a temporary file, log it to MLflow, and store the file at
    {campaign}/evaluations/{digest}/{name(export)}; returns its URI."""
    with tempfile.TemporaryDirectory() as folder:
        local = Path(folder) / "export"
        export = export_to(local)
        log_evaluation(config, export)
        store = open_store(config.artifact_root)
        key = f"{config.name}/evaluations/{export.model_digest}/{name(export)}"
        store.write_bytes(key, local.read_bytes())
    return store.uri(key)
