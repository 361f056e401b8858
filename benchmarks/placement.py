"""Benchmark: a stage's makespan on engine replicas when one replica is slow, shards pulled from a queue (the Ray
replica pool: a free replica takes the next shard) against today's fixed split (each replica gets its block of
shards up front); and what the pool adds to a small stage's jobs.

Runs on Ray's own multi-node simulation (a head and two worker nodes with logical GPUs), no model: a shard's work
is a sleep of a known length, so that the ratio measures the placement alone. One replica of the two is
`--slowdown` times slower (a straggler: a throttled GPU, a noisy neighbour).

Run: python benchmarks/placement.py [--shards 12] [--shard-seconds 0.5] [--slowdown 3]
Targets (issue 20): queue ≥ 1.5× faster than the fixed split with one slow replica; the pool's overhead ≤ 5 % of
a small stage's compute.
"""

from __future__ import annotations

import argparse
import os
import time
from concurrent.futures import ThreadPoolExecutor


def shard_work(seconds: float, slow_pid_file: str, slowdown: float) -> int:
    """A shard: sleeps `seconds`, `slowdown` times longer on the replica whose process claimed the slow role."""
    pid = os.getpid()
    try:
        with open(slow_pid_file, "x") as claimed:
            claimed.write(str(pid))
    except FileExistsError:
        pass
    slow = int(open(slow_pid_file).read() or 0) == pid
    time.sleep(seconds * (slowdown if slow else 1.0))
    return pid


def main() -> None:
    """Print the makespan of the queue and of the fixed split, their ratio, and the pool's overhead per job."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=12)
    parser.add_argument("--shard-seconds", type=float, default=0.5)
    parser.add_argument("--slowdown", type=float, default=3.0)
    arguments = parser.parse_args()

    import tempfile

    import ray
    from ray.cluster_utils import Cluster

    from metareward.placement.replicas import ReplicaPool

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0, "include_dashboard": False})
    for _ in range(2):
        cluster.add_node(num_cpus=2, num_gpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        pool = ReplicaPool(replicas=2, tensor_parallel_size=1, placement_timeout_s=60)
        slow = tempfile.NamedTemporaryFile(delete=False).name
        os.unlink(slow)
        work = (arguments.shard_seconds, slow, arguments.slowdown)
        pool.run(shard_work, *work)  # warm both replicas; the first one to run claims the slow role

        started = time.perf_counter()
        with ThreadPoolExecutor(arguments.shards) as threads:
            list(threads.map(lambda _: pool.run(shard_work, *work), range(arguments.shards)))
        queue_seconds = time.perf_counter() - started

        # Fixed split: each replica gets every other shard up front and runs its block alone.
        actors = [pool._actors[index] for index in range(2)]
        started = time.perf_counter()
        blocks = [[actor.call.remote(shard_work, *work) for _ in range(arguments.shards // 2)] for actor in actors]
        ray.get([reference for block in blocks for reference in block])
        split_seconds = time.perf_counter() - started

        # Overhead: a small stage's jobs through the pool against the same work called directly.
        small = 0.2
        started = time.perf_counter()
        for _ in range(10):
            pool.run(time.sleep, small)
        pooled = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(10):
            time.sleep(small)
        direct = time.perf_counter() - started
        pool.close()
    finally:
        ray.shutdown()
        cluster.shutdown()

    print(f"{arguments.shards} shards of {arguments.shard_seconds} s on 2 replicas, one {arguments.slowdown}× slower")
    print(f"  queue (work stealing): {queue_seconds:.2f} s")
    print(f"  fixed split:           {split_seconds:.2f} s")
    print(f"  queue speed-up: {split_seconds / queue_seconds:.2f}× (target ≥ 1.5×)")
    print(f"pool overhead on 10 jobs of {small} s: {pooled - direct:.3f} s = "
          f"{(pooled - direct) / direct:.1%} of their compute (target ≤ 5 %)")


if __name__ == "__main__":
    main()
