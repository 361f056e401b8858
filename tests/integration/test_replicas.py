"""Engine replicas on Ray's own multi-node simulation (a head without GPUs and two worker nodes with two logical GPUs
each): tensor-parallel bundles on one node, GPU ids mapped through the node's CUDA_VISIBLE_DEVICES, a replica that
dies mid-job replaced and its job run again, two pools that never share a GPU, a cluster too small for the pool."""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from metareward.inference.vllm_backend import _group_alive  # noqa: E402
from metareward.placement.replicas import PlacementError, ReplicaPool, check_ray_address  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False})
    # The second node was started by a scheduler that gave it physical GPUs 6 and 7 (as Slurm or a shared host do).
    workers = [cluster.add_node(num_cpus=2, num_gpus=2),
               cluster.add_node(num_cpus=2, num_gpus=2, env_vars={"CUDA_VISIBLE_DEVICES": "6,7"})]
    ray.init(address=cluster.address)
    # The jobs below are defined in this test module, which the replicas' processes cannot import: send them whole.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    yield cluster, workers
    ray.shutdown()
    cluster.shutdown()


def where(marker: str) -> dict:
    """A job that reports the process it ran in."""
    return {"pid": os.getpid(), "devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "marker": marker}


def die_once(flag: str) -> int:
    """A job that kills its own replica the first time it runs (the flag file says it did), then succeeds."""
    path = Path(flag)
    if not path.exists():
        path.write_text(str(os.getpid()))
        os._exit(1)
    return os.getpid()


def test_tensor_parallel_bundles_lie_on_one_node_with_their_own_gpus(cluster):
    pool = ReplicaPool(replicas=2, tensor_parallel_size=2, placement_timeout_s=60)
    try:
        replicas = [pool.replica(index) for index in range(2)]
        assert len({replica.node_id for replica in replicas}) == 2  # 4 GPUs in bundles of 2: one per node
        assert all(len(replica.gpu_ids) == 2 for replica in replicas)
        by_devices = sorted(sorted(replica.cuda_visible_devices.split(",")) for replica in replicas)
        # Ray's assignment, mapped through what each node inherited: never logical GPU 0 of the host twice.
        assert by_devices == [["0", "1"], ["6", "7"]]
        result, replica = pool.run(where, "x")
        assert result["devices"] == replica.cuda_visible_devices
    finally:
        pool.close()


def test_a_replica_that_dies_mid_job_is_replaced_and_its_job_runs_again(cluster, tmp_path):
    pool = ReplicaPool(replicas=1, tensor_parallel_size=2, placement_timeout_s=60)
    told = []
    try:
        first_pid = pool.run(where, "before")[0]["pid"]
        pid, replica = pool.run(die_once, str(tmp_path / "died"), on_requeue=told.append)
        assert pid != first_pid and int((tmp_path / "died").read_text()) == first_pid
        assert pool.replaced == 1 and len(told) == 1 and "died" in told[0]
        assert pool.run(where, "after")[0]["pid"] == pid  # the new replica keeps serving; the dead one is gone
    finally:
        pool.close()


def die_always() -> None:
    os._exit(1)


def refuse(text: str) -> None:
    raise ValueError(f"bad input: {text}")


def test_a_job_that_kills_every_replica_goes_to_the_retries_and_its_own_errors_keep_their_type(cluster):
    from metareward.pipeline.faults import transient
    from metareward.placement.replicas import MAX_REQUEUES, ReplicaLostError

    pool = ReplicaPool(replicas=1, tensor_parallel_size=2, placement_timeout_s=60)
    told = []
    try:
        with pytest.raises(ReplicaLostError, match=f"died {MAX_REQUEUES + 1} times in a row") as lost:
            pool.run(die_always, on_requeue=told.append)
        assert transient(lost.value) and len(told) == MAX_REQUEUES and pool.replaced == MAX_REQUEUES + 1
        with pytest.raises(ValueError, match="bad input: x") as refused:
            pool.run(refuse, "x")
        assert not transient(refused.value)  # bad input is not retried, on Ray as in-process
        assert pool.run(where, "still serving")[0]["marker"] == "still serving"
    finally:
        pool.close()
    with pytest.raises(ReplicaLostError, match="released"):
        pool.run(where, "after close")


def test_two_pools_never_share_a_gpu_and_the_second_waits_for_the_first(cluster):
    first = ReplicaPool(replicas=2, tensor_parallel_size=2, placement_timeout_s=60)
    placed = {}

    def second_pool():
        started = time.monotonic()
        pool = ReplicaPool(replicas=2, tensor_parallel_size=2, placement_timeout_s=120)
        placed["waited"] = time.monotonic() - started
        placed["devices"] = sorted(pool.run(where, "second")[0]["devices"] for _ in range(1))
        pool.close()

    def second_pool_guarded():
        try:
            second_pool()
        except BaseException as error:
            placed["error"] = repr(error)

    thread = threading.Thread(target=second_pool_guarded)
    thread.start()
    thread.join(timeout=5)
    assert thread.is_alive(), f"the second pool was placed while the first held every GPU: {placed}"
    first.close()
    thread.join(timeout=120)
    assert not thread.is_alive() and placed["waited"] >= 5 and placed["devices"]


def test_a_cluster_too_small_says_what_is_missing(cluster):
    with pytest.raises(PlacementError, match=r"3 engine replica\(s\) of \{'GPU': 2, 'CPU': 1.0\}.*the cluster has"):
        ReplicaPool(replicas=3, tensor_parallel_size=2, placement_timeout_s=3)
    pool = ReplicaPool(replicas=2, tensor_parallel_size=2, placement_timeout_s=60)  # nothing was left reserved
    pool.close()


def test_an_unreachable_ray_address_fails_in_seconds():
    from metareward.host.ports import free_port

    started = time.monotonic()
    with pytest.raises(PlacementError, match="no Ray cluster answers at 127.0.0.1:"):
        check_ray_address(f"127.0.0.1:{free_port()}")
    assert time.monotonic() - started < 6


def serve_in_replica(model_path: str, vllm_python: str, log_dir: str) -> dict:
    """A job in a replica: the process's shared vLLM engine (started by the first job, kept by the next), one
    greedy answer, and the engine's server process."""
    from metareward.config.campaign import InferenceConfig, ModelConfig
    from metareward.inference.base import GenerationRequest
    from metareward.inference.engines import shared_backend

    backend = shared_backend(ModelConfig(path=model_path, dtype="float32"),
                             InferenceConfig(backend="vllm", vllm_python=vllm_python, max_model_len=2048,
                                             startup_timeout_s=600, replicas=1), model_path, log_dir=log_dir)
    request = GenerationRequest(({"role": "user", "content": "Explain recursion."},), max_tokens=4, temperature=0.0)
    return {"text": backend.generate([request])[0].completions[0].text, "server": backend.servers[0].process.pid,
            "replica": os.getpid()}


def test_a_vllm_server_runs_inside_a_replica_and_stays_for_the_next_job(cluster, tiny_model, vllm_python, tmp_path):
    pool = ReplicaPool(replicas=1, tensor_parallel_size=1, placement_timeout_s=60)
    try:
        first, replica = pool.run(serve_in_replica, str(tiny_model), str(vllm_python), str(tmp_path))
        second, _ = pool.run(serve_in_replica, str(tiny_model), str(vllm_python), str(tmp_path))
        assert first["replica"] == second["replica"] and first["server"] == second["server"]  # one engine, kept
        assert first["text"] == second["text"] and replica.gpu_ids
        # The replica killed as the OOM killer would: its server must not outlive it on the replica's GPUs.
        os.kill(first["replica"], signal.SIGKILL)
        deadline = time.monotonic() + 60
        while _group_alive(first["server"]) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _group_alive(first["server"]), "the dead replica's vLLM server was left running"
        third, _ = pool.run(serve_in_replica, str(tiny_model), str(vllm_python), str(tmp_path))
        assert third["replica"] != first["replica"] and third["text"] == first["text"]  # a new replica, a new engine
    finally:
        pool.close()
    assert not _group_alive(third["server"])  # closing the pool stopped the engine's server, no orphan left


def test_two_campaigns_on_one_cluster_take_turns_for_its_gpus_and_both_complete(cluster, tmp_path, tiny_model):
    """Each campaign asks for every GPU of the cluster (2 replicas × 2): while one holds them the other's model stage
    waits for placement, then runs; both finish, each job on a whole 2-GPU replica."""
    from tests.integration.campaigns import cli_environment, start_cli, write_config

    ray_cluster, _ = cluster
    runs = []
    for name in ("first", "second"):
        folder = tmp_path / name
        folder.mkdir()
        config = write_config(folder, tiny_model, str(folder / "root"), name=name,
                              inference={"backend": "transformers", "verdict_mode": "forced", "max_model_len": 2048,
                                         "batch_size": 8, "replicas": 2, "tensor_parallel_size": 2})
        env = cli_environment(folder / "prefect", RAY_ADDRESS=ray_cluster.address)
        runs.append((start_cli(["run", str(config)], env, folder / "run.log"), folder / "run.log"))
    for process, log in runs:
        assert process.wait(timeout=900) == 0, log.read_text()[-3000:]
    spans = []
    for _, log in runs:
        lines = re.findall(r"^(\d\d:\d\d:\d\d\.\d+) .*ran on replica \d on node \S+ \(\w+\), GPUs ([\w,]+)",
                           log.read_text(), flags=re.M)
        assert len(lines) == 9 and all(len(gpus.split(",")) == 2 for _, gpus in lines)  # 3 model stages × 3 shards
        spans.append((min(time for time, _ in lines), max(time for time, _ in lines)))
    # Each held every GPU from its first job to its training: their jobs never ran at the same time.
    (first_start, first_end), (second_start, second_end) = sorted(spans)
    assert first_end < second_start, spans


def test_a_node_lost_during_judgments_costs_only_its_shard_and_the_tables_match_a_run_without_ray(
        cluster, tmp_path, tiny_model):
    """The campaign's model stages run on 2 replicas of the simulated cluster; the job of judgments shard 1 is held
    (METAREWARD_INJECT_FAULT hold) until the test has removed the node it runs on. The stage completes on the other
    node, no shard finished before the loss is written again, and every table equals an in-process run's."""
    from tests.integration.campaigns import cli_environment, run_cli, start_cli, write_config
    from tests.integration.test_pipeline import markers, stage_tables

    ray_cluster, workers = cluster
    config = write_config(tmp_path, tiny_model, str(tmp_path / "ray"),
                          inference={"backend": "transformers", "verdict_mode": "forced", "max_model_len": 2048,
                                     "batch_size": 8, "replicas": 2})
    release = tmp_path / "release"
    env = cli_environment(tmp_path / "prefect", RAY_ADDRESS=ray_cluster.address,
                          METAREWARD_INJECT_FAULT=f"judgments:shard-0001:hold={release}")
    process = start_cli(["run", str(config)], env, tmp_path / "ray.log")
    started = release.with_name("release.started")
    deadline = time.monotonic() + 400
    while not started.exists():
        assert process.poll() is None, (tmp_path / "ray.log").read_text()[-3000:]
        assert time.monotonic() < deadline, "judgments shard 1 never started"
        time.sleep(0.1)
    held_on = json.loads(started.read_text())["node_id"]
    node = next(worker for worker in workers if worker.node_id == held_on)
    done_at_loss = markers(tmp_path / "ray", "tiny")
    ray_cluster.remove_node(node)
    release.touch()
    assert process.wait(timeout=600) == 0, (tmp_path / "ray.log").read_text()[-3000:]
    log = (tmp_path / "ray.log").read_text()
    assert "judgments iter-1 shard-0001 re-queued" in log and "died" in log
    assert "ran on replica" in log
    after = markers(tmp_path / "ray", "tiny")
    for key, marker in done_at_loss.items():
        assert after[key] == marker, f"{key} was computed again after the node was lost"

    without_ray = run_cli(["run", str(config)], {**cli_environment(tmp_path / "prefect-local"),
                                                  "METAREWARD_ARTIFACT_ROOT": str(tmp_path / "local")})
    assert without_ray.returncode == 0, without_ray.stderr[-3000:]
    on_ray, in_process = stage_tables(tmp_path / "ray", "tiny"), stage_tables(tmp_path / "local", "tiny")
    assert on_ray.keys() == in_process.keys()
    for name in on_ray:
        assert on_ray[name].equals(in_process[name]), name
