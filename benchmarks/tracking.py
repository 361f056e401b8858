"""Benchmark: what MLflow logging adds to an iteration, against the iteration's own stage compute time.

Takes a campaign already in an artifact store (e.g. after the demo), logs each of its iterations again into a
fresh MLflow store — a local sqlite store, and, with --server, a `mlflow server` started on 127.0.0.1 — and
prints the seconds Tracker.log_iteration took beside the iteration's summed stage compute seconds (from
its manifests), plus a re-log of the same iteration (which must be a no-op).

Run: python benchmarks/tracking.py CONFIG [--artifact-root ROOT] [--server]
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from metareward.artifacts.store import ArtifactStore  # noqa: E402
from metareward.config.campaign import CampaignConfig  # noqa: E402
from metareward.pipeline.manifests import stage_manifests  # noqa: E402
from metareward.tracking.tracker import Tracker  # noqa: E402


def _time_logging(config: CampaignConfig) -> list[tuple[int, float, float, float]]:
    manifests = stage_manifests(ArtifactStore(config.artifact_root), config.name)
    tracker = Tracker(config)
    parent = tracker.campaign_run()
    rows = []
    for iteration, stages in manifests.items():
        model = stages["prompts"]["model_id"]
        run = tracker.iteration_run(parent, iteration, model, f"benchmark://{model}")
        started = time.perf_counter()
        tracker.log_iteration(parent, run, iteration, list(stages))
        first = time.perf_counter() - started
        started = time.perf_counter()
        tracker.log_iteration(parent, run, iteration, list(stages))
        again = time.perf_counter() - started
        compute = sum(manifest["stats"].get("compute_seconds", 0.0) for manifest in stages.values())
        rows.append((iteration, compute, first, again))
    return rows


def _server(folder: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{folder / 'server.db'}", "--artifacts-destination", str(folder / "a")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(180):
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return server, url
        except httpx.HTTPError:
            time.sleep(0.5)
    server.kill()
    raise RuntimeError("mlflow server did not start")


def main() -> None:
    """Print, per iteration and store, logging seconds against stage compute seconds."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config")
    parser.add_argument("--artifact-root", default=None)
    parser.add_argument("--server", action="store_true", help="also log to a local `mlflow server`")
    arguments = parser.parse_args()
    config = CampaignConfig.from_yaml(arguments.config)
    if arguments.artifact_root:
        config = config.model_copy(update={"artifact_root": arguments.artifact_root})
    with tempfile.TemporaryDirectory() as folder:
        targets = {"sqlite": f"sqlite:///{Path(folder) / 'bench.db'}"}
        server = None
        if arguments.server:
            server, targets["mlflow server"] = _server(Path(folder))
        print("| store | iteration | stage compute | logging | share | re-log (no-op) |")
        print("|---|---|---|---|---|---|")
        try:
            for name, uri in targets.items():
                tracking = config.tracking.model_copy(update={"uri": uri, "experiment": f"bench-{name}",
                                                              "artifact_location": None})
                for iteration, compute, first, again in _time_logging(config.model_copy(update={"tracking": tracking})):
                    print(f"| {name} | {iteration} | {compute:.1f} s | {first:.2f} s | {first / compute:.1%} | "
                          f"{again:.2f} s |")
        finally:
            if server is not None:
                server.terminate()


if __name__ == "__main__":
    main()
