"""The compose stack as a scheduled run meets it: infra/docker-compose.yml's services started as local processes with
the commands and environments the file gives them (interpolated by docker-compose itself; only host names, ports
and /opt/metareward are rewritten), PostgreSQL from Debian's package in the postgres image's place and moto's S3
server in MinIO's, authentication on. A tiny campaign started as the UI's Run button does fails on a stage, is
retried as the UI's Retry does, and finishes on S3 without recomputing a finished shard."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import pytest
import yaml

from metareward.host.ports import free_port
from tests.integration.campaigns import wait_until_healthy, write_config

pytestmark = pytest.mark.slow

REPO = Path(__file__).parents[2]
COMPOSE_FILE = REPO / "infra" / "docker-compose.yml"
SECRETS = {"MINIO_ROOT_PASSWORD": "minio-test-secret", "PREFECT_DB_PASSWORD": "prefect-db-secret",
           "MLFLOW_DB_PASSWORD": "mlflow-db-secret", "PREFECT_AUTH_STRING": "metareward:prefect-auth-secret",
           "MLFLOW_ADMIN_PASSWORD": "mlflow-admin-secret", "MLFLOW_SECRET_KEY": "mlflow-flask-secret"}
IMAGE_ENV = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
"""infra/Dockerfile's ENV lines that the services inherit (test_the_image_environment_is_the_tests checks them)."""
TEST_SPEED = {"PREFECT_WORKER_QUERY_SECONDS": "2", "PREFECT_WORKER_PREFETCH_SECONDS": "5"}
"""The only settings the test adds to a service: the worker polls every 2 s instead of 10."""


def compose_services() -> dict:
    """The compose file's services as docker-compose itself interpolates them with SECRETS."""
    compose = [shutil.which("docker"), "compose"] if shutil.which("docker") and subprocess.run(
        ["docker", "compose", "version"], capture_output=True).returncode == 0 else [shutil.which("docker-compose")]
    if compose[0] is None:
        if os.environ.get("CI"):
            pytest.fail("no docker compose on a CI machine: .ci/run installs docker-compose")
        pytest.skip("docker compose is not installed")
    result = subprocess.run([*compose, "-f", str(COMPOSE_FILE), "config"], capture_output=True, text=True,
                            env={"PATH": os.environ["PATH"], **SECRETS}, cwd=REPO)
    assert result.returncode == 0, result.stderr
    return yaml.safe_load(result.stdout)["services"]


def _postgres_bin() -> Path:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        if os.environ.get("CI"):
            pytest.fail("no PostgreSQL server on a CI machine: .ci/run installs Debian's postgresql")
        pytest.skip("Debian's postgresql is not installed")
    return Path(found[-1]).parent


class Stack:
    """The services as processes; `localize` rewrites compose host names and ports to this machine's."""

    def __init__(self, home: Path):
        self.home = home
        self.ports = {name: free_port() for name in ("postgres", "s3", "prefect", "mlflow")}
        self.processes: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        self.timings: dict[str, float] = {}

    def localize(self, text: str) -> str:
        p = self.ports
        for old, new in (("0.0.0.0 --port 4200", f"127.0.0.1 --port {p['prefect']}"),
                         ("0.0.0.0 --port 5000", f"127.0.0.1 --port {p['mlflow']}"),
                         ("postgres:5432", f"127.0.0.1:{p['postgres']}"),
                         ("http://minio:9000", f"http://127.0.0.1:{p['s3']}"),
                         ("prefect-server:4200", f"127.0.0.1:{p['prefect']}"),
                         ("127.0.0.1:4200", f"127.0.0.1:{p['prefect']}"),
                         ("mlflow:5000", f"127.0.0.1:{p['mlflow']}"),
                         ("/opt/metareward", str(REPO)), (".venv/bin/", f"{REPO}/.venv/bin/")):
            text = text.replace(old, new)
        return text

    def environment(self, service: dict) -> dict[str, str]:
        """A container's environment: the image's PATH and ENV, then the service's own, localized."""
        own = {key: self.localize(str(value)) for key, value in (service.get("environment") or {}).items()}
        return {"PATH": f"{REPO}/.venv/bin:{os.environ['PATH']}", "HOME": str(self.home), "LANG": "C.UTF-8",
                **IMAGE_ENV, **own}

    def start(self, name: str, command: list[str], env: dict[str, str], cwd: Path = REPO,
              user: str | None = None) -> subprocess.Popen:
        log = self.home / f"{name}.log"
        self.logs.append(log)
        process = subprocess.Popen(command, env=env, cwd=cwd, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                   start_new_session=True, **_as_user(user))
        self.processes.append(process)
        return process

    def stop(self) -> None:
        for process in reversed(self.processes):
            if process.poll() is None:
                os.killpg(process.pid, 15)
        for process in self.processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)


def _as_user(user: str | None) -> dict:
    """subprocess options that run a command as `user` (PostgreSQL refuses to run as root)."""
    return {"user": user, "group": user, "extra_groups": []} if user else {}


def _service_command(service: dict, stack: Stack | None = None) -> list[str]:
    """The service's command as compose runs it (a string is split as a shell would, without a shell), localized."""
    command = service["command"]
    text = shlex.join(command) if isinstance(command, list) else command
    return shlex.split(stack.localize(text) if stack else text)


def _start_postgres(stack: Stack, service: dict) -> None:
    """The postgres image's entrypoint: initdb with POSTGRES_USER/PASSWORD, POSTGRES_DB, then the mounted init
    scripts; the server as the postgres user (it refuses root), listening on 127.0.0.1 only."""
    started = time.monotonic()
    binaries = _postgres_bin()
    env = stack.environment(service)
    data = Path(tempfile.mkdtemp(prefix="metareward-pg-", dir="/tmp"))
    password = data / "password"
    password.write_text(env["POSTGRES_PASSWORD"])
    user = "postgres" if os.getuid() == 0 else None
    if user:
        shutil.chown(data, user)
        shutil.chown(password, user)
    subprocess.run([str(binaries / "initdb"), "-D", str(data / "db"), "-U", env["POSTGRES_USER"],
                    f"--pwfile={password}", "--auth=scram-sha-256"], check=True, capture_output=True, cwd=data,
                   **_as_user(user))
    stack.start("postgres", [str(binaries / "postgres"), "-D", str(data / "db"), "-p", str(stack.ports["postgres"]),
                             "-h", "127.0.0.1", "-c", f"unix_socket_directories={data}"], env={}, cwd=data, user=user)
    client = {**os.environ, "PGHOST": "127.0.0.1", "PGPORT": str(stack.ports["postgres"]),
              "PGPASSWORD": env["POSTGRES_PASSWORD"], **env}
    deadline = time.monotonic() + 60
    while subprocess.run(["pg_isready", "-h", "127.0.0.1", "-p", str(stack.ports["postgres"])],
                         capture_output=True).returncode != 0:
        assert time.monotonic() < deadline, (stack.home / "postgres.log").read_text()
        time.sleep(0.5)
    subprocess.run(["psql", "-U", env["POSTGRES_USER"], "-d", "postgres", "-c",
                    f'CREATE DATABASE "{env["POSTGRES_DB"]}"'], env=client, check=True, capture_output=True)
    for volume in service.get("volumes", []):
        source = volume["source"] if isinstance(volume, dict) else volume.split(":")[0]
        target = volume["target"] if isinstance(volume, dict) else volume.split(":")[1]
        if target.startswith("/docker-entrypoint-initdb.d/"):
            result = subprocess.run(["sh", source], env=client, capture_output=True, text=True)
            assert result.returncode == 0, result.stderr
    stack.timings["postgres"] = time.monotonic() - started


@pytest.fixture(scope="module")
def stack():
    services = compose_services()
    home = Path(tempfile.mkdtemp(prefix="metareward-stack-"))
    stack = Stack(home)
    try:
        _start_postgres(stack, services["postgres"])
        # moto's S3 server in MinIO's place, with the buckets minio-buckets creates.
        started = time.monotonic()
        s3 = stack.start("s3", [f"{REPO}/.venv/bin/moto_server", "-H", "127.0.0.1", "-p", str(stack.ports["s3"])],
                         env={**os.environ})
        wait_until_healthy(f"http://127.0.0.1:{stack.ports['s3']}/moto-api/", s3, home / "s3.log", timeout=60)
        buckets = re.findall(r"local/([a-z0-9-]+)", " ".join(_service_command(services["minio-buckets"])))
        for bucket in buckets:
            httpx.put(f"http://127.0.0.1:{stack.ports['s3']}/{bucket}").raise_for_status()
        stack.timings["s3"] = time.monotonic() - started

        for name, health, cwd in (("prefect-server", f"http://127.0.0.1:{stack.ports['prefect']}/api/health", REPO),
                                  ("mlflow", f"http://127.0.0.1:{stack.ports['mlflow']}/health", home)):
            started = time.monotonic()
            service = services[name]
            process = stack.start(name, _service_command(service, stack), stack.environment(service), cwd=cwd)
            wait_until_healthy(health, process, home / f"{name}.log", timeout=240)
            stack.timings[name] = time.monotonic() - started

        started = time.monotonic()
        worker_env = {**stack.environment(services["worker"]), **TEST_SPEED}
        stack.start("worker", _service_command(services["worker"], stack), worker_env)
        stack.worker_env = worker_env
        stack.wait_for_deployments(timeout=300)
        stack.timings["worker: bootstrap + deploy"] = time.monotonic() - started
        yield stack
    finally:
        stack.stop()
        for log in stack.logs:
            if log.exists():
                print(f"--- {log.name} (tail)\n{log.read_text()[-2500:]}")
        print("timings (s):", json.dumps({k: round(v, 1) for k, v in stack.timings.items()}))


def _wait_for_deployments(self: Stack, timeout: float) -> None:
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with _prefect(self), get_client(sync_client=True) as client:
        while True:
            names = {deployment.name for deployment in client.read_deployments()}
            if {"demo", "shard-gpu"} <= names:
                return
            worker = self.processes[-1]
            assert worker.poll() is None and time.monotonic() < deadline, (self.home / "worker.log").read_text()
            time.sleep(2)


Stack.wait_for_deployments = _wait_for_deployments


def _prefect(stack: Stack):
    """Prefect's client settings of the worker: the API URL and its auth string."""
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    return temporary_settings({PREFECT_API_URL: stack.worker_env["PREFECT_API_URL"],
                               PREFECT_API_AUTH_STRING: stack.worker_env["PREFECT_API_AUTH_STRING"]})


def _wait_final(stack: Stack, flow_run_id, timeout: float = 900):
    from prefect.client.orchestration import get_client

    deadline = time.monotonic() + timeout
    with _prefect(stack), get_client(sync_client=True) as client:
        while not (flow_run := client.read_flow_run(flow_run_id)).state.is_final():
            assert time.monotonic() < deadline, f"{flow_run.name}: {flow_run.state}"
            time.sleep(2)
    return flow_run


def test_without_credentials_every_service_refuses(stack):
    prefect, mlflow = stack.ports["prefect"], stack.ports["mlflow"]
    assert httpx.post(f"http://127.0.0.1:{prefect}/api/flow_runs/filter", json={}).status_code == 401
    assert httpx.get(f"http://127.0.0.1:{mlflow}/api/2.0/mlflow/experiments/search",
                     params={"max_results": 1}).status_code == 401
    authorized = httpx.get(f"http://127.0.0.1:{mlflow}/api/2.0/mlflow/experiments/search",
                           params={"max_results": 1}, auth=("admin", SECRETS["MLFLOW_ADMIN_PASSWORD"]))
    assert authorized.status_code == 200


def test_the_bootstrap_created_the_gpu_queues_by_priority_and_the_zombie_automation(stack):
    from prefect.client.orchestration import get_client

    with _prefect(stack), get_client(sync_client=True) as client:
        queues = {queue.name: queue.priority for queue in client.read_work_queues(work_pool_name="metareward-gpu")}
        [automation] = client.read_automations_by_name("metareward-crash-zombie-flow-runs")
        demo = client.read_deployment_by_name("metareward-campaign/demo")
    assert queues["shards"] < queues["campaigns"]
    assert automation.enabled and automation.actions[0].type == "change-flow-run-state"
    assert demo.global_concurrency_limit.limit == 1
    assert demo.concurrency_options.collision_strategy.value == "ENQUEUE"


def test_a_campaign_started_from_the_ui_runs_on_s3_fails_and_its_retry_recomputes_no_finished_shard(
        stack, tmp_path, tiny_model, monkeypatch):
    from mlflow.tracking import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.states import Scheduled

    from metareward.artifacts.store import ArtifactStore
    from metareward.pipeline.manifests import stage_manifests

    local_root = tmp_path / "artifacts-on-the-worker"
    config = yaml.safe_load(write_config(tmp_path, tiny_model, str(local_root), name="stacked", tracking={},
                                         orchestration={"retries": 1, "retry_backoff_s": 0.5}).read_text())
    switch = tmp_path / "judgments-shard-1-fails"
    switch.write_text("while this file exists")
    fault = json.dumps({"METAREWARD_INJECT_FAULT": f"judgments:shard-0001:while={switch}"})
    # The UI's Run → Custom run: the deployment, its parameters, a job variable.
    started = time.monotonic()
    result = subprocess.run([f"{REPO}/.venv/bin/prefect", "deployment", "run", "metareward-campaign/demo",
                             "--params", json.dumps({"config": config}), "--job-variable", f"env={fault}"],
                            env=stack.worker_env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", result.stdout).group(1)
    flow_run = _wait_final(stack, flow_run_id)
    stack.timings["campaign run, failing"] = time.monotonic() - started
    assert flow_run.state.is_failed(), flow_run.state
    assert "judgments" in (flow_run.state.message or "") or flow_run.state.is_failed()

    for name, value in stack.worker_env.items():
        if name.startswith("AWS_"):
            monkeypatch.setenv(name, value)
    finished_before = _parquet_versions(stack)
    assert any("/judgments/" in key for key in finished_before)  # shard 0 of the failed stage had finished

    # The fault is gone; the failed flow run is retried as the UI's Retry button does it.
    switch.unlink()
    started = time.monotonic()
    with _prefect(stack), get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, Scheduled(name="AwaitingRetry"), force=True)
    flow_run = _wait_final(stack, flow_run_id)
    stack.timings["campaign retry"] = time.monotonic() - started
    assert flow_run.state.is_completed(), flow_run.state

    # Every table is on S3, none on the worker's disk.
    store = ArtifactStore("s3://metareward/campaigns")
    manifests = stage_manifests(store, "stacked")[1]
    assert not local_root.exists()
    assert {"responses", "judgments", "dpo_dataset", "checkpoint"} <= set(manifests)
    assert manifests["checkpoint"]["stats"]["model_uri"].startswith("s3://metareward/campaigns/stacked/")
    # The retry recomputed no shard the failed run had finished: each of their Parquet files is the same object.
    after = _parquet_versions(stack)
    assert {key: after.get(key) for key in finished_before} == finished_before
    assert len(after) > len(finished_before)

    # The run's log says where each setting came from, and no secret's value.
    with _prefect(stack), get_client(sync_client=True) as client:
        runs = [flow_run_id] + [run.id for run in client.read_flow_runs() if run.parent_task_run_id]
        logs = "\n".join(log.message for log in client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=runs))))
    assert "artifact root: s3://metareward/campaigns (from $METAREWARD_ARTIFACT_ROOT)" in logs
    assert f"MLflow tracking URI: http://127.0.0.1:{stack.ports['mlflow']} (from $MLFLOW_TRACKING_URI)" in logs
    assert not any(secret in logs for secret in SECRETS.values())

    # MLflow, on PostgreSQL behind basic auth, holds the campaign and iteration runs with their S3 datasets.
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.setenv(name, stack.worker_env[name])
    client = MlflowClient(stack.worker_env["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("stacked")
    runs = client.search_runs([experiment.experiment_id])
    kinds = sorted(run.data.tags.get("metareward.kind", "") for run in runs)
    assert kinds.count("campaign") >= 1 and kinds.count("iteration") >= 1
    # Every stage table is on S3 (the campaign run's prompt file is the user's file, where it lies).
    sources = [json.loads(dataset.dataset.source) for run in runs for dataset in run.inputs.dataset_inputs
               if not dataset.dataset.name.endswith("/prompt-file")]
    assert sources and all(next(iter(source.values())).startswith("s3://metareward/campaigns/") for source in sources)
    print("timings (s):", json.dumps({k: round(v, 1) for k, v in stack.timings.items()}))


def _parquet_versions(stack: Stack) -> dict[str, tuple[str, str]]:
    """Every Parquet object in the metareward bucket with its ETag and last-modified time."""
    import boto3

    client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{stack.ports['s3']}")
    pages = client.get_paginator("list_objects_v2").paginate(Bucket="metareward")
    return {item["Key"]: (item["ETag"], str(item["LastModified"])) for page in pages
            for item in page.get("Contents", []) if item["Key"].endswith(".parquet")}


def test_the_image_environment_is_the_tests():
    dockerfile = (REPO / "infra" / "Dockerfile").read_text()
    for name, value in IMAGE_ENV.items():
        assert f"{name}={value}" in dockerfile


def test_a_flow_run_whose_process_and_worker_die_is_marked_crashed_by_the_zombie_automation(stack, tmp_path,
                                                                                           tiny_model):
    # Runs last in this module: it kills the worker. Its node lost, nothing is left to report the run's end: only
    # the missing heartbeats (every 30 s, the compose worker's PREFECT_FLOWS_HEARTBEAT_FREQUENCY) can.
    config = yaml.safe_load(write_config(tmp_path, tiny_model, str(tmp_path / "artifacts"), name="zombie").read_text())
    release = tmp_path / "release"
    fault = json.dumps({"METAREWARD_INJECT_FAULT": f"responses:shard-0000:hold={release}"})
    result = subprocess.run([f"{REPO}/.venv/bin/prefect", "deployment", "run", "metareward-campaign/demo",
                             "--params", json.dumps({"config": config}), "--job-variable", f"env={fault}"],
                            env=stack.worker_env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    flow_run_id = re.search(r"UUID: ([0-9a-f-]{36})", result.stdout).group(1)
    started = release.with_name("release.started")
    deadline = time.monotonic() + 300
    while not started.exists():  # the flow run is inside its first model stage, heartbeats going
        assert time.monotonic() < deadline, (stack.home / "worker.log").read_text()[-3000:]
        time.sleep(0.5)
    worker = next(process for process in stack.processes if process.args[:1] == ["/bin/sh"])
    os.killpg(worker.pid, 9)  # the worker and its flow-run process, as a lost node takes them
    with contextlib.suppress(ProcessLookupError):  # in the worker's process group or not
        os.kill(json.loads(started.read_text())["pid"], 9)
    killed = time.monotonic()
    flow_run = _wait_final(stack, flow_run_id, timeout=300)
    assert flow_run.state.is_crashed(), flow_run.state
    assert "metareward-crash-zombie-flow-runs" in flow_run.state.message
    print(f"marked crashed {time.monotonic() - killed:.0f} s after its process and worker were killed")
