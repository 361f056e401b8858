"""The per-iteration summary of a campaign's stages: the table `metareward run` and `show` print, the markdown
of the iteration's Prefect artifact, and the same summaries rebuilt from the stage manifests in the store."""

from __future__ import annotations

from typing import Any

from metareward.manifests import stage_manifests
from metareward.stages import stage
from metareward.store import ArtifactStore

SUMMARY_HEADER = ("stage", "shards", "rows", "parse fail", "mean score", "mean chars", "tok/s", "seconds",
                  "dropped or skipped")

DROPPED = (
    ("empty_prompts", "empty in the file"),
    ("duplicate_prompts", "duplicates in the file"),
    ("skipped_prompts", "too long for the context"),
    ("dropped_duplicates", "identical responses"),
    ("prompts_without_scored_response", "prompts without a valid score"),
    ("no_pair", "without a pair"),
    ("chosen_too_long", "chosen too long"),
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


def summary_markdown(campaign: str, iteration: int, model_id: str, stages: dict[str, dict[str, Any]]) -> str:
    """A markdown table of an iteration's stages, for the Prefect artifact of the iteration."""
    lines = [f"# {campaign} — iteration {iteration}", "", f"Model M_{iteration}: `{model_id}`", "",
             "| " + " | ".join(SUMMARY_HEADER) + " |", "|" + "---|" * len(SUMMARY_HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in summary_rows(stages)]
    return "\n".join(lines) + "\n"


def stored_outcomes(store: ArtifactStore, campaign: str) -> list[dict]:
    """The per-iteration summaries of a campaign as `metareward run` prints them, rebuilt from the stage
    manifests in the artifact store (no Prefect, no model)."""
    outcomes = []
    for iteration, manifests in stage_manifests(store, campaign).items():
        checkpoint = manifests.get("checkpoint", {}).get("stats", {})
        outcomes.append({
            "iteration": iteration,
            "model_id": next((m["model_id"] for m in manifests.values() if m.get("model_id")), ""),
            "stages": {name: manifest["stats"] for name, manifest in manifests.items()},
            "next_model": checkpoint.get("model_uri", ""),
            "next_model_id": checkpoint.get("model_id", "(not trained yet)"),
        })
    return outcomes
