"""Benchmark: what Prefect and the artifact store add to an iteration, and how long a fully cached re-run takes.

For each shard size, one iteration of the config runs on Prefect's (already started) local API into a fresh
artifact folder; its wall time is compared with the sum of its stages' own compute time (measured inside
the stage functions, model loading included). Then the same iteration runs again, fully cached.

Run: python benchmarks/orchestration.py [--config deployments/configs/demo.yaml] [--shard-sizes 4 8]
Target (issue 4): overhead <= 5% of stage compute at the demo size, shrinking with shard size; a fully
cached re-run in seconds with no model loaded.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")

from prefect import flow  # noqa: E402

from flows.iteration import iteration_flow  # noqa: E402
from metareward.config.campaign import CampaignConfig  # noqa: E402
from metareward.pipeline.jobs import add_job_listener  # noqa: E402


@flow(name="warm-up")
def _warm_up() -> None:
    """Starts Prefect's ephemeral API so that its start-up is not counted."""


def _compute_seconds(outcome: dict) -> float:
    return sum(stage.get("compute_seconds", 0.0) for stage in outcome["stages"].values())


def main() -> None:
    """Print wall time, compute time and overhead per shard size, and the cached re-run time."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="deployments/configs/demo.yaml")
    parser.add_argument("--shard-sizes", type=int, nargs="+", default=[4, 8])
    arguments = parser.parse_args()
    base = CampaignConfig.from_yaml(arguments.config)
    _warm_up()
    print(f"{base.name}: iteration 1, {base.iterations[0].num_prompts} prompts")
    computed: list[str] = []
    add_job_listener(lambda job, result: None if result.cached else computed.append(job.run_name))
    print(f"{'shard size':>10} {'wall s':>9} {'compute s':>10} {'overhead':>9} {'cached re-run s':>16} "
          f"{'jobs run again':>15}")
    for shard_size in arguments.shard_sizes:
        root = tempfile.mkdtemp(prefix="metareward-bench-")
        config = base.model_copy(update={"artifact_root": root, "shard_size": shard_size,
                                         "iterations": base.iterations[:1]})
        started = time.perf_counter()
        outcome = iteration_flow(config, 1, config.model.path)
        wall = time.perf_counter() - started
        compute = _compute_seconds(outcome)
        computed.clear()
        started = time.perf_counter()
        iteration_flow(config, 1, config.model.path)
        cached = time.perf_counter() - started
        # A job that runs again is the only way a model gets loaded: 0 means no model was touched.
        print(f"{shard_size:>10} {wall:>9.1f} {compute:>10.1f} {(wall - compute) / compute:>9.1%} {cached:>16.1f} "
              f"{len(computed):>15}")


if __name__ == "__main__":
    main()
