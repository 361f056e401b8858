"""Benchmark: time and peak memory of the whole-iteration stages and the iteration report at 1×, 10× (and 30×)
the paper's scale, on synthetic tables (no model).

1× is the paper's iteration: 5,000 prompts × K = 7 responses × N = 11 judgments, the highest-variance response of
each prompt meta-judged on every ordered pair of its judgments (11·10 = 110 meta-judgments per prompt). The
synthetic tables are written shard by shard (256 prompts) through the real ArtifactStore with the real schemas,
jobs and markers (jobs.plan_job / jobs.complete) and stage manifests, as a campaign leaves them. Then each of
actor_pairs, judgment_elo, judge_pairs and dpo_dataset runs as the pipeline runs it (jobs.run_job: read the
inputs, the runner, validate, write), the iteration's report is built as the MLflow tracker builds it
(tracking.record.iteration_record) and the summary as `metareward show` does (summary.stored_outcomes) — each in
a fresh process, so that its peak RSS (ru_maxrss) is that step's alone.

Text lengths (characters): prompts 200–400, responses 400–2,400, judgments 400–1,000, meta-judgments 300–700 —
the order of what an 8B/70B model writes under the paper's prompts. Texts are slices of one random passage, so the
Parquet files are small on disk; in memory they are their full length, which is what the stages pay for.

Run: python benchmarks/scale.py [--scales 1,10] [--data DIR]
Prints per step and scale the wall and CPU seconds (CPU seconds say more on a shared machine) and the peak RSS, the
growth from the first scale to the others measured in the same run, and the blake2b digest of each stage's table
and of the report's paper metrics (a change that must keep tables identical keeps these). Goal (issue 25): linear
time, peak RSS of each step's process <= 4 GB at 10x. The default (1x, 10x) takes a few minutes here; 30x (150,000
prompts, ~1.4 GB of Parquet, ~5 more minutes, peaks of ~6 GB; ~25 GB for Elo before issue 25) is left out unless
--scales names it.
"""

from __future__ import annotations

import argparse
import json
import pickle
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402

from metareward.artifacts.stats import StageStats  # noqa: E402
from metareward.artifacts.store import ArtifactStore  # noqa: E402
from metareward.artifacts.tables import JUDGMENTS, META_JUDGMENTS, PROMPTS, RESPONSES, content_id  # noqa: E402
from metareward.config.campaign import CampaignConfig  # noqa: E402
from metareward.pipeline.context import ModelRef  # noqa: E402
from metareward.pipeline.jobs import complete, plan_job, run_job, shard_inputs  # noqa: E402
from metareward.pipeline.manifests import write_manifest  # noqa: E402
from metareward.pipeline.stages import stage  # noqa: E402

PAPER_PROMPTS = 5_000
"""Prompts of one paper iteration (1×)."""
K, N, SHARD_SIZE = 7, 11, 256
CAMPAIGN = "scale"
MODEL = ModelRef("synthetic", "m-synthetic")
UPSTREAM = ("prompts", "responses", "judgments", "meta_judgments")
STEPS = ("actor_pairs", "judgment_elo", "judge_pairs", "dpo_dataset", "report", "summary")
"""What is measured, in the order it runs (each step reads what the ones before it wrote)."""
ITERATION_STAGES = UPSTREAM[:3] + ("actor_pairs", "meta_judgments", "judgment_elo", "judge_pairs", "dpo_dataset")
PASSAGE = " ".join(np.random.default_rng(0).choice(
    ["the", "response", "score", "judgment", "answer", "is", "clear", "helpful", "because", "it", "covers",
     "user's", "question", "point", "criterion", "award", "additional", "relevant", "however", "lacks"], 1_500))


def config(root: Path, prompts: int) -> CampaignConfig:
    """The campaign the synthetic iteration belongs to: paper iteration 1's selection settings (A.3)."""
    prompt_file = root / "prompts.jsonl"
    if not prompt_file.exists():
        prompt_file.write_text('{"prompt": "synthetic"}\n')
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return CampaignConfig.from_dict({
            "name": CAMPAIGN, "model": {"path": MODEL.uri}, "prompts": {"path": str(prompt_file)},
            "artifact_root": str(root / "store"), "shard_size": SHARD_SIZE,
            "iterations": [{"num_prompts": prompts, "num_responses": K, "num_judgments": N, "rho": 0.0,
                            "max_chosen_response_chars": 2500, "max_chosen_judgment_chars": 1100}]})


def _text(label: str, ids: pl.Expr, rng: np.random.Generator, rows: int, low: int, high: int) -> pl.Expr:
    """A text per row: its label and id, then a random slice of PASSAGE of low..high characters."""
    offsets = pl.Series(rng.integers(0, len(PASSAGE) - high, rows))
    lengths = pl.Series(rng.integers(low, high, rows))
    return pl.concat_str(pl.lit(label), ids, pl.lit(" "), pl.lit(PASSAGE).str.slice(offsets, lengths))


def synthetic_shard(shard: int, prompt_ids: list[str]) -> dict[str, pl.DataFrame]:
    """The responses, judgments and meta-judgments of one shard's prompts (seeded by the shard)."""
    rng = np.random.default_rng(shard)
    provenance = {"iteration": pl.lit(1, pl.Int32), "model_id": pl.lit(MODEL.model_id)}
    responses = (
        pl.DataFrame({"prompt_id": prompt_ids})
        .join(pl.DataFrame({"sample_idx": np.arange(K, dtype=np.int32)}), how="cross")
        .with_columns(response_id=pl.concat_str("prompt_id", pl.lit("-r"), "sample_idx").map_batches(_ids))
    )
    responses = responses.with_columns(text=_text("response ", pl.col("response_id"), rng, responses.height, 400, 2400))
    responses = responses.with_columns(
        n_chars=pl.col("text").str.len_chars().cast(pl.Int32), n_tokens=(pl.col("text").str.len_chars() // 4)
        .cast(pl.Int32), finish_reason=pl.lit("stop"), **provenance).select(RESPONSES.names())
    # The judged response of each prompt has all N scores valid, so it has N·(N−1) meta-judgments, as in the brief.
    judged = pl.DataFrame({"prompt_id": prompt_ids, "judged_idx": rng.integers(0, K, len(prompt_ids)).astype(np.int32)})
    judgments = (
        responses.select("prompt_id", "response_id", "sample_idx")
        .join(judged, on="prompt_id")
        .with_columns(judged=pl.col("sample_idx") == pl.col("judged_idx"))
        .drop("sample_idx", "judged_idx")
        .join(pl.DataFrame({"sample_idx": np.arange(N, dtype=np.int32)}), how="cross")
        .with_columns(judgment_id=pl.concat_str("response_id", pl.lit("-j"), "sample_idx").map_batches(_ids))
    )
    rows = judgments.height
    scores = rng.integers(0, 6, rows).astype(float)
    judgments = judgments.with_columns(
        text=_text("judgment ", pl.col("judgment_id"), rng, rows, 400, 1000),
        score=pl.when(pl.col("judged") | pl.Series(rng.random(rows) > 0.04)).then(pl.Series(scores)),
    ).with_columns(
        verdict_mode=pl.lit("free"), n_chars=pl.col("text").str.len_chars().cast(pl.Int32),
        n_tokens=(pl.col("text").str.len_chars() // 4).cast(pl.Int32), finish_reason=pl.lit("stop"), **provenance)
    pairs = (
        judgments.filter("judged").select("prompt_id", "response_id", first_id="judgment_id")
        .join(judgments.filter("judged").select("response_id", second_id="judgment_id"), on="response_id")
        .filter(pl.col("first_id") != pl.col("second_id"))
        .sort("response_id", "first_id", "second_id")
    )
    draw = rng.random(pairs.height)
    meta = pairs.with_columns(
        text=_text("meta ", pl.col("first_id"), rng, pairs.height, 300, 700),
        winner=pl.when(pl.Series(draw < 0.55)).then(pl.lit("A")).when(pl.Series(draw < 0.95)).then(pl.lit("B")),
        verdict_mode=pl.lit("free"), n_tokens=pl.lit(120, pl.Int32), finish_reason=pl.lit("stop"), **provenance,
    ).select(META_JUDGMENTS.names())
    return {"responses": responses, "judgments": judgments.select(JUDGMENTS.names()), "meta_judgments": meta}


def _ids(texts: pl.Series) -> pl.Series:
    # The pipeline's own content ids, so that joins and sorts see ids shaped as a campaign's.
    return pl.Series([content_id(text) for text in texts])


def write_iteration(root: Path, scale: float) -> None:
    """The upstream stages of one iteration at `scale` × the paper, written shard by shard as jobs with markers and
    stage manifests; their results are pickled for the steps' processes."""
    prompts = int(PAPER_PROMPTS * scale)
    campaign = config(root, prompts)
    store = ArtifactStore(campaign.artifact_root)
    ids = [content_id(f"prompt {index}") for index in range(prompts)]
    rng = np.random.default_rng(prompts)
    prompt_table = pl.DataFrame({"prompt_id": ids}).with_columns(
        prompt=_text("prompt ", pl.col("prompt_id"), rng, prompts, 200, 400), source=pl.lit("synthetic"))
    job = plan_job(campaign, "prompts", 1, {})
    results = {"prompts": [complete(store, job, prompt_table.cast(dict(PROMPTS)), StageStats("prompts", rows=prompts))]}
    shards = -(-prompts // SHARD_SIZE)
    jobs: dict[str, list] = {name: [] for name in UPSTREAM[1:]}
    for name in UPSTREAM[1:]:
        results[name] = []
    for shard in range(shards):
        tables = synthetic_shard(shard, ids[shard * SHARD_SIZE:(shard + 1) * SHARD_SIZE])
        for name in UPSTREAM[1:]:
            inputs = shard_inputs({key: results[key] for key in ("prompts", "responses", "judgments")
                                   if key in _inputs(name)}, shard)
            job = plan_job(campaign, name, 1, inputs, MODEL, shard)
            jobs[name].append(job)
            results[name].append(complete(store, job, tables[name], StageStats(name, rows=tables[name].height)))
    write_manifest(store, CAMPAIGN, [results["prompts"][0].job], results["prompts"])
    for name in UPSTREAM[1:]:
        write_manifest(store, CAMPAIGN, jobs[name], results[name])
    (root / "results.pkl").write_bytes(pickle.dumps(results))


def _inputs(name: str) -> tuple[str, ...]:
    return stage(name).inputs


def run_step(root: Path, step: str) -> dict:
    """Run one step here (in the step's own process) and return its seconds, peak RSS (MiB) and table digest."""
    imported = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    results = pickle.loads((root / "results.pkl").read_bytes())
    campaign = config(root, results["prompts"][0].table.rows)
    store = ArtifactStore(campaign.artifact_root)
    started = time.perf_counter()
    cpu_before = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
    digest, rows = "", 0
    if step == "report":
        from metareward.tracking.record import iteration_record
        record = iteration_record(store, CAMPAIGN, 1, list(ITERATION_STAGES))
        # The bookkeeping (stages.json) holds each stage's measured seconds: only the paper's figures must not change.
        digest = content_id(json.dumps(record.paper_metrics, sort_keys=True))
        rows = len(record.metrics)
    elif step == "summary":
        from metareward.pipeline.summary import stored_outcomes, summary_rows
        [outcome] = stored_outcomes(store, CAMPAIGN)
        rows = len(summary_rows(outcome["stages"]))
    else:
        store.delete_prefix(f"{CAMPAIGN}/iter-1/{step}")  # a re-run on kept data computes it again
        inputs = {name: results[name] for name in stage(step).inputs if name in results}
        job = plan_job(campaign, step, 1, inputs)
        result = run_job(campaign, job, store)
        write_manifest(store, CAMPAIGN, [job], [result])
        results[step] = [result]
        (root / "results.pkl").write_bytes(pickle.dumps(results))
        digest, rows = result.table.digest, result.table.rows
    seconds = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"step": step, "seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime - cpu_before,
            "peak_mib": usage.ru_maxrss / 1024, "imported_mib": imported, "rows": rows, "digest": digest}


def _in_child(arguments: list[str]) -> dict:
    output = subprocess.run([sys.executable, __file__, *arguments], capture_output=True, text=True)
    if output.returncode:
        raise SystemExit(f"{' '.join(arguments)} failed:\n{output.stderr}")
    return json.loads(output.stdout.strip().splitlines()[-1])


def main() -> None:
    """Write each scale's tables, run every step in its own process, print the figures and the growth."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scales", default="1,10", help="comma-separated multiples of the paper's 5,000 prompts")
    parser.add_argument("--data", help="keep the synthetic tables in this folder (and reuse them if there)")
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("--write", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.write:
        write_iteration(Path(arguments.root), float(arguments.scales))
        print(json.dumps({"peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
        return
    if arguments.step:
        print(json.dumps(run_step(Path(arguments.root), arguments.step)))
        return

    scales = [float(scale) for scale in arguments.scales.split(",")]
    keep = Path(arguments.data) if arguments.data else None
    figures: dict[float, dict[str, dict]] = {}
    with tempfile.TemporaryDirectory(prefix="metareward-scale-") as scratch:
        for scale in scales:
            root = (keep or Path(scratch)) / f"x{scale:g}"
            root.mkdir(parents=True, exist_ok=True)
            if not (root / "results.pkl").exists():
                started = time.perf_counter()
                written = _in_child(["--write", "--scales", str(scale), "--root", str(root)])
                print(f"{scale:g}x: synthetic tables written in {time.perf_counter() - started:.0f} s "
                      f"(writer's peak {written['peak_mib']:.0f} MiB)", flush=True)
            figures[scale] = {}
            for step in STEPS:
                figure = _in_child(["--step", step, "--root", str(root)])
                figures[scale][step] = figure
                print(f"{scale:g}x {step:<13} {figure['seconds']:8.2f} s {figure['cpu_seconds']:8.2f} s CPU "
                      f"{figure['peak_mib']:8.0f} MiB "
                      f"(imports {figure['imported_mib']:4.0f}) {figure['rows']:>9} rows  {figure['digest']}",
                      flush=True)
    base = scales[0]
    print(f"\ngrowth against {base:g}x (same run)")
    print(f"{'step':<13}" + "".join(f"{f'{s:g}x time':>12}{f'{s:g}x CPU':>11}{f'{s:g}x RSS':>11}"
                                    for s in scales[1:]))
    for step in STEPS:
        line = f"{step:<13}"
        for scale in scales[1:]:
            one, many = figures[base][step], figures[scale][step]
            line += "".join(f"{many[key] / max(one[key], 1e-3):10.1f}x" + " " * (key == "seconds")
                            for key in ("seconds", "cpu_seconds", "peak_mib"))
        print(line)
    if 10.0 in figures:
        worst = max(figures[10.0].values(), key=lambda figure: figure["peak_mib"])
        print(f"\ngoal: peak RSS of each step <= 4 GB at 10x: {'met' if worst['peak_mib'] <= 4096 else 'NOT met'} "
              f"(largest: {worst['step']}, {worst['peak_mib']:.0f} MiB)")


if __name__ == "__main__":
    main()
