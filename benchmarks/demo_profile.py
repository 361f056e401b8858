"""Benchmark: where the demo's seconds go — each model stage of a finished demo iteration run again with 1 and
with 2 torch threads (generation and forced verdicts timed apart), and its DPO with 1, 2 and 4 pairs per forward.

Reads the iteration's own prompts, responses, judgments and DPO set from the artifact store, so every run sees the
same inputs. Each setting runs in a fresh process (torch's thread count is per process).

Run: python benchmarks/demo_profile.py --artifact-root ROOT [--campaign demo] [--iteration 1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _tables(root: str, campaign: str, iteration: int) -> dict:
    from metareward.artifacts.store import ArtifactStore
    from metareward.pipeline.manifests import read_stage_table, stage_manifests

    store = ArtifactStore(root)
    manifests = stage_manifests(store, campaign)[iteration]
    return {name: read_stage_table(store, manifest) for name, manifest in manifests.items()}


def _stage(root: str, campaign: str, iteration: int, stage: str, threads: int) -> dict:
    from metareward.config.campaign import CampaignConfig
    from metareward.inference.roles import generate_responses, judge_responses, meta_judge
    from metareward.inference.transformers_backend import TransformersBackend
    from metareward.paper.preferences import score_responses, select_judged_responses
    from metareward.training.models import resolve_model

    config = CampaignConfig.from_yaml(Path(__file__).resolve().parents[1] / "deployments/configs/demo.yaml")
    settings = config.iterations[iteration - 1]
    tables = _tables(root, campaign, iteration)
    backend = TransformersBackend(resolve_model(config.model.path), dtype=config.model.dtype,
                                  batch_size=config.inference.batch_size, max_model_len=config.inference.max_model_len,
                                  torch_threads=threads)
    spent = {"generate": 0.0, "choose": 0.0}

    def timed(name, call):
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            result = call(*args, **kwargs)
            spent[name] += time.perf_counter() - started
            return result
        return wrapper

    backend.generate, backend.choose = timed("generate", backend.generate), timed("choose", backend.choose)
    prompts, responses, judgments = tables["prompts"], tables["responses"], tables["judgments"]
    mode = config.inference.verdict_mode
    if stage == "responses":
        generate_responses(prompts, backend, settings.num_responses, settings.actor_sampling, 0, iteration, "p")
    elif stage == "judgments":
        judge_responses(responses, prompts, backend, settings.num_judgments, settings.judge_sampling, 0, mode,
                        iteration, "p")
    else:
        judged = select_judged_responses(score_responses(judgments), 0)
        meta_judge(judged, judgments, responses, prompts, backend, settings.meta_judge_sampling, 0, mode,
                   iteration, "p")
    backend.close()
    return {"stage": stage, "threads": threads, **spent}


def _dpo(root: str, campaign: str, iteration: int, per_device: int, threads: int) -> dict:
    import torch

    from metareward.config.campaign import CampaignConfig
    from metareward.training.models import resolve_model
    from metareward.training.trainer import train_dpo

    torch.set_num_threads(threads)
    config = CampaignConfig.from_yaml(Path(__file__).resolve().parents[1] / "deployments/configs/demo.yaml")
    dpo = config.iterations[iteration - 1].dpo.model_copy(update={"per_device_batch_size": per_device})
    dataset = _tables(root, campaign, iteration)["dpo_dataset"]
    with tempfile.TemporaryDirectory() as scratch:
        started = time.perf_counter()
        result = train_dpo(resolve_model(config.model.path), dataset, dpo, scratch, 0, config.model.dtype)
    runtime = next(entry["train_runtime"] for entry in result.log_history if "train_runtime" in entry)
    return {"stage": f"DPO, {per_device} pair(s) per forward", "threads": threads, "training": runtime,
            "total": time.perf_counter() - started}


def main() -> None:
    """Run every setting in its own process and print the seconds of each."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact-root", required=True)
    parser.add_argument("--campaign", default="demo")
    parser.add_argument("--iteration", type=int, default=1)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.one:
        kind, value, threads = arguments.one.split(":")
        if kind == "dpo":
            row = _dpo(arguments.artifact_root, arguments.campaign, arguments.iteration, int(value), int(threads))
        else:
            row = _stage(arguments.artifact_root, arguments.campaign, arguments.iteration, value, int(threads))
        print(json.dumps(row))
        return
    runs = [f"stage:{stage}:{threads}" for stage in ("responses", "judgments", "meta_judgments") for threads in (1, 2)]
    runs += [f"dpo:{per_device}:2" for per_device in (1, 2, 4)] + ["dpo:2:1"]
    for run in runs:
        command = [sys.executable, __file__, "--artifact-root", arguments.artifact_root, "--campaign",
                   arguments.campaign, "--iteration", str(arguments.iteration), "--one", run]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        row = json.loads(output.strip().splitlines()[-1])
        times = ", ".join(f"{key} {value:.1f} s" for key, value in row.items() if isinstance(value, float))
        print(f"{row['stage']:<28} {row['threads']} thread(s): {times}", flush=True)


if __name__ == "__main__":
    main()
