"""Engine replicas on a Ray cluster: a pool of actors, each holding tensor_parallel_size GPUs of one node, that run
the jobs handed to them one at a time — a free replica takes the next job (work stealing), a replica that dies has
its job run again on a live one and is replaced, never reused.

The pool reserves its GPUs as one placement group of `replicas` bundles ({GPU: tensor_parallel_size, CPU: …} each):
all bundles or none, so two campaigns on one cluster never share a GPU id and never hold half a pool each while
waiting for the other half; each bundle lies on one node, so a tensor-parallel group never spans nodes. Ray hands an
actor its GPUs in CUDA_VISIBLE_DEVICES, mapped through the devices its node was started with, and the engine inside
(metareward.host.devices.visible_gpus) reads exactly that.

What a job computes is not decided here: `run` calls any importable function inside a replica's process, where the
process's shared engine (inference.engines.shared_backend) stays loaded from one job to the next.
"""

from __future__ import annotations

import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlparse

REPLICA_ENVIRONMENT = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "HF_HUB_OFFLINE",
                       "METAREWARD_VLLM_PYTHON", "METAREWARD_INJECT_FAULT")
"""The variables of the driver's environment a replica is started with (where the store is, how vLLM is found,
test faults). Never a credential: Ray would show it in its dashboard's runtime environments, so replicas read
AWS keys from the environment of the Ray worker they run on (a KubeRay worker pod's Secret), as every process here
reads its credentials where they are used."""


class PlacementError(RuntimeError):
    """The cluster cannot be reached or cannot hold the pool in time; the message says what is missing."""


class ReplicaLostError(ConnectionError):
    """A job's replicas kept dying (MAX_REQUEUES times), or the pool was closed under it. A ConnectionError, so that
    the task's retries treat it like an engine that went away (metareward.pipeline.faults.transient)."""


MAX_REQUEUES = 3
"""How many times one job is run again after its replica died, before ReplicaLostError goes to the task's retries
(a job that kills every replica it runs on — a host out of memory — must not loop for ever)."""


@dataclass(frozen=True)
class Replica:
    """Where a replica runs: its index in the pool, its node, and the GPUs Ray gave it (Ray's ids and the
    CUDA_VISIBLE_DEVICES its process sees)."""

    index: int
    node_id: str
    node_ip: str
    gpu_ids: tuple[str, ...]
    cuda_visible_devices: str | None

    def __str__(self) -> str:
        gpus = ",".join(self.gpu_ids) or "none"
        return f"replica {self.index} on node {self.node_ip} ({self.node_id[:8]}), GPUs {gpus}"


def check_ray_address(address: str, timeout_s: float = 5.0) -> None:
    """Raise PlacementError within `timeout_s` when nothing listens at a Ray address (ray://host:port, host:port,
    or "auto"/"local", which Ray resolves itself)."""
    if address in ("auto", "local"):
        return
    parsed = urlparse(address if "://" in address else f"ray://{address}")
    host, port = parsed.hostname, parsed.port or (10001 if parsed.scheme == "ray" else 6379)
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as error:
        raise PlacementError(f"no Ray cluster answers at {address} ({error}): start it (ray start --head), fix "
                             "orchestration.ray_address / RAY_ADDRESS, or unset both to run in this process") from None


class _ReplicaActor:
    """The actor class: where it runs, and a call of any function in its process, whose engine servers end with it."""

    def __init__(self):
        from metareward.inference.vllm_backend import DIES_WITH_PARENT

        os.environ[DIES_WITH_PARENT] = "1"

    def where(self) -> dict[str, Any]:
        import os

        import ray

        context = ray.get_runtime_context()
        return {"node_id": context.get_node_id(), "node_ip": ray.util.get_node_ip_address(),
                "gpu_ids": [str(gpu) for gpu in ray.get_gpu_ids()],
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}

    def call(self, function: Callable, *args: Any) -> Any:
        return function(*args)

    def shutdown(self) -> None:
        # A vLLM server runs in its own session: killing the actor alone would orphan it on its GPUs.
        from metareward.inference.engines import close_shared_backends

        close_shared_backends()


class ReplicaPool:
    """`replicas` Ray actors of `tensor_parallel_size` GPUs (and `cpus` CPUs) each, placed as one gang. `run` is
    thread-safe: each calling thread (a Prefect task run of a shard) waits for a free replica, runs its job there and
    gives the replica back. Raises PlacementError when the gang is not placed within `placement_timeout_s` (and when a
    replaced replica is not placed again within it), saying what the cluster lacks."""

    def __init__(self, replicas: int, tensor_parallel_size: int = 1, cpus: float = 1.0,
                 placement_timeout_s: float = 600.0, name: str = "metareward"):
        import ray
        from ray.util.placement_group import placement_group

        self.replicas = replicas
        self.placement_timeout_s = placement_timeout_s
        self.bundle = {"GPU": tensor_parallel_size, "CPU": cpus} if tensor_parallel_size else {"CPU": cpus}
        self._actor_class = ray.remote(_ReplicaActor)
        # Named for `ray list placement-groups` (names are unique on a cluster, hence the suffix).
        self._group = placement_group([dict(self.bundle) for _ in range(replicas)], strategy="PACK",
                                      name=f"{name}-{uuid.uuid4().hex[:8]}")
        if not self._group.wait(placement_timeout_s):
            missing = self._missing()
            self._remove_group()
            raise PlacementError(f"{replicas} engine replica(s) of {self.bundle} could not be placed in "
                                 f"{placement_timeout_s:.0f} s: {missing}")
        self._free: queue.Queue[int] = queue.Queue()
        self._lock = threading.Lock()
        self._actors: dict[int, Any] = {}
        self._where: dict[int, Replica] = {}
        self._closed = False
        self.replaced = 0
        """How many replicas died and were replaced."""
        for index in range(replicas):
            self._start(index)
            self._free.put(index)

    def _start(self, index: int) -> None:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        environment = {name: os.environ[name] for name in REPLICA_ENVIRONMENT if name in os.environ}
        actor = self._actor_class.options(
            num_gpus=self.bundle.get("GPU", 0), num_cpus=self.bundle["CPU"], max_concurrency=1,
            runtime_env={"env_vars": environment},
            scheduling_strategy=PlacementGroupSchedulingStrategy(self._group, placement_group_bundle_index=index),
        ).remote()
        self._actors[index] = actor

    def replica(self, index: int) -> Replica:
        """Where replica `index` runs now (asks it once per actor)."""
        import ray

        with self._lock:
            known = self._where.get(index)
            actor = self._actors[index]
        if known is None:
            try:
                where = ray.get(actor.where.remote(), timeout=self.placement_timeout_s)
            except ray.exceptions.GetTimeoutError:
                raise PlacementError(f"replica {index} was not placed again within {self.placement_timeout_s:.0f} "
                                     f"s: {self._missing()}") from None
            known = Replica(index, where["node_id"], where["node_ip"], tuple(where["gpu_ids"]),
                            where["cuda_visible_devices"])
            with self._lock:
                self._where[index] = known
        return known

    def run(self, function: Callable, *args: Any,
            on_requeue: Callable[[str], None] | None = None) -> tuple[Any, Replica]:
        """function(*args) on the next free replica; returns its result and the replica that ran it. When the
        replica dies during the call (its node lost, its process killed, out of memory), the replica is replaced,
        `on_requeue` is told why, and the call runs again on the next free replica, at most MAX_REQUEUES times
        (then ReplicaLostError). An error the function raises itself is raised here as its own type (Ray's
        wrapper removed; the replica's traceback is in the message)."""
        import ray
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayTaskError

        for attempt in range(MAX_REQUEUES + 1):
            index = self._take()
            died = None
            try:
                where = self.replica(index)
                return ray.get(self._actors[index].call.remote(function, *args)), where
            except (ActorDiedError, ActorUnavailableError) as error:
                died = f"{self._where.get(index) or f'replica {index}'} died ({type(error).__name__})"
                self._replace(index)
            except RayTaskError as error:
                cause = getattr(error, "cause", None)
                if isinstance(cause, BaseException):
                    raise cause from error
                raise
            finally:
                self._free.put(index)
            if on_requeue and attempt < MAX_REQUEUES:
                on_requeue(f"{died}; its job runs again on the next free replica (attempt {attempt + 2})")
        raise ReplicaLostError(f"{died}: the job's replicas died {MAX_REQUEUES + 1} times in a row")

    def _take(self) -> int:
        """The next free replica's index; ReplicaLostError once the pool is closed (no caller waits for ever)."""
        while True:
            if self._closed:
                raise ReplicaLostError("the engine replicas were released (the iteration ended or its training "
                                       "began) while this job waited for one")
            try:
                return self._free.get(timeout=1.0)
            except queue.Empty:
                continue

    def _replace(self, index: int) -> None:
        """A new actor in the dead one's bundle (Ray places the bundle again, on another node when its node is gone);
        the dead actor is never called again. Nothing is started once the pool is closed."""
        import ray

        with self._lock:
            dead = self._actors.get(index)
            self._where.pop(index, None)
            if dead is None or self._closed:
                return
            ray.kill(dead, no_restart=True)
            self.replaced += 1
        self._start(index)

    def _missing(self) -> str:
        import ray

        total, available = ray.cluster_resources(), ray.available_resources()
        need = {key: value * self.replicas for key, value in self.bundle.items()}
        has = {key: total.get(key, 0) for key in need}
        free = {key: available.get(key, 0) for key in need}
        return (f"needs {need} in bundles of {self.bundle} (each on one node); the cluster has {has}, of which "
                f"{free} are free now")

    def _remove_group(self) -> None:
        from ray.util.placement_group import remove_placement_group

        remove_placement_group(self._group)

    def close(self) -> None:
        """Stop every replica's engine (vLLM servers included), kill the replicas and release the GPUs; idempotent."""
        import ray

        with self._lock:
            self._closed = True
            actors, self._actors = list(self._actors.values()), {}
        stopping = [actor.shutdown.remote() for actor in actors]
        try:
            ray.get(stopping, timeout=120)  # each replica stops its engine (and its servers) itself
        except Exception:  # a replica already dead has no engine left to stop
            pass
        for actor in actors:
            ray.kill(actor, no_restart=True)
        if actors:
            self._remove_group()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not _released(self._group):
                time.sleep(0.2)


def _released(group) -> bool:
    from ray.util import placement_group_table

    return placement_group_table(group).get("state") == "REMOVED"


def ray_address(orchestration) -> str | None:
    """The Ray cluster the model stages' jobs run on: orchestration.ray_address, else RAY_ADDRESS from the
    environment (read here, where it is used), else None: no Ray."""
    return orchestration.ray_address or os.environ.get("RAY_ADDRESS") or None


def connect(address: str) -> None:
    """Join the Ray cluster at `address` from this process, once (later calls do nothing)."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=False, logging_level="WARNING")


_POOLS: dict[tuple, ReplicaPool] = {}
_POOLS_LOCK = threading.Lock()


def shared_pool(address: str, replicas: int | None, tensor_parallel_size: int, placement_timeout_s: float,
                name: str = "metareward") -> ReplicaPool:
    """The process's pool of engine replicas on the cluster at `address` (connected on first use), created for
    these settings and kept for every later job of them; another pool of this process is closed first (its GPUs
    released). `replicas` None: as many as the cluster's GPUs hold (one on a cluster without GPUs, whose replicas
    then hold a CPU each). Thread-safe."""
    import ray

    key = (address, replicas, tensor_parallel_size)
    with _POOLS_LOCK:
        if key not in _POOLS:
            _close_pools()
            connect(address)
            gpus = int(ray.cluster_resources().get("GPU", 0))
            count = replicas or (max(1, gpus // tensor_parallel_size) if gpus else 1)
            _POOLS[key] = ReplicaPool(count, tensor_parallel_size if gpus else 0,
                                      placement_timeout_s=placement_timeout_s, name=name)
        return _POOLS[key]


def close_shared_pools() -> None:
    """Close the process's replica pools (before training, at the end of an iteration): their GPUs are free when
    this returns."""
    with _POOLS_LOCK:
        _close_pools()


def _close_pools() -> None:
    while _POOLS:
        _, pool = _POOLS.popitem()
        pool.close()
