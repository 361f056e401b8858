"""Engine replicas laid out on the GPUs a job inherited: consecutive tensor-parallel groups, physical ids kept,
too many asked for refused with the settings named; and the CPU's single engine."""

from __future__ import annotations

import pytest

from metareward.host import devices
from metareward.host.devices import DeviceError, replica_devices


def test_replicas_take_consecutive_groups_of_the_inherited_ids():
    # A scheduler gave this job physical GPUs 4-7: every engine lands there, never on GPU 0 of the host.
    assert replica_devices(None, 2, ["4", "5", "6", "7"]) == [["4", "5"], ["6", "7"]]
    assert replica_devices(1, 2, ["4", "5", "6", "7"]) == [["4", "5"]]
    assert replica_devices(None, 1, ["GPU-a", "GPU-b"]) == [["GPU-a"], ["GPU-b"]]


def test_more_gpus_than_visible_are_refused_naming_the_settings():
    with pytest.raises(DeviceError, match=r"inference.replicas 3 × inference.tensor_parallel_size 2 = 6 GPUs, but 4"):
        replica_devices(3, 2, ["0", "1", "2", "3"])
    with pytest.raises(DeviceError, match="tensor_parallel_size 8 = 8 GPUs, but 2 are visible"):
        replica_devices(None, 8, ["0", "1"])


def test_without_gpus_one_engine_runs_on_the_cpu():
    assert replica_devices(None, 1, []) == [[]]
    with pytest.raises(DeviceError, match="none is visible"):
        replica_devices(2, 1, [])


def test_inherited_ids_are_read_only_where_cuda_has_devices(monkeypatch):
    torch = pytest.importorskip("torch")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "6,7")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert devices.visible_gpus() == ["6", "7"]
    # Logical GPUs of a simulated Ray node: Ray sets the variable, but CUDA has no device here.
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert devices.visible_gpus() == []
