"""DPO and SFT as a Ray Train gang on Ray's own multi-node simulation (a head without GPUs and two worker nodes with
one logical GPU each, so a gang of two spans both; gloo, since no GPU is real): the gang trains the weights one
process trains on the same global batch, a worker killed mid-epoch restarts the gang from the stored checkpoint
and the weights are those of an uninterrupted gang, and a cluster too small for the gang is a clear error. FSDP is
not exercised here: accelerate turns it on for GPU processes only, and a CPU gang given fsdp.yaml trains as DDP (FSDP
under Ray Train ran on an H200: benchmarks/RESULTS.md)."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

ray = pytest.importorskip("ray")

from metareward.config.campaign import CampaignConfig, ConfigError, DPOConfig, SFTConfig  # noqa: E402
from metareward.pipeline.input_files import load_sft_examples  # noqa: E402
from metareward.placement.gang import GangTraining, sharing_environment, train_on_cluster  # noqa: E402
from metareward.placement.replicas import PlacementError  # noqa: E402
from metareward.preflight import check_training_gangs  # noqa: E402
from metareward.training.checkpoints import COMPLETE_FILE, CheckpointStore  # noqa: E402
from metareward.training.logs import TrainingResult  # noqa: E402
from metareward.training.trainer import train_dpo, train_sft  # noqa: E402
from tests.conftest import REPO  # noqa: E402
from tests.integration.test_training import dataset  # noqa: E402

pytestmark = pytest.mark.slow

DPO = dict(num_epochs=2, global_batch_size=4, per_device_batch_size=2, learning_rate=1e-3, max_length=256,
           save_steps=2, accelerate_config=str(REPO / "deployments" / "accelerate" / "ddp.yaml"))
TOLERANCE = 2e-5
"""Largest difference allowed between a weight trained by the gang and by one process. The gang averages two ranks'
gradients with an all-reduce where one process accumulates two micro-batches: float32 sums in another order may
differ in their last bits (≈1e-7 relative), which Adam carries through 8 steps at lr 1e-3 to ≈1e-6. Measured here
with gloo: 0.0 (the same bits). The training itself moves the weights by 4.5e-3, so a wrong batch, step count or
learning rate cannot hide under it."""


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=1, num_gpus=1), cluster.add_node(num_cpus=1, num_gpus=1)]
    ray.init(address=cluster.address)
    yield cluster, nodes
    ray.shutdown()
    cluster.shutdown()


def weights(folder) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).state_dict()


def largest_difference(first: dict, second: dict) -> float:
    assert first.keys() == second.keys()
    return max(float((first[name] - second[name]).abs().max()) for name in first)


def gang(kind: str, model, examples, settings, root, seed: int = 0) -> GangTraining:
    return GangTraining(kind, str(model), examples, settings, seed, "float32", None,
                        CheckpointStore(str(root), "job/checkpoints"), "job/model")


@pytest.fixture(scope="module")
def uninterrupted_gang(cluster, tiny_model, tmp_path_factory):
    """A DPO gang of 2 workers on the 2 nodes, with nothing in its way."""
    root = tmp_path_factory.mktemp("gang")
    settings = DPOConfig(num_processes=2, **DPO)
    result, uri = train_on_cluster(cluster[0].address, gang("dpo", tiny_model, dataset(), settings, root), 120, 1)
    return result, uri, root


def test_a_gang_of_two_on_two_nodes_trains_the_weights_of_one_process(uninterrupted_gang, tiny_model, tmp_path):
    result, uri, root = uninterrupted_gang
    assert uri == str(root / "job" / "model")
    assert (root / "job" / "model" / "model_id.txt").read_text().strip() == result.model_id
    one_process = train_dpo(tiny_model, dataset(), DPOConfig(num_processes=1, **DPO), tmp_path, dtype="float32")
    assert [e["step"] for e in result.log_history if "loss" in e] == list(range(1, 9))
    assert result.pairs_trained == 16 and result.resumed_from_step == 0
    difference = largest_difference(weights(uri), weights(one_process.checkpoint))
    assert difference < TOLERANCE
    assert largest_difference(weights(uri), weights(tiny_model)) > 100 * TOLERANCE  # it did train
    losses = [e["loss"] for e in result.log_history if "loss" in e]
    alone = [e["loss"] for e in one_process.log_history if "loss" in e]
    assert max(abs(a - b) for a, b in zip(losses, alone, strict=True)) < 1e-4
    # The gang's checkpoints stay until the stage records its job (run_job clears them).
    assert sorted(p.parent.name for p in root.rglob(COMPLETE_FILE)) == ["checkpoint-8"]


def gang_losing_rank_1(address: str, tiny_model, tmp_path, monkeypatch, lose) -> TrainingResult:
    """A DPO gang of 2 whose rank 1 holds after step 3 (METAREWARD_INJECT_FAULT); once the checkpoint of step 2 is
    complete, lose(record of the hold: pid, node_id) takes rank 1 away, then the hold is released. Returns the
    gang's result; fails the test with the gang's error if it raised."""
    release = tmp_path / "release"
    monkeypatch.setenv("METAREWARD_INJECT_FAULT", f"checkpoint:all:step=3:rank=1:hold={release}")
    outcome: dict = {}

    def train():
        try:
            outcome["result"] = train_on_cluster(address, gang("dpo", tiny_model, dataset(),
                                                               DPOConfig(num_processes=2, **DPO), tmp_path / "store"),
                                                 120, 1)
        except Exception as error:  # reported by the assertion below
            outcome["error"] = error

    thread = threading.Thread(target=train)
    thread.start()
    started, complete = release.with_name("release.started"), tmp_path / "store/job/checkpoints/checkpoint-2"
    deadline = time.monotonic() + 300
    while not (started.exists() and (complete / COMPLETE_FILE).exists()):
        assert thread.is_alive(), outcome
        assert time.monotonic() < deadline, "rank 1 never reached step 3"
        time.sleep(0.1)
    lose(json.loads(started.read_text()))
    release.touch()
    thread.join(timeout=600)
    assert "error" not in outcome, outcome.get("error")
    return outcome["result"][0]


def test_a_worker_killed_mid_epoch_restarts_the_gang_from_its_checkpoint(
        cluster, uninterrupted_gang, tiny_model, tmp_path, monkeypatch):
    """Rank 1's process is SIGKILLed while it holds after step 3. Ray Train restarts both workers, they resume from
    step 2, and the weights are the uninterrupted gang's, bit for bit."""
    result = gang_losing_rank_1(cluster[0].address, tiny_model, tmp_path, monkeypatch,
                                lambda held: os.kill(held["pid"], signal.SIGKILL))
    assert result.resumed_from_step == 2
    assert [e["step"] for e in result.log_history if "loss" in e] == list(range(1, 9))
    assert result.model_id == uninterrupted_gang[0].model_id
    # The restarted workers read the reference log-probs the first attempt kept instead of computing them again.
    assert result.reference_reused and not uninterrupted_gang[0].reference_reused


def test_sft_as_a_gang_trains_the_weights_of_one_process(cluster, tiny_model, tmp_path):
    examples = load_sft_examples(REPO / "deployments" / "sft" / "eft-example.jsonl").head(8)
    common = dict(path="unused", num_epochs=2, checkpoint_epoch=None, global_batch_size=4, per_device_batch_size=2,
                  learning_rate=1e-3, max_length=2048, accelerate_config=DPO["accelerate_config"])
    settings = SFTConfig(num_processes=2, **common).training()
    result, uri = train_on_cluster(cluster[0].address, gang("sft", tiny_model, examples, settings, tmp_path), 120, 1)
    alone = train_sft(tiny_model, examples, SFTConfig(**common).training(), tmp_path / "alone", dtype="float32")
    assert largest_difference(weights(uri), weights(alone.checkpoint)) < TOLERANCE


def test_a_cluster_too_small_for_the_gang_is_a_clear_error(cluster, tiny_model, tmp_path):
    settings = DPOConfig(num_processes=4, **{**DPO, "global_batch_size": 8})
    with pytest.raises(PlacementError, match=r"did not place a training gang of 4 worker\(s\) × 1 GPU within"):
        train_on_cluster(cluster[0].address, gang("dpo", tiny_model, dataset(), settings, tmp_path), 5, 1)


def test_the_accelerate_config_says_how_a_gang_shares_the_model():
    fsdp = sharing_environment(str(REPO / "deployments" / "accelerate" / "fsdp.yaml"), 8)
    assert fsdp["ACCELERATE_USE_FSDP"] == "true" and fsdp["FSDP_VERSION"] == "2"
    assert fsdp["FSDP_AUTO_WRAP_POLICY"] == "TRANSFORMER_BASED_WRAP" and "ACCELERATE_MIXED_PRECISION" not in fsdp
    assert "ACCELERATE_USE_FSDP" not in sharing_environment(DPO["accelerate_config"], 2)
    with pytest.raises(PlacementError, match="DeepSpeed runs under `accelerate launch` only"):
        sharing_environment(str(REPO / "deployments" / "accelerate" / "deepspeed-zero3.yaml"), 2)
    # Before anything runs, the campaign's preflight says which section would fail on a Ray cluster.
    config = CampaignConfig.from_yaml(REPO / "deployments" / "configs" / "paper-llama3-70b.yaml")
    check_training_gangs(config)
    third = config.iterations[2]
    deepspeed = third.model_copy(update={"dpo": third.dpo.model_copy(update={
        "accelerate_config": str(REPO / "deployments" / "accelerate" / "deepspeed-zero3.yaml")})})
    with pytest.raises(ConfigError, match=r"iterations\[2\]\.dpo\.accelerate_config: .*DeepSpeed"):
        check_training_gangs(config.model_copy(update={"iterations": [*config.iterations[:2], deepspeed]}))


def test_a_node_removed_mid_epoch_restarts_the_gang_on_the_nodes_left(cluster, uninterrupted_gang, tiny_model,
                                                                       tmp_path, monkeypatch):
    """Runs last: it removes a node. A third node joins; rank 1 holds after step 3 until the test has removed the
    node it runs on (once the checkpoint of step 2 is complete). The gang restarts on the two nodes left, resumes
    from step 2, and trains the uninterrupted gang's weights."""
    ray_cluster, _ = cluster
    ray_cluster.add_node(num_cpus=1, num_gpus=1)
    ray_cluster.wait_for_nodes()

    def remove_its_node(held: dict) -> None:
        ray_cluster.remove_node(next(node for node in ray_cluster.worker_nodes if node.node_id == held["node_id"]))

    result = gang_losing_rank_1(ray_cluster.address, tiny_model, tmp_path, monkeypatch, remove_its_node)
    assert result.resumed_from_step == 2
    assert result.model_id == uninterrupted_gang[0].model_id
