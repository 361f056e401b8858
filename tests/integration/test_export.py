"""The kept model of a sharded training: two gloo ranks shard the tiny model with FSDP2 (fully_shard, as accelerate
does on GPUs) and write it one gathered parameter at a time; the folder loads with from_pretrained and holds the
weights save_pretrained writes, in one file or in several with their index."""

from __future__ import annotations

import os

import pytest

from metareward.host.ports import free_port

pytestmark = pytest.mark.slow


def export_sharded(rank: int, model_path: str, target: str, file_bytes: int, port: int, dtype: str | None) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    from metareward.training.export import save_gathered

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    mesh = init_device_mesh("cpu", (2,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert any(hasattr(t, "full_tensor") for t in model.state_dict().values())  # sharded, not whole
    save_gathered(model, target, is_main=rank == 0, file_bytes=file_bytes,
                  dtype=getattr(torch, dtype) if dtype else None)
    dist.destroy_process_group()


@pytest.mark.parametrize("file_bytes, dtype", [(10**12, None), (200_000, None), (10**12, "bfloat16")])
def test_a_sharded_model_is_written_as_save_pretrained_writes_it(tmp_path, tiny_model, file_bytes, dtype):
    """bfloat16: float32 weights (FSDP's master weights of a bf16 training) are written in the model's dtype."""
    import json

    import torch
    import torch.multiprocessing as mp
    from transformers import AutoModelForCausalLM

    target = tmp_path / "gathered"
    mp.spawn(export_sharded, args=(str(tiny_model), str(target), file_bytes, free_port(), dtype), nprocs=2)
    if dtype:
        assert json.loads((target / "config.json").read_text())["dtype"] == dtype
    files = sorted(p.name for p in target.glob("*.safetensors"))
    if file_bytes > 10**9:
        assert files == ["model.safetensors"]
    else:
        assert len(files) > 1 and (target / "model.safetensors.index.json").is_file()
    kept = getattr(torch, dtype) if dtype else torch.float32
    original = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).to(kept)
    reloaded = AutoModelForCausalLM.from_pretrained(target, dtype="auto")
    expected, written = original.state_dict(), reloaded.state_dict()
    assert expected.keys() == written.keys()
    for name in expected:
        assert torch.equal(expected[name], written[name]), name
    original.save_pretrained(tmp_path / "plain")
    from safetensors import safe_open

    def stored_names(folder):
        names = set()
        for file in folder.glob("*.safetensors"):
            with safe_open(str(file), "pt") as handle:
                names |= set(handle.keys())
        return names

    assert stored_names(target) == stored_names(tmp_path / "plain")  # a tied weight left out as save_pretrained does
