"""infra/kubernetes validates offline against Kubernetes' schema; the GPU pool's Jobs render with prefect-kubernetes."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from fractions import Fraction
from pathlib import Path

import kubernetes_validate
import prefect_kubernetes.worker
import pytest
import yaml
from prefect.client.schemas.objects import FlowRun
from prefect.server.schemas.actions import validate_base_job_template
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings
from prefect.utilities import schema_tools
from prefect_kubernetes.settings import KubernetesSettings
from prefect_kubernetes.worker import KubernetesWorker, KubernetesWorkerJobConfiguration

from metareward.config.campaign import CampaignConfig

REPO = Path(__file__).parents[2]
KUBERNETES = REPO / "infra" / "kubernetes"
KUBERNETES_VERSION = "1.31"  # kubernetes-validate ships this release's schemas: no network
TEMPLATE = json.loads((KUBERNETES / "gpu-base-job-template.json").read_text())
VARIABLES = TEMPLATE["variables"]
DEFAULTS = {name: variable["default"] for name, variable in VARIABLES["properties"].items() if "default" in variable}
SIZED_BY_GPU = ("cpu_request", "cpu_limit", "memory_request", "memory_limit")
SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
               "PREFECT_API_AUTH_STRING")
_SUFFIXES = {"": 1, "m": Fraction(1, 1000), "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
             "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def _documents(name: str) -> list[dict]:
    return [document for document in yaml.safe_load_all((KUBERNETES / name).read_text()) if document]


def _one(name: str, kind: str) -> dict:
    [document] = [document for document in _documents(name) if document["kind"] == kind]
    return document


def _quantity(text: str | int) -> Fraction:
    """A Kubernetes resource quantity ('10', '500m', '120Gi') as a number."""
    number, suffix = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", str(text)).groups()
    return Fraction(number) * _SUFFIXES[suffix]


def _selects(selector: dict, labels: dict[str, str]) -> bool:
    """Whether a label selector (matchLabels and matchExpressions) selects a pod with these labels."""
    for expression in selector.get("matchExpressions", []):
        value, values = labels.get(expression["key"]), expression.get("values", [])
        if not {"Exists": value is not None, "DoesNotExist": value is None, "In": value in values,
                "NotIn": value not in values}[expression["operator"]]:
            return False
    return all(labels.get(key) == value for key, value in selector.get("matchLabels", {}).items())


def _validate(resource: dict) -> None:
    """Validates a resource strictly (unknown fields fail); a KubeRay RayCluster through its groups' pod templates,
    the part Kubernetes itself runs (its CRD is not in Kubernetes' schema)."""
    if resource["apiVersion"] == "ray.io/v1":
        spec = resource["spec"]
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            _validate({"apiVersion": "v1", "kind": "PodTemplate",
                       "metadata": {"name": f"{resource['metadata']['name']}-{group.get('groupName', 'head')}"},
                       "template": group["template"]})
        return
    kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)


class _NoServer:
    """A Prefect client that fails if used: the template must render without blocks, variables or a server."""

    def __getattr__(self, name: str):
        raise AssertionError(f"rendering the template called the Prefect API ({name})")


def _submitted_job(values: dict, monkeypatch: pytest.MonkeyPatch) -> tuple[dict, dict]:
    """The Job manifest and pod labels the Kubernetes worker of worker.yaml submits for a flow run with these job
    variables: prefect-kubernetes renders the template and creates the Job (its Kubernetes API call captured). The
    worker's environment holds a Prefect API auth string, as it does from the Secret."""
    for name, value in _one("worker.yaml", "ConfigMap")["data"].items():
        monkeypatch.setenv(name, value)
    submitted = []

    class CapturingBatchApi:
        def __init__(self, client):
            pass

        async def create_namespaced_job(self, namespace: str, body: dict) -> dict:
            submitted.append(body)
            return body

    monkeypatch.setattr(prefect_kubernetes.worker, "BatchV1Api", CapturingBatchApi)

    async def submit() -> None:
        configuration = await KubernetesWorkerJobConfiguration.from_template_and_values(TEMPLATE, values,
                                                                                          client=_NoServer())
        configuration.prepare_for_flow_run(FlowRun(flow_id=uuid.uuid4(), name="brave-falcon"), worker_name="w")
        await KubernetesWorker(work_pool_name="metareward-gpu")._create_job(configuration, client=None)

    with temporary_settings({PREFECT_API_URL: "http://prefect-server.metareward.svc:4200/api",
                             PREFECT_API_AUTH_STRING: "admin:hunter2"}):
        asyncio.run(submit())
    [job] = submitted
    return job, job["spec"]["template"]["metadata"]["labels"]


@pytest.mark.parametrize("name", sorted(path.name for path in KUBERNETES.glob("*.yaml")))
def test_every_manifest_validates_against_the_kubernetes_schema(name):
    documents = _documents(name)
    assert documents, f"infra/kubernetes/{name} holds no document"
    for document in documents:
        _validate(document)
        assert document["metadata"].get("namespace") == DEFAULTS["namespace"], f"{name}: {document['kind']}"


def test_the_validation_is_strict():
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "j"},
           "spec": {"backofLimit": 0, "template": {"spec": {"containers": [{"name": "c"}]}}}}
    with pytest.raises(kubernetes_validate.ValidationError, match="backofLimit"):
        _validate(job)


def test_the_template_is_what_the_prefect_server_accepts():
    validate_base_job_template(TEMPLATE)  # every placeholder is a declared variable
    schema_tools.is_valid_schema(VARIABLES, preprocess=False)
    schema_tools.validate(DEFAULTS, VARIABLES, raise_on_error=True, preprocess=True, ignore_required=True)
    for name, variable in VARIABLES["properties"].items():
        assert variable.get("title") and variable.get("description"), f"job variable {name}: no title or description"


def test_the_default_job_is_valid_and_expires_retries_nothing_and_mounts_the_model_cache(monkeypatch):
    job, pod_labels = _submitted_job({}, monkeypatch)
    _validate(job)
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert (spec["backoffLimit"], spec["ttlSecondsAfterFinished"]) == (0, 86400)
    assert "kueue.x-k8s.io/queue-name" not in job["metadata"]["labels"] and "priorityClassName" not in pod
    assert pod["serviceAccountName"] == "metareward-flow-run" and pod["automountServiceAccountToken"] is False
    [container] = pod["containers"]
    env = {variable["name"]: variable for variable in container["env"]}
    # An evicted pod's flow run reschedules itself instead of a Job retry running it twice.
    assert env["PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR"]["value"] == "reschedule"
    [cache] = [mount["mountPath"] for mount in container["volumeMounts"] if mount["name"] == "model-cache"]
    for variable in ("METAREWARD_MODEL_CACHE", "HF_HOME"):
        assert env[variable]["value"].startswith(cache + "/"), variable
    assert {"name": "model-cache", "emptyDir": {}} in pod["volumes"]
    resources = container["resources"]
    assert resources["requests"]["ephemeral-storage"] == resources["limits"]["ephemeral-storage"] == "200Gi"
    assert resources["requests"]["nvidia.com/gpu"] == 1 and pod_labels["prefect.io/flow-run-id"]


def test_a_job_of_8_gpus_in_a_kueue_queue_renders_every_variable(monkeypatch):
    claim = {"name": "model-cache", "persistentVolumeClaim": {"claimName": "metareward-models"}}
    job, pod_labels = _submitted_job({"gpu_count": 8, "queue_name": "gpu-queue", "priority_class_name": "high",
                                      "annotations": {"example.com/team": "rl"}, "labels": {"team": "rl"},
                                      "secret_name": "other-credentials", "model_cache_volume": claim,
                                      "env": {"RAY_ADDRESS": "ray://metareward-ray-head-svc:10001"}},
                                     monkeypatch)
    _validate(job)
    pod = job["spec"]["template"]
    # Kueue admits the Job by its label; the pod has none, so Kueue's pod integration leaves it alone.
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert "kueue.x-k8s.io/queue-name" not in pod_labels and pod_labels["team"] == job["metadata"]["labels"]["team"]
    assert job["metadata"]["annotations"] == pod["metadata"]["annotations"] == {"example.com/team": "rl"}
    assert pod["spec"]["priorityClassName"] == "high" and claim in pod["spec"]["volumes"]
    [container] = pod["spec"]["containers"]
    assert container["envFrom"] == [{"secretRef": {"name": "other-credentials", "optional": True}}]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    names = [variable["name"] for variable in container["env"]]
    assert {"RAY_ADDRESS", "METAREWARD_MODEL_CACHE", "HF_HOME"} <= set(names) and len(names) == len(set(names))


def test_no_credential_is_written_into_the_job(monkeypatch):
    job, _ = _submitted_job({}, monkeypatch)
    assert "hunter2" not in json.dumps(job)
    [container] = job["spec"]["template"]["spec"]["containers"]
    assert container["envFrom"] == [{"secretRef": {"name": "metareward-credentials", "optional": True}}]
    [auth] = [variable for variable in container["env"] if variable["name"] == "PREFECT_API_AUTH_STRING"]
    assert auth["valueFrom"]["secretKeyRef"] == {"name": "metareward-credentials", "key": "PREFECT_API_AUTH_STRING"}
    assert not [variable["name"] for variable in container["env"]
                if variable["name"] in SECRET_KEYS and "value" in variable]


def test_every_gpu_deployment_asks_for_cpu_and_memory_in_proportion_to_its_gpus():
    assert DEFAULTS["gpu_count"] == 1 and DEFAULTS["memory_request"] == DEFAULTS["memory_limit"]
    deployments = [deployment for deployment in
                   yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())["deployments"]
                   if deployment["work_pool"]["name"] == "metareward-gpu"]
    assert {"paper-llama3-8b", "paper-llama3-8b-1gpu", "shard-gpu"} <= {deployment["name"]
                                                                          for deployment in deployments}
    wrong = []
    for deployment in deployments:
        variables = {**DEFAULTS, **deployment["work_pool"].get("job_variables", {})}
        schema_tools.validate(variables, VARIABLES, raise_on_error=True, preprocess=True, ignore_required=True)
        gpus = variables["gpu_count"]
        wrong += [f"{deployment['name']}: {key} {variables[key]!r}, not gpu_count {gpus} × {DEFAULTS[key]!r}"
                  for key in SIZED_BY_GPU if _quantity(variables[key]) != gpus * _quantity(DEFAULTS[key])]
    assert not wrong, ("deployments/prefect.yaml: set these in the deployments' work_pool.job_variables (the "
                       "template's defaults are one GPU's share):\n" + "\n".join(wrong))


def test_the_ray_cluster_holds_the_70b_recipe_and_is_sized_like_the_gpu_pool():
    cluster = _one("raycluster.yaml", "RayCluster")
    [group] = cluster["spec"]["workerGroupSpecs"]
    [container] = group["template"]["spec"]["containers"]
    gpus = int(container["resources"]["limits"]["nvidia.com/gpu"])
    config = CampaignConfig.from_yaml(REPO / "deployments" / "configs" / "paper-llama3-70b.yaml")
    needed = max(config.inference.replicas * config.inference.tensor_parallel_size,
                 *(iteration.dpo.num_processes for iteration in config.iterations))
    assert config.inference.tensor_parallel_size <= gpus and group["maxReplicas"] * gpus >= needed
    # minReplicas and maxReplicas mean something only to Ray's autoscaler.
    assert cluster["spec"]["enableInTreeAutoscaling"] and group["minReplicas"] <= group["replicas"]
    for key in SIZED_BY_GPU:
        resource, bound = key.split("_")  # cpu_request: the cpu of resources.requests
        assert _quantity(container["resources"][f"{bound}s"][resource]) == gpus * _quantity(DEFAULTS[key]), key
    assert container["envFrom"] == [{"secretRef": {"name": DEFAULTS["secret_name"]}}]
    env = {variable["name"]: variable["value"] for variable in container["env"]}
    [cache] = [mount["mountPath"] for mount in container["volumeMounts"] if mount["name"] == "model-cache"]
    cache_variables = ("METAREWARD_MODEL_CACHE", "HF_HOME")
    assert {name: env[name] for name in cache_variables} == {
        name: TEMPLATE["job_configuration"]["env"][name] for name in cache_variables}
    assert all(env[name].startswith(cache + "/") for name in ("METAREWARD_MODEL_CACHE", "HF_HOME"))


def test_only_flow_runs_and_the_ray_cluster_reach_the_ray_head(monkeypatch):
    policy = _one("network-policy.yaml", "NetworkPolicy")
    cluster = _one("raycluster.yaml", "RayCluster")
    ray_pod = {"ray.io/cluster": cluster["metadata"]["name"], "ray.io/node-type": "head"}  # KubeRay's pod labels
    assert _selects(policy["spec"]["podSelector"], ray_pod) and policy["spec"]["policyTypes"] == ["Ingress"]
    _, flow_run_pod = _submitted_job({}, monkeypatch)
    worker_pod = _one("worker.yaml", "Deployment")["spec"]["template"]["metadata"]["labels"]

    def ports(labels: dict[str, str]) -> set[int] | None:
        """The ports a pod with these labels may reach on the Ray pods; None for all of them."""
        rules = [rule for rule in policy["spec"]["ingress"]
                 if any(_selects(peer["podSelector"], labels) for peer in rule["from"])]
        if any("ports" not in rule for rule in rules):
            return None
        return {port["port"] for rule in rules for port in rule["ports"]}

    [head] = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"]
    assert ports(flow_run_pod) == {port["containerPort"] for port in head["ports"]} == {10001, 6379, 8265}
    assert ports(ray_pod) is None and ports(worker_pod) == set()


def test_the_worker_runs_the_gpu_pool_with_a_namespaced_role_and_the_flow_runs_with_no_rights(monkeypatch):
    rbac = _documents("worker-rbac.yaml")
    [binding] = [document for document in rbac if document["kind"] == "RoleBinding"]
    [role] = [document for document in rbac if document["kind"] == "Role"]
    accounts = {document["metadata"]["name"]: document for document in rbac if document["kind"] == "ServiceAccount"}
    worker = _one("worker.yaml", "Deployment")["spec"]["template"]["spec"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert [subject["name"] for subject in binding["subjects"]] == [worker["serviceAccountName"]]
    flow_run_account = accounts[DEFAULTS["service_account_name"]]
    assert set(accounts) == {worker["serviceAccountName"], DEFAULTS["service_account_name"]}
    assert flow_run_account["automountServiceAccountToken"] is False
    granted = {(group, resource, verb) for rule in role["rules"] for group in rule["apiGroups"]
               for resource in rule["resources"] for verb in rule["verbs"]}
    # What prefect-kubernetes 0.8's worker and observer call: create and delete Jobs, list and watch Jobs and pods,
    # read a Job and a crashed pod's log.
    assert granted == {("batch", "jobs", verb) for verb in ("create", "delete", "get", "list", "watch")} | {
        ("", "pods", "list"), ("", "pods", "watch"), ("", "pods/log", "get")}
    [container] = worker["containers"]
    assert " ".join(container["command"]).startswith("prefect worker start --pool metareward-gpu --type kubernetes")
    for name, value in _one("worker.yaml", "ConfigMap")["data"].items():
        monkeypatch.setenv(name, value)
    settings = KubernetesSettings()
    # The observer watches only the namespace the Role covers, where the template puts the Jobs.
    assert settings.observer.namespaces == {role["metadata"]["namespace"]} == {DEFAULTS["namespace"]}
    [auth] = [variable for variable in container["env"] if variable["name"] == "PREFECT_API_AUTH_STRING"]
    assert (auth["valueFrom"]["secretKeyRef"]["name"], auth["valueFrom"]["secretKeyRef"]["key"]) == (
        settings.worker.api_auth_string_secret_name, settings.worker.api_auth_string_secret_key) == (
        DEFAULTS["secret_name"], "PREFECT_API_AUTH_STRING")
