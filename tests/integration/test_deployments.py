"""deployments/prefect.yaml on a real `prefect server` with a process worker: the demo deployment with the tiny
model, a fault-injected stage retried without recomputing upstream, and shards fanned out as flow runs."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from metareward.artifacts.store import ArtifactStore
from metareward.host.ports import free_port
from metareward.pipeline.manifests import stage_manifests
from tests.integration.campaigns import run_cli, start_cli, wait_for, wait_until_healthy, write_config

# Each test starts a Prefect server, workers, campaigns or a browser.
pytestmark = pytest.mark.slow

REPO = Path(__file__).parents[2]
PREFECT = [sys.executable, "-m", "prefect"]
PREFECT_BIN = str(Path(sys.executable).parent / "prefect")


@pytest.fixture(scope="module")
def prefect_stack(tmp_path_factory):
    """A `prefect server` (SQLite) on 127.0.0.1, both work pools, `prefect --no-prompt deploy --all` from the
    repository root (deployments/prefect.yaml), and a process worker; yields (api_url, env)."""
    home = tmp_path_factory.mktemp("prefect-server")
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PREFECT_", "MLFLOW_TRACKING"))}
    env.update(PREFECT_HOME=str(home), PREFECT_API_URL=url, PREFECT_UI_API_URL=url,
               PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_WORKER_QUERY_SECONDS="2",
               PREFECT_WORKER_PREFETCH_SECONDS="5", MLFLOW_DISABLE_TELEMETRY="true",
               # Every flow run on the worker (shard flow runs too) fails judgments shard 1 while this file exists.
               METAREWARD_INJECT_FAULT=f"judgments:shard-0001:while={home / 'judgments-shard-1-fails'}")
    processes = []
    logs = []

    def start(name: str, *args: str) -> subprocess.Popen:
        log = (home / f"{name}.log").open("w")
        logs.append(home / f"{name}.log")
        process = subprocess.Popen([*PREFECT, *args], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                   start_new_session=True)
        processes.append(process)
        return process

    server = start("server", "server", "start", "--host", "127.0.0.1", "--port", str(port))
    wait_until_healthy(f"{url}/health", server, home / "server.log", timeout=180)

    # Pools, the GPU pool's queues, the automations, then deploy --all (./prefect.yaml links to
    # deployments/prefect.yaml), as the compose worker does.
    result = subprocess.run(["bash", "infra/prefect-bootstrap.sh"], env={**env, "PREFECT": PREFECT_BIN}, cwd=REPO,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"infra/prefect-bootstrap.sh:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    start("worker", "worker", "start", "--pool", "metareward-process", "--type", "process")
    yield url, env
    for process in reversed(processes):
        process.terminate()
    for process in processes:
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)
    for log in logs:
        print(f"--- {log.name} (tail)\n{log.read_text()[-2000:]}")


def _run_and_wait(url: str, deployment: str, parameters: dict, job_variables: dict | None = None,
                  timeout: float = 600):
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: url}):
        flow_run = run_deployment(deployment, parameters=parameters, job_variables=job_variables, timeout=0,
                                  as_subflow=False, _sync=True)  # sync even where a test left a loop
        deadline = time.monotonic() + timeout
        with get_client(sync_client=True) as client:
            while True:
                flow_run = client.read_flow_run(flow_run.id)
                if flow_run.state is not None and flow_run.state.is_final():
                    return flow_run
                assert time.monotonic() < deadline, f"{deployment} did not finish: {flow_run.state}"
                time.sleep(2)


def _retry_as_the_ui_does(url: str, flow_run_id, timeout: float = 600):
    """Retry a final flow run as the UI's Retry button does (AwaitingRetry, forced) and wait until it is final
    again; returns it."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Scheduled

    with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, Scheduled(name="AwaitingRetry"), force=True)
        deadline = time.monotonic() + timeout
        while not (flow_run := client.read_flow_run(flow_run_id)).state.is_final():
            assert time.monotonic() < deadline, flow_run.state
            time.sleep(1)
    return flow_run


def _read(url: str, reader: str, **filters):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        return getattr(client, reader)(**filters)


def _children(url: str, parent_id) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterParentFlowRunId

    return _read(url, "read_flow_runs",
                 flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[parent_id])))


def _task_runs(url: str, flow_run_ids: list) -> list:
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    return _read(url, "read_task_runs", flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=flow_run_ids)))


def test_deploy_all_creates_every_deployment_with_an_inactive_campaign_schedule(prefect_stack):
    url, _ = prefect_stack
    deployments = {f"{d.name}": d for d in _read(url, "read_deployments")}
    declared = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())["deployments"]
    assert set(deployments) == {d["name"] for d in declared}
    demo = deployments["demo"]
    assert demo.work_pool_name == "metareward-process"
    assert [(s.schedule.cron, s.active) for s in demo.schedules] == [("0 3 * * 1", False)]
    assert deployments["shard-gpu"].work_pool_name == "metareward-gpu"
    assert deployments["shard-gpu"].job_variables == {"gpu_count": 1}
    assert deployments["paper-llama3-8b"].pull_steps == [
        {"prefect.deployments.steps.set_working_directory": {"directory": "/opt/metareward"}}]


def test_demo_deployment_on_a_process_worker_retries_a_failed_stage_without_recomputing_upstream(
        prefect_stack, tmp_path, tiny_model):
    url, _ = prefect_stack
    root = tmp_path / "artifacts"
    config = yaml.safe_load(write_config(tmp_path, tiny_model, str(root)).read_text())
    flow_run = _run_and_wait(url, "metareward-campaign/demo", {"config": config},
                             job_variables={"env": {"METAREWARD_INJECT_FAULT": "judgments:shard-0001"}})
    assert flow_run.state.is_completed(), flow_run.state

    [iteration] = _children(url, flow_run.id)
    assert iteration.name == "tiny iter-1" and iteration.state.is_completed()
    task_runs = {run.name: run for run in _task_runs(url, [iteration.id])}
    failed_once = task_runs["judgments iter-1 shard-0001"]
    assert failed_once.run_count == 2 and failed_once.state.is_completed()
    # Nothing upstream of the failed shard ran twice; every stage ran (prompts → checkpoint).
    upstream = [name for name in task_runs if name.startswith(("prompts", "responses")) and "manifest" not in name]
    assert len(upstream) == 4 and all(task_runs[name].run_count == 1 for name in upstream)
    # Prefect's graph is the data flow of Figure 1: each task's inputs are the results of its upstream stages.
    by_id = {run.id: name for name, run in task_runs.items()}

    def upstream_of(name: str) -> set[str]:
        return {by_id[item.id] for inputs in task_runs[name].task_inputs.values() for item in inputs
                if getattr(item, "input_type", "") == "task_run" and item.id in by_id}

    assert upstream_of("responses iter-1 shard-0001") == {"prompts iter-1 all"}
    assert upstream_of("judgments iter-1 shard-0001") == {"prompts iter-1 all", "responses iter-1 shard-0001"}
    assert upstream_of("meta_judgments iter-1 shard-0002") == {
        "prompts iter-1 all", "responses iter-1 shard-0002", "judgments iter-1 shard-0002"}
    assert upstream_of("judgment_elo iter-1 all") == {f"{stage} iter-1 shard-000{i}" for stage in
                                                      ("judgments", "meta_judgments") for i in range(3)}
    # The health gate sits between the pairs and the DPO set; the judge audit reads the judging stages.
    assert upstream_of("health iter-1") == {"actor_pairs iter-1 all", "judge_pairs iter-1 all"}
    assert upstream_of("dpo_dataset iter-1 all") == {"actor_pairs iter-1 all", "judge_pairs iter-1 all",
                                                     "health iter-1"}
    assert upstream_of("checkpoint iter-1 all") == {"dpo_dataset iter-1 all"}
    assert upstream_of("judge audit iter-1") >= {"prompts iter-1 all", "judgments iter-1 shard-0000",
                                                 "meta_judgments iter-1 shard-0000", "judgment_elo iter-1 all"}
    assert {name.split(" ")[0] for name in task_runs} >= {"prompts", "responses", "judgments", "actor_pairs",
                                                         "meta_judgments", "judgment_elo", "judge_pairs",
                                                         "dpo_dataset", "checkpoint"}
    manifests = stage_manifests(ArtifactStore(str(root)), "tiny")[1]
    checkpoint = manifests["checkpoint"]["stats"]
    assert Path(checkpoint["model_uri"], "model_id.txt").read_text().strip() == checkpoint["model_id"]
    # A task run is found by the artifact key of the table it wrote; model stages carry the `gpu` tag.
    assert set(failed_once.tags) == {"gpu", f"key:{manifests['judgments']['shards']['shard-0001']['cache_key']}"}
    assert [tag for tag in task_runs["judgment_elo iter-1 all"].tags if tag == "gpu"] == []
    artifacts = _read(url, "read_artifacts")
    assert any(artifact.key == "tiny-iter-1" for artifact in artifacts)


def test_model_stage_shards_fan_out_as_flow_runs_of_the_shard_deployment(prefect_stack, tmp_path, tiny_model):
    url, _ = prefect_stack
    root = tmp_path / "artifacts"
    config = yaml.safe_load(write_config(
        tmp_path, tiny_model, str(root), name="fanout", iteration_overrides={"num_prompts": 4},
        orchestration={"shard_deployment": "metareward-shard/shard-process", "shard_poll_interval_s": 1}).read_text())
    flow_run = _run_and_wait(url, "metareward-iteration/demo-iteration",
                             {"config": config, "iteration": 1, "model_path": str(tiny_model)})
    assert flow_run.state.is_completed(), flow_run.state

    shards = _children(url, flow_run.id)
    names = sorted(run.name for run in shards)
    assert names == sorted(f"fanout {stage} iter-1 shard-000{i}"
                           for stage in ("responses", "judgments", "meta_judgments") for i in range(2))
    assert all(run.state.is_completed() for run in shards)
    deployment = _read(url, "read_deployment_by_name", name="metareward-shard/shard-process")
    assert {run.deployment_id for run in shards} == {deployment.id}
    # The iteration flow gathered the shards' tables from the store and went on to train.
    manifests = stage_manifests(ArtifactStore(str(root)), "fanout")[1]
    assert manifests["judgments"]["rows"] == sum(s["rows"] for s in manifests["judgments"]["shards"].values()) > 0
    assert not any(shard["cached"] for shard in manifests["responses"]["shards"].values())
    assert "checkpoint" in manifests
    shard_task_runs = _task_runs(url, [run.id for run in shards])
    assert sorted(run.name for run in shard_task_runs) == [name.removeprefix("fanout ") for name in names]
    assert manifests["checkpoint"]["stats"]["pairs_trained"] > 0


def test_gpu_pool_template_puts_the_gpu_request_node_selector_and_tolerations_in_the_pod_spec(prefect_stack):
    """The GPU pool's template as the server stored it, rendered by prefect-kubernetes' own job configuration
    (what the Kubernetes worker does for each flow run), with a deployment's job variables."""
    import asyncio
    import uuid

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import FlowRun
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    url, _ = prefect_stack
    pool = _read(url, "read_work_pool", work_pool_name="metareward-gpu")
    assert pool.type == "kubernetes"
    values = {"gpu_count": 2, "image": "registry.example/metareward-gpu:1.0",
              "node_selector": {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"},
              "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"}]}

    async def render(job_variables: dict):
        async with get_client() as client:
            configuration = await KubernetesWorkerJobConfiguration.from_template_and_values(
                pool.base_job_template, job_variables, client=client)
        configuration.prepare_for_flow_run(FlowRun(id=uuid.uuid4(), name="tiny-shard", flow_id=uuid.uuid4()))
        return configuration.job_manifest

    with temporary_settings({PREFECT_API_URL: url}):
        manifest = asyncio.run(render(values))
        defaults = asyncio.run(render({}))
    pod = manifest["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 2
    assert container["image"] == "registry.example/metareward-gpu:1.0"
    assert pod["nodeSelector"] == values["node_selector"] and pod["tolerations"] == values["tolerations"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert container["args"] == ["prefect", "flow-run", "execute"]
    assert any(variable["name"] == "PREFECT__FLOW_RUN_ID" for variable in container["env"])
    default_pod = defaults["spec"]["template"]["spec"]
    assert default_pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert default_pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert default_pod["containers"][0]["image"] == "metareward-gpu:latest"


def test_evaluation_deployment_scores_agreement_and_stores_the_alpaca_eval_export(prefect_stack, tmp_path, tiny_model):
    url, _ = prefect_stack
    root = tmp_path / "artifacts"
    config = yaml.safe_load(write_config(tmp_path, tiny_model, str(root)).read_text())
    flow_run = _run_and_wait(url, "metareward-evaluation/demo-evaluation", {
        "config": config, "rankings": str(REPO / "deployments" / "evaluation" / "rankings-example.jsonl"),
        "alpaca_eval_prompts": str(tmp_path / "prompts.jsonl"), "num_judgments": 2})
    assert flow_run.state.is_completed(), flow_run.state
    [export] = list(root.glob("tiny/evaluations/*/alpaca_eval.json"))
    outputs = json.loads(export.read_text())
    assert len(outputs) == 12 and {row["generator"] for row in outputs} == {f"tiny-{export.parent.name}"}
    task_runs = {run.name.rsplit("-", 1)[0]: run for run in _task_runs(url, [flow_run.id])}
    assert set(task_runs) == {"judge-agreement", "alpaca-eval-export"}
    assert all(run.state.is_completed() for run in task_runs.values())


def test_a_shard_failing_past_its_retries_fails_the_iteration_and_its_retry_runs_only_what_is_missing(
        prefect_stack, tmp_path, tiny_model):
    url, env = prefect_stack
    switch = Path(env["METAREWARD_INJECT_FAULT"].split(":while=")[1])
    switch.write_text("while this file exists")
    config = yaml.safe_load(write_config(
        tmp_path, tiny_model, str(tmp_path / "artifacts"), name="retried", iteration_overrides={"num_prompts": 4},
        orchestration={"shard_deployment": "metareward-shard/shard-process", "shard_poll_interval_s": 1,
                       "retries": 1, "retry_backoff_s": 0.5}).read_text())
    try:
        flow_run = _run_and_wait(url, "metareward-iteration/demo-iteration",
                                 {"config": config, "iteration": 1, "model_path": str(tiny_model)})
    finally:
        switch.unlink()
    assert flow_run.state.is_failed(), flow_run.state
    assert "judgments iter-1 shard-0001: flow run" in flow_run.state.message
    first = {run.name: run for run in _children(url, flow_run.id)}
    failed = first["retried judgments iter-1 shard-0001"]
    assert failed.state.is_failed() and all(run.state.is_completed() for name, run in first.items()
                                            if run is not failed)
    [task_run] = _task_runs(url, [failed.id])
    assert task_run.run_count == 2 and task_run.state.is_failed()  # tried, retried once, failed for good

    # The fault is gone; the iteration is retried as the UI's Retry button does it.
    flow_run = _retry_as_the_ui_does(url, flow_run.id)
    assert flow_run.state.is_completed(), flow_run.state
    after = _children(url, flow_run.id)
    started_again = sorted(run.name for run in after if run.id not in {r.id for r in first.values()})
    # Only the failed shard ran again, then the stage that had not started; finished shards were not touched.
    assert started_again == ["retried judgments iter-1 shard-0001", "retried meta_judgments iter-1 shard-0000",
                             "retried meta_judgments iter-1 shard-0001"]
    assert all(run.state.is_completed() for run in after if run.id != failed.id)


@pytest.mark.parametrize("change,field", [
    ({"iterations": [{"rho": 0.6}]}, "config.iterations[0].rho"),
    ({"mode": "self_rewarding", "iterations": [{"train_judge": True}]}, "config.iterations[0].train_judge"),
    ({"inference": {"backend": "openai"}}, "base_url"),
])
def test_the_run_form_refuses_what_its_schema_states_before_a_run_is_created(prefect_stack, tmp_path, tiny_model,
                                                                             change, field):
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url, _ = prefect_stack
    config = yaml.safe_load(write_config(tmp_path, tiny_model, str(tmp_path / "artifacts")).read_text())
    for key, value in change.items():
        config[key] = [{**config[key][0], **value[0]}] if key == "iterations" else (
            {**config[key], **value} if isinstance(value, dict) else value)
    with temporary_settings({PREFECT_API_URL: url}), pytest.raises(Exception) as refused:
        run_deployment("metareward-campaign/demo", parameters={"config": config}, timeout=0, as_subflow=False)
    assert "Validation failed" in str(refused.value) and field in str(refused.value)


def test_the_uis_show_lineage_by_clicks_and_the_stages_in_the_logs(prefect_stack, tmp_path, tiny_model, mlflow_server):
    """What a user sees in a real browser after a campaign run by a worker: MLflow's page of M_2 names its
    registered version and links its parent; Prefect's iteration run shows one log line per stage job; the
    campaign's artifact fits its pane and links the runs."""
    from mlflow import MlflowClient
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    url, _ = prefect_stack
    config = yaml.safe_load(write_config(tmp_path, tiny_model, str(tmp_path / "artifacts"), name="seen",
                                         tracking={}).read_text())
    flow_run = _run_and_wait(url, "metareward-campaign/demo", {"config": config},
                             job_variables={"env": {"MLFLOW_TRACKING_URI": mlflow_server}})
    assert flow_run.state.is_completed(), flow_run.state
    [iteration] = _children(url, flow_run.id)

    client = MlflowClient(mlflow_server)
    experiment = client.get_experiment_by_name("seen").experiment_id
    models = {model.name: model.model_id for model in client.search_logged_models([experiment])}
    [campaign_artifact] = _read(url, "read_latest_artifacts", artifact_filter=ArtifactFilter(
        key=ArtifactFilterKey(any_=["seen-campaign"])))
    with browser_page() as page:  # after Prefect's client calls: Playwright's sync API runs an event loop here
        page.goto(f"{mlflow_server}/#/experiments/{experiment}/models/{models['seen-M2']}?workflowType=machine_learning")
        page.get_by_text("Model versions").wait_for()
        page.get_by_role("link", name="seen-M1").wait_for()
        text = page.inner_text("body")
        screenshot(page, "mlflow-model-M2.png")
        assert "Not registered" not in text and "v2" in text and "trained by DPO in" in text
        assert "seen/iter-1/actor_pairs" in text

        page.goto(f"{url.removesuffix('/api')}/runs/flow-run/{iteration.id}")
        page.get_by_text("judgments iter-1 shard-0001: 18 rows").wait_for()
        text = page.inner_text("body")
        screenshot(page, "prefect-iteration-logs.png")
        assert "health before training iteration 1" in text and "MLflow: iteration 1 is logged to" in text
        assert "Settings from the environment" in text and "artifact root: " in text

        # The campaign's artifact: a table that fits its pane, each iteration a link to its run on the MLflow server,
        # the models named as MLflow names them.
        page.goto(f"{url.removesuffix('/api')}/artifacts/artifact/{campaign_artifact.latest_id}")
        table = page.locator("table").first
        table.wait_for()
        screenshot(page, "prefect-campaign-artifact.png")
        assert table.bounding_box()["width"] <= page.viewport_size["width"] - 250  # beside the side bar
        link = page.get_by_role("link", name="iteration 1")
        assert link.get_attribute("href").startswith(mlflow_server) and "M_1 → M_2 (seen v2)" in table.inner_text()


@contextlib.contextmanager
def browser_page():
    """A page of headless Chromium (Debian's, driven by Playwright); the test is skipped without one, and fails
    where METAREWARD_REQUIRE_BROWSER=1 (CI installs it). Call it after the last Prefect client call of the
    test: Playwright's sync API runs an event loop in the thread, and Prefect's client then turns async."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        if os.environ.get("METAREWARD_REQUIRE_BROWSER") == "1":
            pytest.fail("no chromium on PATH (apt-get install chromium)")
        pytest.skip("no chromium on PATH (apt-get install chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:  # stopped on exit: its event loop would outlive the test in this thread
        browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1500, "height": 1100})
        page.set_default_timeout(60_000)
        yield page
        browser.close()


def screenshot(page, name: str) -> None:
    """Keep what the browser showed as a test artifact (.test-artifacts/ui/, printed with pytest -s)."""
    folder = REPO / ".test-artifacts" / "ui"
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / name), full_page=True)
    print(f"screenshot: {folder / name}")


def test_cancel_from_the_ui_mid_stage_ends_the_run_cancelled_in_seconds_and_a_retry_resumes(
        prefect_stack, tmp_path, tiny_model):
    # The fault is in place when the cancel comes: judgments' shard-0001 is held as it starts (never let go) on the
    # worker's flow run process, another judging shard has finished, and only then is the run cancelled as the
    # UI's Cancel button does (state Cancelling); the worker stops the process.
    from prefect.client.orchestration import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Cancelling

    url, _ = prefect_stack
    root = tmp_path / "artifacts"
    release = tmp_path / "never-released"
    config = yaml.safe_load(write_config(tmp_path, tiny_model, str(root), name="cancelled").read_text())
    with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        flow_run = run_deployment("metareward-campaign/demo", parameters={"config": config}, timeout=0,
                                  as_subflow=False, _sync=True, job_variables={"env": {
                                      "METAREWARD_INJECT_FAULT": f"judgments:shard-0001:hold={release}"}})
        started, judgments = release.with_name("never-released.started"), root / "cancelled/iter-1/judgments"
        deadline = time.monotonic() + 600
        while not (started.exists() and list(judgments.glob("shard-*.json"))):
            assert not client.read_flow_run(flow_run.id).state.is_final(), client.read_flow_run(flow_run.id).state
            assert time.monotonic() < deadline, "judging never started"
            time.sleep(0.2)
        kept = {path.name: path.read_text() for path in (root / "cancelled").glob("iter-1/*/*.json")
                if path.name != "manifest.json"}
        held_pid = json.loads(started.read_text())["pid"]
        client.set_flow_run_state(flow_run.id, Cancelling())
        cancelled_at = time.monotonic()
        while not (flow_run := client.read_flow_run(flow_run.id)).state.is_final():
            assert time.monotonic() - cancelled_at < 120, flow_run.state
            time.sleep(0.5)
        seconds = time.monotonic() - cancelled_at
    assert flow_run.state.is_cancelled() and seconds < 30, (flow_run.state, seconds)
    assert not Path(f"/proc/{held_pid}").exists() or "Z" in Path(f"/proc/{held_pid}/stat").read_text().split()[2]
    [iteration] = _children(url, flow_run.id)
    assert iteration.state.is_final() and not iteration.state.is_completed(), iteration.state
    assert not list(judgments.glob("shard-0001-*"))  # nothing half-written of the held job

    # Retried as the UI does: the finished shards are found in the store, the rest is computed, the run completes.
    flow_run = _retry_as_the_ui_does(url, flow_run.id)
    assert flow_run.state.is_completed(), flow_run.state
    for name, marker in kept.items():
        assert next((root / "cancelled").glob(f"iter-1/*/{name}")).read_text() == marker, f"{name} was recomputed"
    assert "checkpoint" in stage_manifests(ArtifactStore(str(root)), "cancelled")[1]


def _held_run(env: dict, tmp_path: Path, tiny_model: Path, name: str):
    """`metareward run` of a tiny campaign `name` against the test's server, judgments' shard-0001 held as it starts
    until the file `release` exists (`release.started` says it began); (config, root, release, log, process)."""
    root, release, log = tmp_path / "artifacts", tmp_path / "release", tmp_path / "run.log"
    config = write_config(tmp_path, tiny_model, str(root), name=name)
    held = {**env, "METAREWARD_INJECT_FAULT": f"judgments:shard-0001:hold={release}"}
    return config, root, release, log, start_cli(["run", str(config)], held, log)


def test_cancel_from_the_ui_of_a_metareward_run_from_a_shell_ends_it_cancelled_in_seconds(
        prefect_stack, tmp_path, tiny_model):
    # No worker watches a `metareward run` started from a shell: its own watcher acts on the UI's Cancel.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Cancelling

    url, env = prefect_stack
    config, root, release, log, process = _held_run(env, tmp_path, tiny_model, "shell")
    started, judgments = release.with_name("release.started"), root / "shell/iter-1/judgments"
    deadline = time.monotonic() + 600
    while not (started.exists() and list(judgments.glob("shard-*.json"))):
        assert process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, "judging never started"
        time.sleep(0.2)
    kept = {path.name: path.read_text() for path in (root / "shell").glob("iter-1/*/*.json")
            if path.name != "manifest.json"}
    with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        [flow_run] = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["shell"])))
        client.set_flow_run_state(flow_run.id, Cancelling())
        cancelled_at = time.monotonic()
        try:
            assert process.wait(timeout=120) == 130, log.read_text()[-3000:]
        finally:
            process.kill()
        seconds = time.monotonic() - cancelled_at
        flow_run = client.read_flow_run(flow_run.id)
    text = log.read_text()
    assert seconds < 30 and flow_run.state.is_cancelled(), (seconds, flow_run.state, text[-3000:])
    assert "was cancelled from the Prefect UI" in text
    [iteration] = _children(url, flow_run.id)
    assert iteration.state.is_cancelled(), iteration.state
    assert not list(judgments.glob("shard-0001-*"))

    resumed = run_cli(["run", str(config)], env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for name, marker in kept.items():
        assert next((root / "shell").glob(f"iter-1/*/{name}")).read_text() == marker, f"{name} was recomputed"


def test_shard_flow_runs_that_never_start_are_cancelled_at_the_deadline_and_a_retry_adopts_one_still_scheduled(
        prefect_stack, tmp_path, tiny_model):
    # The GPU pool has no worker here: its shard flow runs stay Scheduled, as on a GPU node that never comes up.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Scheduled

    url, _ = prefect_stack
    config = yaml.safe_load(write_config(
        tmp_path, tiny_model, str(tmp_path / "artifacts"), name="stalled", iteration_overrides={"num_prompts": 4},
        orchestration={"shard_deployment": "metareward-shard/shard-gpu", "shard_poll_interval_s": 0.5,
                       "shard_timeout_s": 3}).read_text())
    names = [f"stalled responses iter-1 shard-000{i}" for i in range(2)]

    def runs_of(name: str) -> list:
        return _read(url, "read_flow_runs", flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[name])))

    flow_run = _run_and_wait(url, "metareward-iteration/demo-iteration",
                             {"config": config, "iteration": 1, "model_path": str(tiny_model)})
    assert flow_run.state.is_failed(), flow_run.state
    assert "did not finish within orchestration.shard_timeout_s=3 s" in flow_run.state.message
    # The fan-out waited, cancelled, retried once (the shards started again), cancelled again.
    first = {name: runs_of(name) for name in names}
    assert [len(runs) for runs in first.values()] == [2, 2]
    assert all(run.state.name in ("Cancelling", "Cancelled") for runs in first.values() for run in runs)

    # A shard run left scheduled (its parent crashed before it could cancel it) is adopted by the retried
    # iteration: no second flow run of that shard is started beside it.
    left = first[names[0]][0]
    with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        client.set_flow_run_state(left.id, Scheduled(), force=True)
    flow_run = _retry_as_the_ui_does(url, flow_run.id, timeout=300)
    assert flow_run.state.is_failed(), flow_run.state
    assert [len(runs_of(name)) for name in names] == [3, 4]  # adopted, then started again by the retry; 2 more
    # The adopted run was waited for and cancelled at the deadline like the runs the retry started.
    [adopted] = [run for run in runs_of(names[0]) if run.id == left.id]
    assert adopted.state.name in ("Cancelling", "Cancelled"), adopted.state


ASK = {"max_top_score_share": 0.0, "action": "ask", "audit_samples": 2}
"""Health settings whose judge-score check every iteration fails (a share of 5s is always >= 0), asking a person."""


def _paused_run(url: str, flow_run_filter, process, log: Path | None, timeout: float = 600):
    """The flow run `flow_run_filter` finds once it is Paused (a health gate waits for a decision); fails if the run
    (or the `metareward run` process that runs it) ends first."""
    deadline = time.monotonic() + timeout
    while True:
        runs = _read(url, "read_flow_runs", flow_run_filter=flow_run_filter)
        if runs and runs[0].state.is_paused():
            return runs[0]
        assert not runs or not runs[0].state.is_final(), runs[0].state
        assert process is None or process.poll() is None, log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"{flow_run_filter} never paused"
        time.sleep(1)


def test_a_failed_health_check_pauses_a_shell_run_with_a_form_the_ui_shows_and_its_answer_is_kept(
        prefect_stack, tmp_path, tiny_model):
    url, env = prefect_stack
    root = tmp_path / "artifacts"
    config = write_config(tmp_path, tiny_model, str(root), name="asked",
                          health={**ASK, "ask_timeout_s": 600, "on_timeout": "stop"})
    log = tmp_path / "run.log"
    process = start_cli(["run", str(config)], env, log)
    try:
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

        paused = _paused_run(url, FlowRunFilter(name=FlowRunFilterName(any_=["asked iter-1"])), process, log)
        keyset = paused.state.state_details.run_input_keyset
        schema = json.loads(_read(url, "read_flow_run_input", flow_run_id=paused.id, key=keyset["schema"]))
        description = _read(url, "read_flow_run_input", flow_run_id=paused.id, key=keyset["description"])
        with browser_page() as page:
            page.goto(url.removesuffix("/api") + f"/runs/flow-run/{paused.id}")
            page.get_by_role("button", name="Resume").click()
            page.get_by_text("Look at the judge first").wait_for()
            screenshot(page, "health-gate-form.png")
            page.goto(page.get_by_role("link", name="judge audit of iteration 1").get_attribute("href"))
            page.get_by_text("Judge scores (every judgment of the iteration)").wait_for()
            audit_page = page.inner_text("body")
            screenshot(page, "judge-audit.png")
        # Answered as the form's Submit does: the run input, validated by the server against the form's schema.
        # httpx's own 5 s timeout is too short for a busy 2-core machine; 60 s is the Prefect client's.
        answer = httpx.post(f"{url}/flow_runs/{paused.id}/resume",
                            json={"run_input": {"decision": "keep_model", "note": "the judge gives 5s only"}},
                            timeout=60)
        assert answer.status_code == 201 and answer.json()["status"] == "ACCEPT", answer.text
        assert process.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        process.kill()
    assert schema["properties"]["decision"]["enum"] == ["continue", "drop_judge_pairs", "keep_model", "stop"]
    assert "judge top-score share" in description and "health.max_top_score_share" in description
    assert audit_page.count("Prompt 1 of 2") == 1 and "meta-judged" in audit_page and "Verdicts" in audit_page
    decision = json.loads((root / "asked/iter-1/health/decision.json").read_text())
    assert (decision["choice"], decision["decided_by"], decision["note"]) == (
        "keep_model", "the Prefect UI", "the judge gives 5s only")
    text = log.read_text()
    assert "waiting up to 600 s for a decision in the Prefect UI" in text
    assert "checkpoint not run: the health decision is keep_model" in text


def test_nobody_answering_takes_on_timeout_and_says_so(prefect_stack, tmp_path, tiny_model):
    url, env = prefect_stack
    root = tmp_path / "artifacts"
    config = write_config(tmp_path, tiny_model, str(root), name="unanswered",
                          health={**ASK, "ask_timeout_s": 3, "on_timeout": "drop_judge_pairs"})
    result = run_cli(["run", str(config)], env)
    assert result.returncode == 0, result.stderr[-3000:]
    decision = json.loads((root / "unanswered/iter-1/health/decision.json").read_text())
    assert decision["choice"] == "drop_judge_pairs"
    assert decision["decided_by"] == "health.on_timeout after 3 s without an answer"
    assert stage_manifests(ArtifactStore(str(root)), "unanswered")[1]["dpo_dataset"]["stats"]["judge_pairs"] == 0


def test_a_deployed_iteration_suspends_on_a_failed_health_check_and_the_answer_reschedules_it(
        prefect_stack, tmp_path, tiny_model):
    # With no timeout, a top-level run of a deployment suspends: its process exits (the worker's infrastructure is
    # released) and the answer reschedules it; its finished stages come from the cache.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    url, _ = prefect_stack
    root = tmp_path / "artifacts"
    config = yaml.safe_load(write_config(tmp_path, tiny_model, str(root), name="suspended",
                                         health={**ASK, "ask_timeout_s": None}).read_text())
    with temporary_settings({PREFECT_API_URL: url}):
        flow_run = run_deployment("metareward-iteration/demo-iteration", parameters={
            "config": config, "iteration": 1, "model_path": str(tiny_model)}, timeout=0, as_subflow=False, _sync=True)
    paused = _paused_run(url, FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])), None, None)
    assert paused.state.name == "Suspended"
    markers = {path.name: path.read_text() for path in (root / "suspended").glob("iter-1/*/*.json")
               if path.name != "manifest.json"}
    with temporary_settings({PREFECT_API_URL: url}), get_client(sync_client=True) as client:
        assert client.resume_flow_run(paused.id, run_input={"decision": "continue"}).status.value == "ACCEPT"
        deadline = time.monotonic() + 600
        while not (flow_run := client.read_flow_run(paused.id)).state.is_final():
            assert time.monotonic() < deadline, flow_run.state
            time.sleep(2)
    assert flow_run.state.is_completed(), flow_run.state
    decision = json.loads((root / "suspended/iter-1/health/decision.json").read_text())
    assert (decision["choice"], decision["decided_by"]) == ("continue", "the Prefect UI")
    assert "checkpoint" in stage_manifests(ArtifactStore(str(root)), "suspended")[1]
    for name, marker in markers.items():  # nothing computed before the suspension was computed again
        assert next((root / "suspended").glob(f"iter-1/*/{name}")).read_text() == marker, f"{name} was recomputed"


def test_a_model_stage_shows_its_progress_and_the_iteration_its_running_stage_while_it_runs(
        prefect_stack, tmp_path, tiny_model):
    # Judging's second shard (of three) is held as it starts: the first is done, and that is what the UI must show
    # then — a third of the stage, and judgments as the running stage; released, the stage ends at 100 %.
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    url, env = prefect_stack
    _, _, release, log, process = _held_run(env, tmp_path, tiny_model, "watched")

    def latest(key: str):
        [artifact] = _read(url, "read_latest_artifacts", artifact_filter=ArtifactFilter(
            key=ArtifactFilterKey(any_=[key])))
        return artifact

    try:
        wait_for(lambda: release.with_name("release.started").exists(), process, log, "judging's second shard")
        held = latest("watched-iter-1-judgments-progress")
        running = latest("watched-iter-1")
        release.touch()
        assert process.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        process.kill()
    assert held.type == "progress" and 100 / 3 - 0.1 < held.data < 100, held.data
    assert "judgments iter-1: 1/3 shard(s) done" in held.description and "requests" in held.description
    assert "**Running now: judgments** (3 shard(s))" in running.data and "| responses |" in running.data
    done = latest("watched-iter-1-judgments-progress")
    assert done.data == 100 and "3/3 shard(s) done" in done.description
    assert "Running now" not in latest("watched-iter-1").data  # the summary once the iteration ended
