"""Benchmark: project one iteration of any config on G GPUs from the measurements of a finished campaign.

The measured campaign is a pilot: the target's model on the target's hardware, at a small size (or the demo,
to check the projection against what it measured). Its stage manifests give, per model stage, the tokens
generated per second per engine (completion tokens / engine-seconds, prefill included) and the tokens per
item, and for DPO the seconds per pair and epoch. The target config's work — prompts, K, N, max_tokens, the
share of responses that survive deduplication, of judgments that parse, of prompts that yield pairs, the kept
epoch — is scaled from those, on G engines (one per GPU) and G DPO processes.

Assumptions (printed with the result): an engine's throughput does not depend on the load (so measure the pilot
at the target's concurrency); engines and DPO processes scale linearly; items are as long as in the pilot,
capped by the target's max_tokens; the selection stages (pairs, Elo) take the time they took in the pilot.

Run: python benchmarks/projection.py --artifact-root ROOT --campaign NAME --config CONFIG --gpus G
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from metareward.artifacts.store import ArtifactStore  # noqa: E402
from metareward.config.campaign import CampaignConfig  # noqa: E402
from metareward.pipeline.manifests import stage_manifests  # noqa: E402


def measurements(root: str, campaign: str, iteration: int | None) -> tuple[int, dict[str, dict]]:
    """(iteration, combined statistics by stage) of the measured iteration: the one given, else the first that
    meta-judged and trained."""
    manifests = stage_manifests(ArtifactStore(root), campaign)
    if not manifests:
        raise SystemExit(f"no campaign {campaign!r} under {root}")
    candidates = [t for t, stages in manifests.items() if {"meta_judgments", "checkpoint"} <= set(stages)]
    chosen = iteration or (candidates[0] if candidates else max(manifests))
    return chosen, {name: manifest["stats"] for name, manifest in manifests[chosen].items()}


def project(measured: dict[str, dict], config: CampaignConfig, iteration: int, gpus: int) -> list[dict]:
    """One row per stage of the target iteration: its items, tokens and projected seconds on `gpus` GPUs."""
    target = config.iterations[iteration - 1]
    prompts_measured = measured["prompts"]["rows"]
    prompts = target.num_prompts or prompts_measured
    responses, judgments = measured["responses"], measured["judgments"]
    kept_share = responses["rows"] / (responses["rows"] + responses.get("dropped_duplicates", 0))
    samples = prompts * target.num_responses * kept_share
    rows = []

    def generation(stage: str, items: float, max_tokens: int, extra_per_item: float = 0.0) -> None:
        stats = measured[stage]
        per_item = min(stats["completion_tokens"] / stats["rows"] - extra_per_item, max_tokens) + extra_per_item
        rate = stats["completion_tokens"] / (stats.get("engine_seconds") or stats["seconds"])  # older: 1 engine
        rows.append({"stage": stage, "items": items, "tokens": items * per_item, "rate": rate,
                     "seconds": items * per_item / (rate * gpus)})

    verdict = 1.0 if config.inference.verdict_mode == "forced" else 0.0
    generation("responses", samples, target.actor_sampling.max_tokens)
    generation("judgments", samples * target.num_judgments, target.judge_sampling.max_tokens, verdict)
    pairs_per_prompt = measured["actor_pairs"]["rows"] / prompts_measured
    pairs = prompts * pairs_per_prompt
    if target.train_judge and "meta_judgments" in measured:
        valid = judgments["valid_scores"] / judgments["rows"] * target.num_judgments
        measured_valid = judgments["valid_scores"] / judgments["rows"] * _judgments_per_response(measured)
        judged_share = measured["meta_judgments"]["rows"] / (prompts_measured * measured_valid * (measured_valid - 1))
        generation("meta_judgments", prompts * judged_share * valid * (valid - 1),
                   target.meta_judge_sampling.max_tokens, verdict)
        pairs += prompts * measured.get("judge_pairs", {}).get("rows", 0) / prompts_measured
    for stage in ("prompts", "actor_pairs", "judgment_elo", "judge_pairs", "dpo_dataset"):
        if stage in measured:
            rows.append({"stage": stage, "items": None, "tokens": None, "rate": None,
                         "seconds": measured[stage].get("compute_seconds", 0.0)})
    checkpoint = measured["checkpoint"]
    epochs_measured = checkpoint.get("epochs_trained") or 1
    per_pair_epoch = checkpoint["seconds"] / (checkpoint["pairs_trained"] * epochs_measured)
    epochs = target.dpo.checkpoint_epoch or target.dpo.num_epochs
    rows.append({"stage": "checkpoint (DPO)", "items": pairs, "tokens": None, "rate": None,
                 "seconds": pairs * epochs * per_pair_epoch / gpus})
    return rows


def _judgments_per_response(measured: dict[str, dict]) -> float:
    return measured["judgments"]["rows"] / measured["responses"]["rows"]


def main() -> None:
    """Print the projection of one iteration of --config on --gpus GPUs from the measured campaign."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact-root", required=True, help="artifact root of the measured campaign")
    parser.add_argument("--campaign", required=True, help="name of the measured campaign")
    parser.add_argument("--measured-iteration", type=int, default=None)
    parser.add_argument("--config", required=True, help="the config to project")
    parser.add_argument("--iteration", type=int, default=1, help="which iteration of --config (default 1)")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs: inference engines and DPO processes")
    arguments = parser.parse_args()
    measured_iteration, measured = measurements(arguments.artifact_root, arguments.campaign,
                                                arguments.measured_iteration)
    config = CampaignConfig.from_yaml(arguments.config)
    rows = project(measured, config, arguments.iteration, arguments.gpus)
    print(f"{config.name} iteration {arguments.iteration} on {arguments.gpus} GPU(s), projected from "
          f"{arguments.campaign} iteration {measured_iteration} ({arguments.artifact_root})")
    print(f"{'stage':<18} {'items':>10} {'tokens':>12} {'tok/s/engine':>13} {'seconds':>10}")
    for row in rows:
        items = f"{row['items']:.0f}" if row["items"] is not None else ""
        tokens = f"{row['tokens']:.0f}" if row["tokens"] is not None else ""
        rate = f"{row['rate']:.1f}" if row["rate"] is not None else ""
        print(f"{row['stage']:<18} {items:>10} {tokens:>12} {rate:>13} {row['seconds']:>10.1f}")
    total = sum(row["seconds"] for row in rows)
    measured_total = sum(stats.get("compute_seconds", 0.0) for stats in measured.values())
    print(f"{'total':<18} {'':>10} {'':>12} {'':>13} {total:>10.1f}  ({total / 3600:.2f} h; the measured iteration's "
          f"stages took {measured_total:.1f} s)")
    print("assumptions: engine throughput independent of load (measure the pilot at the target's concurrency); "
          "linear scaling over engines and DPO processes; items as long as measured, capped by max_tokens; "
          "selection stages as measured; the pilot ran the target's model on the target's hardware")


if __name__ == "__main__":
    main()
