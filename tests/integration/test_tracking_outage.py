"""MLflow down mid-campaign: model work never waits on tracking, the campaign finishes and says tracking was
degraded, and `metareward track` completes the MLflow record afterwards — one run per iteration, nothing twice.
Against real servers: an `mlflow server` this test stops and starts again on the same store, and stand-ins for a
server that hangs or fails every call."""

from __future__ import annotations

import datetime as dt
import http.server
import json
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import yaml

from metareward.config.campaign import CampaignConfig
from metareward.host.ports import free_port
from metareward.tracking.campaign_log import HEALTH_TIMEOUT_S, TrackingDegraded, catch_up, start_iteration
from metareward.tracking.tracker import REQUEST_LIMITS
from tests.conftest import PROMPT_FILE
from tests.integration.campaigns import (
    assert_mlflow_lineage,
    cli_environment,
    mlflow_state,
    run_cli,
    start_cli,
    wait_for,
    wait_until_healthy,
    write_config,
)

CAMPAIGN_END_AFTER_TRAINING_S = 60
"""The most the campaign may take from iteration 2's trained checkpoint to its process's exit with MLflow down:
the iteration's tracking (given up at once), its summary, the paper's tables, Prefect's shutdown. MLflow's default
retries alone would hold a single call for about 4 minutes."""


def start_mlflow(folder: Path, port: int) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1:port with its sqlite store and artifacts in `folder` (the same on a restart)."""
    log = folder / "mlflow-server.log"
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
         "--artifacts-destination", str(folder / "mlflow-artifacts")],
        stdout=log.open("a"), stderr=subprocess.STDOUT,
        env={**cli_environment(folder / "unused"), "MLFLOW_DISABLE_TELEMETRY": "true"})
    wait_until_healthy(f"http://127.0.0.1:{port}/health", server, log, timeout=90)
    return server


def stop(server: subprocess.Popen) -> None:
    server.terminate()
    server.wait(timeout=30)


def record(client, experiment_id: str) -> dict:
    """What must not change when nothing is left to log: runs (id, status, end time), models, versions, points."""
    state = mlflow_state(client, experiment_id)
    runs = state["campaign"] + state["iterations"]
    return {"runs": [(r.info.run_id, r.info.status, r.info.end_time) for r in runs],
            "models": sorted(m.model_id for m in state["models"]),
            "versions": [(v.version, v.run_id) for v in state["versions"]],
            "points": {r.info.run_id: len(client.get_metric_history(r.info.run_id, "judge/score_mean")) for r in runs}}


class CuttingProxy:
    """An HTTP proxy in front of an MLflow server that forwards every request until `cut_after` calls to `path` have
    gone through, and from the next one on answers 503 to everything: a server going down at a known call."""

    def __init__(self, upstream: str, path: str, cut_after: int):
        proxy = self
        self.calls, self.down = 0, False

        class Forward(http.server.BaseHTTPRequestHandler):
            def forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if self.path.startswith(path) and not proxy.down:
                    proxy.down = proxy.calls == cut_after
                    proxy.calls += not proxy.down
                if proxy.down:
                    self.send_response(503)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
                answer = httpx.request(self.command, upstream + self.path, headers=headers, content=body, timeout=60)
                self.send_response(answer.status_code)
                for key, value in answer.headers.items():
                    if key.lower() not in ("content-length", "content-encoding", "transfer-encoding", "connection"):
                        self.send_header(key, value)
                self.send_header("Content-Length", str(len(answer.content)))
                self.end_headers()
                self.wfile.write(answer.content)

            do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = forward

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Forward)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.mark.slow
def test_mlflow_down_mid_campaign_then_track_completes_the_record(tmp_path, tiny_model, monkeypatch):
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    # Iteration 2 takes 8 prompts (shards 0-3) where iteration 1 takes 6 (shards 0-2): responses' shard-0003 is a
    # job of iteration 2 alone, held as it starts, when both iteration 1's runs and iteration 2's are open.
    (tmp_path / "prompts.jsonl").write_text("".join(PROMPT_FILE.read_text().splitlines(keepends=True)[:14]))
    root = tmp_path / "artifacts"
    config = write_config(tmp_path, tiny_model, str(root), iterations=2, tracking={})
    raw = yaml.safe_load(config.read_text())
    raw["iterations"][1] = {**raw["iterations"][1], "num_prompts": 8}  # one dict in the YAML: copied
    config.write_text(yaml.safe_dump(raw))
    mlflow_folder = tmp_path / "mlflow"
    mlflow_folder.mkdir()
    port = free_port()
    server = start_mlflow(mlflow_folder, port)
    url = f"http://127.0.0.1:{port}"
    env = cli_environment(tmp_path / "prefect", MLFLOW_TRACKING_URI=url)
    release = tmp_path / "release"
    held = {**env, "METAREWARD_INJECT_FAULT": f"responses:shard-0003:hold={release}"}
    process = start_cli(["run", str(config)], held, log := tmp_path / "run.log")
    try:
        wait_for(lambda: release.with_name("release.started").exists(), process, log, "held job of iteration 2",
                 timeout_s=420)
        client = MlflowClient(url)
        experiment_id = client.get_experiment_by_name("tiny").experiment_id
        before = mlflow_state(client, experiment_id)
        assert [r.info.status for r in before["iterations"]] == ["FINISHED", "RUNNING"]
        assert "judge/score_mean" in before["iterations"][0].data.metrics
        kept_ids = [r.info.run_id for r in before["campaign"] + before["iterations"]]

        stop(server)  # the outage is in place before iteration 2 goes on
        release.touch()
        assert process.wait(timeout=600) == 0, log.read_text()[-4000:]
        ended = dt.datetime.now(dt.UTC)
    finally:
        if process.poll() is None:
            process.kill()
    output = log.read_text()

    # Model work did not wait on tracking: from iteration 2's trained checkpoint to the end in seconds.
    trained = json.loads(next((root / "tiny/iter-2/checkpoint").glob("all-*.json")).read_text())
    after_training = (ended - dt.datetime.fromisoformat(trained["finished_at"])).total_seconds()
    assert after_training < CAMPAIGN_END_AFTER_TRAINING_S, output[-4000:]
    # The user was told what was not logged and how to log it; the campaign itself completed.
    assert "tracking degraded: iteration 2 is not logged" in output
    assert "metareward track CONFIG" in output and "does not answer /health" in output
    assert "tracking degraded: iteration 1" not in output
    assert "Finished in state Completed()" in output.split("tracking degraded: iteration 2")[-1]

    # What was kept: iteration 1 logged; iteration 2's run open and empty, M_3 not registered.
    server = start_mlflow(mlflow_folder, port)
    try:
        kept = mlflow_state(client, experiment_id)
        assert [r.info.status for r in kept["campaign"] + kept["iterations"]] == ["RUNNING", "FINISHED", "RUNNING"]
        assert not any(name.startswith("judge/") for name in kept["iterations"][1].data.metrics)
        assert [v.version for v in kept["versions"]] == ["1", "2"]

        # MLflow goes down again during a catch-up, once iteration 2's metrics are logged and before the campaign
        # run's are (the second log-batch call): what that attempt logged must not be logged twice after.
        proxy = CuttingProxy(url, "/api/2.0/mlflow/runs/log-batch", cut_after=1)
        for name in REQUEST_LIMITS:
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", proxy.url)
        try:
            with pytest.raises(MlflowException):
                catch_up(CampaignConfig.from_yaml(config))
        finally:
            proxy.close()
        assert proxy.down and proxy.calls == 1
        cut_short = mlflow_state(client, experiment_id)
        assert "judge/score_mean" in cut_short["iterations"][1].data.metrics
        assert [m.step for m in client.get_metric_history(kept_ids[0], "judge/score_mean")] == [1]

        # What is redone: `metareward track` logs iteration 2 into its run, and nothing else.
        started = time.monotonic()
        tracked = run_cli(["track", str(config)], env, timeout=300)
        assert tracked.returncode == 0, tracked.stdout[-3000:] + tracked.stderr[-3000:]
        assert time.monotonic() - started < 120
        lines = tracked.stdout.splitlines()
        assert lines[0] == f"iteration 1: already logged (run {kept_ids[1]})"
        assert lines[1].startswith("iteration 2: logged (run reopened: ") and kept_ids[2] in lines[1]
        assert lines[2].startswith("campaign run finished: ")
        # The record an uninterrupted campaign leaves, in the same runs (none added).
        state = assert_mlflow_lineage(client, root, tmp_path)
        assert [r.info.run_id for r in state["campaign"] + state["iterations"]] == kept_ids
        for run_id in kept_ids:  # one point per metric and step, the cut-short attempt's included
            for key in client.get_run(run_id).data.metrics:
                steps = [point.step for point in client.get_metric_history(run_id, key)]
                assert len(steps) == len(set(steps)), (run_id, key, steps)

        # Again: nothing is left to log, and nothing changes.
        complete = record(client, experiment_id)
        again = run_cli(["track", str(config)], env, timeout=300)
        assert again.returncode == 0, again.stderr[-3000:]
        assert again.stdout.splitlines() == [f"iteration {t}: already logged (run {kept_ids[t]})" for t in (1, 2)]
        assert record(client, experiment_id) == complete
    finally:
        stop(server)


def _config(tmp_path: Path, tiny_model: Path, uri: str) -> CampaignConfig:
    return CampaignConfig.from_yaml(write_config(tmp_path, tiny_model, str(tmp_path / "artifacts"),
                                                 tracking={"uri": uri}))


class _FailingServer(http.server.BaseHTTPRequestHandler):
    """Answers /health, and 503 (a status MLflow retries) to every API call."""

    def do_GET(self):  # noqa: N802 — http.server's name
        self.send_response(200 if self.path == "/health" else 503)
        self.end_headers()
        self.wfile.write(b"OK")

    do_POST = do_GET

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("server", ["refused", "hangs", "fails every call"])
def test_tracking_gives_up_in_seconds(tmp_path, tiny_model, monkeypatch, server):
    for name in REQUEST_LIMITS:
        monkeypatch.delenv(name, raising=False)  # the limits the Tracker sets, not the environment's
    port = free_port()
    if server == "hangs":  # accepts connections (the kernel's backlog) and never answers
        listener = socket.create_server(("127.0.0.1", port))
    elif server == "fails every call":
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), _FailingServer)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
    config = _config(tmp_path, tiny_model, f"http://127.0.0.1:{port}")
    started = time.monotonic()
    try:
        with pytest.raises(TrackingDegraded) as raised:
            start_iteration(config, 2, "0123456789abcdef", str(tiny_model))
    finally:
        if server == "hangs":
            listener.close()
        elif server == "fails every call":
            httpd.shutdown()
    elapsed = time.monotonic() - started
    # Refused at once; a hanging server is given HEALTH_TIMEOUT_S; one that fails is retried twice (about 1 and
    # 2 s, up to 1 s of jitter each) where MLflow's defaults would retry 7 times over about 4 minutes.
    assert elapsed < {"refused": 3, "hangs": HEALTH_TIMEOUT_S + 3, "fails every call": 12}[server]
    message = str(raised.value)
    assert message.startswith("tracking degraded: iteration 2 has no MLflow run from this campaign run")
    assert f"MLflow at http://127.0.0.1:{port})" in message and "metareward track CONFIG" in message
    assert ("does not answer /health" in message) == (server != "fails every call")
