"""Fixtures of the integration tests: a real `mlflow server`."""

from __future__ import annotations

import subprocess
import sys

import pytest

from metareward.host.ports import free_port
from tests.integration.campaigns import cli_environment, wait_until_healthy


@pytest.fixture
def mlflow_server(tmp_path):
    """`mlflow server` with a sqlite store and proxied artifacts in tmp_path; yields its URL."""
    port = free_port()
    log = (tmp_path / "mlflow-server.log").open("w")
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
         "--artifacts-destination", str(tmp_path / "mlflow-artifacts")],
        stdout=log, stderr=subprocess.STDOUT,
        env={**cli_environment(tmp_path / "unused"), "MLFLOW_DISABLE_TELEMETRY": "true"},
    )
    url = f"http://127.0.0.1:{port}"
    wait_until_healthy(f"{url}/health", server, tmp_path / "mlflow-server.log", timeout=90)
    yield url
    server.terminate()
    server.wait(timeout=30)
