"""Evaluation of one model as a Prefect flow: judge agreement (paper sec. 3.4), AlpacaEval 2 and Arena-Hard exports."""

from __future__ import annotations

from typing import Annotated

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from pydantic import Field

from metareward.config.campaign import CampaignConfig
from metareward.preflight import check_evaluation
from tasks.common import in_this_environment
from tasks.evaluate import alpaca_eval_export, arena_hard_export, judge_agreement


@flow(name="metareward-evaluation", flow_run_name="{config.name} evaluation", persist_result=True)
def evaluation_flow(config: CampaignConfig, model: str = "", rankings: str = "", alpaca_eval_prompts: str = "",
                    num_judgments: Annotated[int, Field(ge=0)] = 0, arena_hard_questions: str = "") -> dict:
    """Evaluate a model: judge agreement with a labelled-rankings file, an AlpacaEval export of a prompt file and/or
    an Arena-Hard export of a question file, each logged to MLflow as an evaluation run. Returns the agreement
    estimates and the exports' URIs.

    Args:
        config: The campaign whose engine, judge sampling and MLflow experiment are used.
        model: The model to evaluate (a model folder or checkpoint URI); empty: config.model.path.
        rankings: A labelled-rankings file (JSONL/Parquet/CSV of prompt, response, rank; 1 = best) for judge
            agreement (paper sec. 3.4).
        alpaca_eval_prompts: A prompt file whose answers are exported in AlpacaEval's format.
        num_judgments: N for agreement; 0: the last iteration's.
        arena_hard_questions: An Arena-Hard question file whose answers are exported in Arena-Hard's format.
    """
    config = in_this_environment(config)
    if not rankings and not alpaca_eval_prompts and not arena_hard_questions:
        raise ValueError("nothing to evaluate: give rankings (labelled rankings file), alpaca_eval_prompts and/or "
                         "arena_hard_questions")
    model, num_judgments = model or None, num_judgments or None
    check_evaluation(config, model)
    outcome: dict = {"model": model or config.model.path}
    lines = [f"## {config.name}: evaluation of `{outcome['model']}`", ""]
    if rankings:
        outcome["agreement"] = judge_agreement(config, rankings, model, num_judgments)
        lines += ["| statistic | value | 95% CI |", "|---|---:|---:|"]
        lines += [f"| {name} | {e['value']:.3f} | [{e['ci_low']:.3f}, {e['ci_high']:.3f}] |"
                  for name, e in outcome["agreement"].items()]
    if alpaca_eval_prompts:
        outcome["alpaca_eval"] = alpaca_eval_export(config, alpaca_eval_prompts, model)
        lines += ["", f"AlpacaEval outputs: `{outcome['alpaca_eval']}`"]
    if arena_hard_questions:
        outcome["arena_hard"] = arena_hard_export(config, arena_hard_questions, model)
        lines += ["", f"Arena-Hard answers: `{outcome['arena_hard']}`"]
    create_markdown_artifact(markdown="\n".join(lines), description=f"{config.name}: evaluation")
    return outcome
