"""The GPUs a job may use on this machine, as the scheduler that started it gave them (CUDA_VISIBLE_DEVICES), and
how engine replicas are laid out on them."""

from __future__ import annotations

import os


class DeviceError(RuntimeError):
    """Fewer GPUs are visible than the engines ask for; the message names the settings and what is visible."""


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as the ids to put in a child's CUDA_VISIBLE_DEVICES: the entries of the
    CUDA_VISIBLE_DEVICES it inherited (indices or GPU UUIDs, as Slurm, Ray or a shared host set them), else one
    index per device torch sees; [] when CUDA has no device here (a CPU machine, or logical GPUs of a simulated Ray
    cluster)."""
    try:
        import torch

        count = torch.cuda.device_count()
    except ImportError:
        count = 0
    if not count:
        return []
    inherited = os.environ.get("CUDA_VISIBLE_DEVICES")
    if inherited is not None:
        return [device.strip() for device in inherited.split(",") if device.strip() and device.strip() != "-1"]
    return [str(index) for index in range(count)]


def replica_devices(replicas: int | None, tensor_parallel_size: int, visible: list[str]) -> list[list[str]]:
    """The GPUs of each engine replica: `tensor_parallel_size` consecutive ones of `visible` per replica, taken in
    the order they are visible (so a child's CUDA_VISIBLE_DEVICES names physical GPUs as the parent's did, never
    logical index 0 of the host). replicas None: as many as the visible GPUs hold. Without GPUs: one replica on
    the CPU ([[]]), which must then be what was asked. Raises DeviceError naming the settings when the GPUs do not
    suffice."""
    if not visible:
        if (replicas or 1) != 1 or tensor_parallel_size != 1:
            raise DeviceError(f"inference.replicas {replicas} × inference.tensor_parallel_size {tensor_parallel_size} "
                              "need GPUs, and none is visible (CUDA_VISIBLE_DEVICES, torch): vLLM on CPU runs one "
                              "engine; set both to 1")
        return [[]]
    count = replicas if replicas is not None else max(1, len(visible) // tensor_parallel_size)
    if count * tensor_parallel_size > len(visible):
        raise DeviceError(f"inference.replicas {count} × inference.tensor_parallel_size {tensor_parallel_size} = "
                          f"{count * tensor_parallel_size} GPUs, but {len(visible)} are visible "
                          f"(CUDA_VISIBLE_DEVICES={','.join(visible)}): lower one of them")
    return [visible[index * tensor_parallel_size:(index + 1) * tensor_parallel_size] for index in range(count)]
