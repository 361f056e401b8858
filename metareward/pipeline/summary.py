"""The per-iteration summary of a campaign's stages: the table `metareward run` and `show` print, the markdown
of the iteration's Prefect artifact, and the same summaries rebuilt from the stage manifests in the store."""

from __future__ import annotations

from typing import Any

from metareward.artifacts.store import ArtifactStore
from metareward.pipeline.health_gate import CHECKS_PASSED, recorded_decision
from metareward.pipeline.jobs import JobResult
from metareward.pipeline.manifests import stage_manifests
from metareward.pipeline.stages import stage

SUMMARY_HEADER = ("stage", "shards", "rows", "parse fail", "mean score", "mean chars", "tok/s", "seconds",
                  "dropped or skipped")

DROPPED = (
    ("empty_prompts", "empty in the file"),
    ("duplicate_prompts", "duplicates in the file"),
    ("skipped_prompts", "too long for the context"),
    ("dropped_duplicates", "identical responses"),
    ("prompts_without_scored_response", "prompts without a valid score"),
    ("identical_judgments", "identical judgments not meta-judged"),
    ("no_pair", "without a pair"),
    ("chosen_too_long", "chosen too long"),
    ("identical_texts", "chosen identical to rejected"),
    ("pairs_too_long", "over max_length"),
)
"""The counts a stage keeps of rows it dropped or skipped, and how the summary names them."""


def dropped(stats: dict[str, Any]) -> str:
    """'2 empty in the file, 1 too long for the context': every nonzero count of DROPPED."""
    return ", ".join(f"{stats[key]} {label}" for key, label in DROPPED if stats.get(key))


def summary_rows(stages: dict[str, dict[str, Any]]) -> list[tuple[str, ...]]:
    """One formatted row per stage (see SUMMARY_HEADER); blank where a figure does not apply."""
    rows = []
    for name, stats in stages.items():
        rows.append((
            name,
            str(stats.get("shards", "")),
            str(stats.get("rows", "")),
            f"{stats['parse_failure_rate']:.1%}" if stage(name).parses_verdicts else "",
            f"{stats['mean_score']:.2f}" if "mean_score" in stats else "",
            f"{stats['mean_chars']:.0f}" if "mean_chars" in stats else "",
            f"{stats['tokens_per_second']:.1f}" if stats.get("completion_tokens") else "",
            f"{stats.get('seconds', 0.0):.1f}",
            dropped(stats),
        ))
    return rows


def job_line(result: JobResult) -> str:
    """One line on a finished job for the run's log: rows, computed (and in how long, how fast) or found in the
    store — reused, and from where, when another campaign computed it (a shared seed stage) —, the stage's key
    figures, what was dropped, and where the table is."""
    job, stats = result.job, result.stats
    how = (f"found in the store (computed {stats.get('compute_seconds', 0.0):.1f} s)" if result.cached else
           f"computed in {stats.get('compute_seconds', 0.0):.1f} s")
    if result.cached and result.computed_by and result.computed_by != job.campaign:
        how = (f"reused from campaign {result.computed_by}, which computed it from the same inputs, settings and code"
               + (f" (model {stats['model_uri']})" if "model_uri" in stats else ""))
    figures = [how]
    if stats.get("completion_tokens") and stats.get("seconds"):
        figures.append(f"{stats['completion_tokens'] / stats['seconds']:.1f} tok/s")
    if stage(job.stage).parses_verdicts and stats.get("rows"):
        figures.append(f"parse failures {stats.get('parse_failures', 0) / stats['rows']:.1%}")
    if stats.get("valid_scores"):
        figures.append(f"mean score {stats['score_sum'] / stats['valid_scores']:.2f}")
    decided = stats.get("winner_a", 0) + stats.get("winner_b", 0)
    if decided:
        figures.append(f"winner A {stats['winner_a'] / decided:.1%}")
    kind = "SFT" if job.stage == "sft" else "DPO"
    if "loss_last" in stats:
        figures.append(f"{kind} loss {stats['loss_first']:.4f} → {stats['loss_last']:.4f} over "
                       f"{stats.get('epochs_trained', 0):g} epoch(s)")
    if stats.get("resumed_from_step"):
        figures.append(f"resumed from the checkpoint of step {stats['resumed_from_step']:g}")
    if "loss_after" in stats:
        accuracy = (f"token accuracy {stats.get('mean_token_accuracy_after', 0):.0%}" if kind == "SFT"
                    else f"reward accuracy {stats.get('rewards_accuracies_after', 0):.0%}")
        figures.append(f"on its {'examples' if kind == 'SFT' else 'pairs'} after training: loss "
                       f"{stats['loss_after']:.4f}, {accuracy}")
    if "win_rate" in stats:
        figures.append(f"{win_rate_text(stats)} over {stats['prompts_compared']:g} prompts, evaluator "
                       f"{stats.get('evaluator', '?')} (picked the answer shown first "
                       f"{stats.get('first_position_share', float('nan')):.0%})")
    if lost := dropped(stats):
        figures.append(lost)
    if result.recomputed:
        figures.append(f"computed again: {result.recomputed}")
    if stage(job.stage).writes_model and "model_uri" in stats:
        return (f"{job.run_name}: model {stats['model_id']} → {stats['model_uri']}; {'; '.join(figures)}; trainer log "
                f"({result.table.rows} rows) → {result.table.uri} (key {job.cache_key})")
    return f"{job.run_name}: {result.table.rows} rows, {'; '.join(figures)} → {result.table.uri} (key {job.cache_key})"


def win_rate_text(stats: dict[str, Any]) -> str:
    """'win rate 55.0% ± 3.1 [48.0–62.0], LC 52.1% [45.3–58.8]' from a win_rate stage's statistics (± AlpacaEval's
    standard error, [our bootstrap 95% CI]); the LC's reason instead where AlpacaEval's LC is undefined."""
    text = (f"win rate {stats['win_rate']:.1%} ± {100 * stats.get('win_rate_standard_error', float('nan')):.1f} "
            f"[{stats['win_rate_ci_low']:.1%}–{stats['win_rate_ci_high']:.1%}], ")
    if "lc_win_rate" not in stats:
        return text + f"LC undefined ({stats.get('lc_win_rate_undefined', 'not computed')})"
    return text + (f"LC {stats['lc_win_rate']:.1%} [{stats.get('lc_win_rate_ci_low', float('nan')):.1%}–"
                   f"{stats.get('lc_win_rate_ci_high', float('nan')):.1%}]")


def iteration_title(iteration: int) -> str:
    """'iteration 2', or 'seed SFT' for stage 0."""
    return "seed SFT" if iteration == 0 else f"iteration {iteration}"


def summary_markdown(campaign: str, iteration: int, model_id: str, stages: dict[str, dict[str, Any]],
                     mlflow_link: str | None = None, decision: dict | None = None) -> str:
    """A markdown table of an iteration's stages, for the Prefect artifact of the iteration, with its health
    decision (outcome["health_decision"]) under it once taken."""
    model = "Base model" if iteration == 0 else f"Model M_{iteration}"
    lines = [f"# {campaign} — {iteration_title(iteration)}", "", f"{model}: `{model_id}`", ""]
    if mlflow_link:
        lines += [f"MLflow: {f'[run]({mlflow_link})' if mlflow_link.startswith('http') else mlflow_link}", ""]
    lines += ["| " + " | ".join(SUMMARY_HEADER) + " |", "|" + "---|" * len(SUMMARY_HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in summary_rows(stages)]
    if decision:
        lines += ["", f"Health decision: {decision_text(decision)}"]
    return "\n".join(lines) + "\n"


def decision_text(decision: dict) -> str:
    """'**keep_model** (the Prefect UI): "judge saturated"' from a decision's choice, decided_by and note; 'all checks
    passed' when nothing was asked."""
    if decision["decided_by"] == CHECKS_PASSED:
        return "all checks passed"
    note = f': "{decision["note"]}"' if decision.get("note") else ""
    return f"**{decision['choice']}** ({decision['decided_by']}){note}"


def campaign_markdown(campaign: str, outcomes: list[dict], registered_model: str | None = None) -> str:
    """A narrow markdown table of a campaign's iterations so far (the seed's SFT first when it ran), for the
    campaign's Prefect artifact: each iteration linked to its MLflow run when the tracking server has a URL, the
    models as MLflow names them (`{campaign}-M{t}`, registered as `registered_model` version t; None: tracking off,
    their digests), the judge's mean score, the pairs, the health decision, how M_{t+1} does on its own training
    pairs, and its win rate. With a local MLflow store, the command that serves it follows the table."""
    lines = [f"# {campaign}", "", "| iteration | model | judge score | actor / judge pairs | health | after training "
             "| win rate |", "|---|---|---|---|---|---|---|"]
    local = ""
    for outcome in outcomes:
        stages = outcome["stages"]
        iteration = outcome["iteration"]
        judgments = stages.get("judgments", {})
        trainer = stages.get("sft") or stages.get("checkpoint", {})
        score = f"{judgments['mean_score']:.2f}" if "mean_score" in judgments else ""
        pairs = (f"{stages.get('actor_pairs', {}).get('rows', 0)} / {stages.get('judge_pairs', {}).get('rows', '—')}"
                 if "actor_pairs" in stages else f"{stages.get('sft_data', {}).get('rows', 0)} SFT examples")
        trained = (f"loss {trainer['loss_after']:.3f}, " + (
            f"token acc. {trainer.get('mean_token_accuracy_after', 0):.0%}" if iteration == 0
            else f"reward acc. {trainer.get('rewards_accuracies_after', 0):.0%}") if "loss_after" in trainer
            else "kept M_t" if trainer.get("kept_previous_model") or outcome["next_model_id"] == outcome["model_id"]
            else "")
        wins = (f"{stages['win_rate']['win_rate']:.1%} [{stages['win_rate']['win_rate_ci_low']:.1%}–"
                f"{stages['win_rate']['win_rate_ci_high']:.1%}]" if "win_rate" in stages.get("win_rate", {}) else "")
        health = decision_text(outcome["health_decision"]) if outcome.get("health_decision") else ""
        title = iteration_title(iteration)
        link = outcome.get("mlflow") or ""
        if link.startswith("http"):
            title = f"[{title}]({link})"
        elif link:
            local = link.split(", then", 1)[0]
        lines.append(f"| {title} | {_model_name(campaign, iteration, outcome, registered_model)} | {score} | {pairs} | "
                     f"{health} | {trained} | {wins} |")
    if local:
        lines += ["", f"MLflow runs (a local store): serve it with {local}, then open the experiment {campaign}."]
    return "\n".join(lines) + "\n"


def _model_name(campaign: str, iteration: int, outcome: dict, registered_model: str | None) -> str:
    """'M_1 → **M_2** (tiny v2)': the models an iteration read and wrote, as MLflow names and versions them."""
    before, after = ("base", "M_1") if iteration == 0 else (f"M_{iteration}", f"M_{iteration + 1}")
    if outcome["next_model_id"] == outcome["model_id"]:
        after = f"{after} = {before}"
    if registered_model is None:
        return f"{before} → **{after}** (`{str(outcome['next_model_id'])[:8]}`)"
    version = iteration if outcome["next_model_id"] == outcome["model_id"] else iteration + 1
    return f"{before} → **{after}** ({registered_model} v{version})"


def _kept_decision(store: ArtifactStore, campaign: str, iteration: int) -> dict | None:
    decision = recorded_decision(store, campaign, iteration) if iteration else None
    return decision.brief() if decision else None


def stored_outcomes(store: ArtifactStore, campaign: str) -> list[dict]:
    """The per-iteration summaries of a campaign as `metareward run` prints them, rebuilt from the stage
    manifests and the health decisions kept in the artifact store (no Prefect, no model)."""
    outcomes = []
    for iteration, manifests in stage_manifests(store, campaign).items():
        checkpoint = (manifests.get("sft") or manifests.get("checkpoint", {})).get("stats", {})
        outcomes.append({
            "iteration": iteration,
            "model_id": next((m["model_id"] for m in manifests.values() if m.get("model_id")), ""),
            "stages": {name: manifest["stats"] for name, manifest in manifests.items()},
            "next_model": checkpoint.get("model_uri", ""),
            "next_model_id": checkpoint.get("model_id", "(not trained yet)"),
            "health_decision": _kept_decision(store, campaign, iteration),
        })
    return outcomes
