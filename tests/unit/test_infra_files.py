"""The shipped infrastructure files: prefect.yaml's configs equal the config files, the compose file is valid."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from metareward.config.campaign import CampaignConfig

REPO = Path(__file__).parents[2]


def test_prefect_yaml_configs_are_the_shipped_config_files():
    deployments = {d["name"]: d
                   for d in yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())["deployments"]}
    demo = CampaignConfig.from_yaml(REPO / "deployments" / "configs" / "demo.yaml")
    for name in ("demo", "demo-iteration", "demo-evaluation"):
        assert CampaignConfig.from_dict(deployments[name]["parameters"]["config"]) == demo, name
    baseline = CampaignConfig.from_dict(deployments["demo-self-rewarding"]["parameters"]["config"])
    assert baseline == CampaignConfig.from_yaml(REPO / "deployments" / "configs" / "self-rewarding-demo.yaml")
    for name, gpus in (("paper-llama3-8b", 8), ("paper-llama3-8b-1gpu", 1), ("self-rewarding-llama3-8b", 8)):
        paper = CampaignConfig.from_dict(deployments[name]["parameters"]["config"])
        assert paper == CampaignConfig.from_yaml(REPO / "deployments" / "configs" / f"{name}.yaml"), name
        # One GPU-pool job holds the GPUs that the config's engines and DPO processes use.
        engine_gpus = paper.inference.replicas * paper.inference.tensor_parallel_size
        assert deployments[name]["work_pool"]["job_variables"]["gpu_count"] == gpus == engine_gpus


def _compose() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


PASSWORDS = {"MINIO_ROOT_PASSWORD": "m", "PREFECT_DB_PASSWORD": "p", "MLFLOW_DB_PASSWORD": "d",
             "PREFECT_AUTH_STRING": "u:a", "MLFLOW_ADMIN_PASSWORD": "x", "MLFLOW_SECRET_KEY": "k"}


def _compose_config(compose: list[str], environment: dict[str, str]) -> subprocess.CompletedProcess:
    # `config` validates and interpolates the file without a Docker engine.
    return subprocess.run([*compose, "-f", str(REPO / "infra" / "docker-compose.yml"), "config"], capture_output=True,
                          text=True, cwd=REPO, env={"PATH": os.environ["PATH"], **environment})


def test_compose_file_is_valid_and_wires_the_worker_to_every_service():
    compose = _compose()
    if compose is None:
        if os.environ.get("CI"):
            pytest.fail("no `docker compose` or `docker-compose` on a CI machine: .ci/run installs docker-compose")
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    result = _compose_config(compose, {**PASSWORDS, "MINIO_ROOT_USER": "u"})
    assert result.returncode == 0, result.stderr
    stack = yaml.safe_load(result.stdout)
    assert set(stack["services"]) == {"postgres", "minio", "minio-buckets", "prefect-server", "mlflow", "worker"}
    worker = stack["services"]["worker"]["environment"]
    assert worker["PREFECT_API_URL"] == "http://prefect-server:4200/api"
    assert worker["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert worker["METAREWARD_ARTIFACT_ROOT"].startswith("s3://metareward/")
    assert worker["AWS_ENDPOINT_URL_S3"] == "http://minio:9000" and worker["AWS_ACCESS_KEY_ID"] == "u"
    assert (worker["PREFECT_API_AUTH_STRING"], worker["MLFLOW_TRACKING_PASSWORD"]) == ("u:a", "x")
    assert "infra/prefect-bootstrap.sh" in str(stack["services"]["worker"]["command"])
    assert "postgresql+asyncpg://" in stack["services"]["prefect-server"]["environment"][
        "PREFECT_API_DATABASE_CONNECTION_URL"]
    command = stack["services"]["mlflow"]["command"]
    command = " ".join(command) if isinstance(command, list) else command
    assert "--backend-store-uri postgresql+psycopg2://" in command and "--artifacts-destination s3://mlflow/" in command
    assert "--app-name basic-auth" in command
    # The Prefect server runs from the project's image: the same Prefect as the worker and the flows.
    assert stack["services"]["prefect-server"]["image"] == stack["services"]["worker"]["image"] == "metareward:latest"
    for name, service in stack["services"].items():
        for port in service.get("ports", []):
            published = port if isinstance(port, str) else f"{port.get('host_ip', '')}:{port['published']}"
            assert published.startswith("127.0.0.1:"), f"{name} publishes {port} beyond this host"
        if name != "minio-buckets":
            assert service.get("restart") == "unless-stopped", name
    for dockerfile in ("Dockerfile", "Dockerfile.gpu"):
        for line in (REPO / "infra" / dockerfile).read_text().splitlines():
            if line.startswith("COPY "):
                for source in line.split()[1:-1]:
                    assert (REPO / source).exists(), f"infra/{dockerfile}: COPY {source} does not exist"


@pytest.mark.parametrize("missing", sorted(PASSWORDS))
def test_compose_refuses_to_start_without_each_password(missing):
    compose = _compose()
    if compose is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed")
    result = _compose_config(compose, {name: value for name, value in PASSWORDS.items() if name != missing})
    assert result.returncode != 0 and missing in result.stderr
    assert "metareward-secret" not in (REPO / "infra" / "docker-compose.yml").read_text()


def test_the_ray_cluster_gives_each_worker_pod_whole_gpus_and_its_own_credentials():
    cluster = yaml.safe_load((REPO / "infra" / "kubernetes" / "raycluster.yaml").read_text())
    assert (cluster["apiVersion"], cluster["kind"]) == ("ray.io/v1", "RayCluster")
    head = cluster["spec"]["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # the head places and heals; no replica runs there
    assert 10001 in [port["containerPort"] for port in head["template"]["spec"]["containers"][0]["ports"]]
    [gpu] = cluster["spec"]["workerGroupSpecs"]
    container = gpu["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == container["resources"]["requests"]["nvidia.com/gpu"]
    assert container["envFrom"] == [{"secretRef": {"name": "metareward-credentials"}}]
    assert not any("SECRET" in variable["name"] or "KEY" in variable["name"] for variable in container["env"])
    assert cluster["spec"]["rayVersion"].split(".")[:2] == ["2", "60"]
