"""Training on a Ray cluster: a Ray Train gang of num_processes workers, one GPU each, placed all together or not at
all across the cluster's nodes, sharing the model as the training's accelerate config says (FSDP or DDP); a lost
worker restarts the gang, which resumes from the last checkpoint in the artifact store."""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from metareward.config.training import TrainingConfig
from metareward.placement.replicas import REPLICA_ENVIRONMENT, PlacementError, connect
from metareward.training.checkpoints import CheckpointStore
from metareward.training.logs import TrainingResult
from metareward.training.models import MODEL_DIGEST_FILE, resolve_model
from metareward.training.process import train_here
from metareward.training.sharing import read_sharing
from metareward.training.trainer import EmptyTrainingSetError, write_training_set


class TrainingGangError(RuntimeError):
    """The gang failed more often than orchestration.training_max_failures allows; the message has each rank's
    error."""


@dataclass(frozen=True)
class GangTraining:
    """One training as every worker of its gang needs it (sent to each; picklable). `model` is M_t as a model.path
    or checkpoint URI that each worker resolves on its own node; the kept model goes to `model_key` in the store of
    `checkpoints`."""

    kind: str
    model: str
    examples: pl.DataFrame
    settings: TrainingConfig
    seed: int
    dtype: str
    chat_template: str | None
    checkpoints: CheckpointStore
    model_key: str


def train_on_cluster(address: str, training: GangTraining, placement_timeout_s: float,
                     max_failures: int) -> tuple[TrainingResult, str]:
    """Train on the Ray cluster at `address` as a gang of settings.num_processes workers (one GPU each, on as many
    nodes as it takes; one CPU each on a cluster without GPUs); returns the result and the kept model's URI, which
    rank 0 uploaded. Up to max_failures times a lost worker restarts the gang from its last checkpoint. Raises
    PlacementError when the cluster cannot hold the gang within placement_timeout_s, EmptyTrainingSetError when no
    example is left to train on, TrainingGangError when the failures run out."""
    import ray
    from ray.train import ControllerError, FailureConfig, RunConfig, ScalingConfig, TrainingFailedError
    from ray.train.torch import TorchConfig, TorchTrainer

    connect(address)
    settings = training.settings
    workers = settings.num_processes
    gpus = ray.cluster_resources().get("GPU", 0) > 0
    environment = {name: os.environ[name] for name in REPLICA_ENVIRONMENT if name in os.environ}
    environment.update(sharing_environment(settings.accelerate_config, workers))
    backend = "nccl" if gpus and _workers_have_cuda(placement_timeout_s) else "gloo"
    # Read by Ray Train's controller when fit() starts: how long the gang may wait for its placement group.
    os.environ["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(placement_timeout_s)
    # Ray Train's own run folder: only its storage marker goes there (the checkpoints are in the artifact store).
    storage = tempfile.mkdtemp(prefix="metareward-ray-train-")
    trainer = TorchTrainer(
        _worker, train_loop_config={"training": training},
        torch_config=TorchConfig(backend=backend),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus, placement_strategy="PACK",
                                     resources_per_worker={"CPU": 1, "GPU": 1} if gpus else {"CPU": 1}),
        run_config=RunConfig(
            name=f"metareward-{training.kind}-{uuid.uuid4().hex[:8]}",
            storage_path=storage,
            # A spot reclaim counts as a preemption in Ray Train, apart from max_failures: bounded the same.
            failure_config=FailureConfig(max_failures=max_failures, max_preemption_failures=max_failures,
                                         controller_failure_limit=0),
            worker_runtime_env={"env_vars": environment}),
    )
    started = time.perf_counter()
    try:
        outcome = trainer.fit().return_value
    except ControllerError as error:
        cause = error.controller_failure
        if type(cause).__name__ == "WorkerGroupStartupTimeoutError":
            raise PlacementError(
                f"the cluster at {address} did not place a training gang of {workers} worker(s) × "
                f"{'1 GPU' if gpus else '1 CPU'} within orchestration.placement_timeout_s={placement_timeout_s:.0f} s "
                f"(cluster: {ray.cluster_resources()}, free: {ray.available_resources()}); lower "
                f"{training.kind}.num_processes or add GPUs") from None
        raise TrainingGangError(f"{training.kind.upper()} gang of {workers} on {address}: {cause!r}") from error
    except TrainingFailedError as error:
        failures = getattr(error, "worker_failures", {}) or {}
        detail = "; ".join(f"rank {rank}: {failure!r}" for rank, failure in sorted(failures.items())) or repr(error)
        raise TrainingGangError(f"{training.kind.upper()} gang of {workers} on {address} failed after "
                                f"{max_failures} restart(s) (orchestration.training_max_failures): {detail}") from error
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    if "error" in outcome:
        raise outcome["error"]
    result = outcome["result"]
    result.seconds = time.perf_counter() - started
    return result, outcome["model_uri"]


def sharing_environment(accelerate_config: str, workers: int) -> dict[str, str]:
    """What `accelerate launch --config_file accelerate_config` would tell each process about sharing the model —
    ACCELERATE_USE_FSDP and the FSDP_* settings — for workers that Ray Train starts instead: the same YAML describes
    a gang's sharding as it does a launch's. Precision is the trainer's, as in one process (bf16 on a GPU that has
    it), never the YAML's mixed_precision: a CPU gang would otherwise train in bf16 autocast. Raises PlacementError
    for DeepSpeed (run it under `accelerate launch`, without a Ray address), FileNotFoundError for a missing file and
    ValueError for one that is not an accelerate config."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    sharing = read_sharing(accelerate_config)
    if sharing.deepspeed:
        raise PlacementError(f"accelerate_config {sharing.path}: DeepSpeed runs under `accelerate launch` only; a Ray "
                             "Train gang shares the model with FSDP (deployments/accelerate/fsdp.yaml) or DDP "
                             "(ddp.yaml)")
    arguments = launch_command_parser().parse_args(
        ["--config_file", str(sharing.path), "--num_processes", str(workers), "--main_process_port", "0", "-m", "gang"])
    arguments, _, _ = _validate_launch_command(arguments)
    launched = prepare_multi_gpu_env(arguments)
    return {name: value for name, value in launched.items() if name.startswith(("ACCELERATE_USE_FSDP", "FSDP_"))}


def _workers_have_cuda(timeout_s: float) -> bool:
    """Whether a process given one of the cluster's GPUs sees CUDA (a CPU test cluster has logical GPUs only);
    PlacementError when no GPU is free within timeout_s."""
    import ray
    from ray.exceptions import GetTimeoutError

    @ray.remote(num_gpus=1, num_cpus=0)
    def cuda_available() -> bool:
        import torch

        return torch.cuda.is_available()

    probe = cuda_available.remote()
    try:
        return ray.get(probe, timeout=timeout_s)
    except GetTimeoutError:
        ray.cancel(probe, force=True)
        raise PlacementError(f"no GPU of the cluster came free within orchestration.placement_timeout_s="
                             f"{timeout_s:.0f} s (free: {ray.available_resources()})") from None


def _worker(config: dict) -> dict | None:
    """One rank of the gang: M_t resolved on this node, the training set written to a scratch folder, the training
    (resumed from the latest checkpoint), then rank 0 uploads the kept model. A training set left empty is
    returned, not raised: every rank finds it so, and no restart would change that."""
    import torch

    training: GangTraining = config["training"]
    if not torch.cuda.is_available():
        # Ray Train points accelerate at "cuda" in any worker it gave a GPU, a logical one too (a CPU test cluster).
        os.environ.pop("ACCELERATE_TORCH_DEVICE", None)
    with tempfile.TemporaryDirectory(prefix="metareward-train-") as scratch:
        folder = Path(scratch)
        model_path = resolve_model(training.model)
        try:
            too_long = write_training_set(training.kind, model_path, training.examples, training.settings, folder,
                                          training.chat_template)
        except EmptyTrainingSetError as error:
            return {"error": error}
        result = train_here(training.kind, model_path, training.settings, folder, training.seed, training.dtype,
                            training.chat_template, training.checkpoints)
        if result is None:
            return None
        model_uri = training.checkpoints.store.put_folder(result.checkpoint, training.model_key,
                                                          last=MODEL_DIGEST_FILE)
    return {"result": dataclasses.replace(result, pairs_too_long=too_long), "model_uri": model_uri}
