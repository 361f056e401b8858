"""The premise of `config check`'s host memory at a training's first load (placement.resources.first_load_host_bytes):
every rank loads M_t whole on its host, even a rank other than 0 of an FSDP training with
`fsdp_cpu_ram_efficient_loading` and its process group already up. Should a transformers upgrade load only rank 0's
weights there, this fails: the estimate (and the 70B recipe's refusal it feeds) is then to be revised."""

from __future__ import annotations

import os

import pytest

from metareward.host.ports import free_port

pytestmark = pytest.mark.slow


def loaded_weights(model) -> tuple[int, float]:
    """How many weights the model holds in memory (not on the meta device) and their absolute sum."""
    weights = [p for p in model.parameters() if p.device.type != "meta"]
    return sum(p.numel() for p in weights), float(sum(p.detach().double().abs().sum() for p in weights))


def load_as_rank(rank: int, model_path: str, port: int, sums) -> None:
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    # What `accelerate launch` or a Ray Train gang given deployments/accelerate/fsdp.yaml tells each process.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), ACCELERATE_USE_FSDP="true", FSDP_CPU_RAM_EFFICIENT_LOADING="true")
    dist.init_process_group("gloo", rank=rank, world_size=2)
    sums[rank] = loaded_weights(AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32))
    dist.destroy_process_group()


def test_every_rank_loads_the_whole_model_on_its_host(tiny_model):
    import torch
    import torch.multiprocessing as mp
    from transformers import AutoModelForCausalLM

    expected = loaded_weights(AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32))
    with mp.Manager() as manager:
        sums = manager.dict()
        mp.spawn(load_as_rank, args=(str(tiny_model), free_port(), sums), nprocs=2)
        loaded = dict(sums)
    assert loaded[0] == expected
    assert loaded[1] == expected, ("rank 1 no longer loads the whole model under FSDP's cpu_ram_efficient_loading: "
                                   "revise placement.resources.first_load_host_bytes and the 70B recipe's refusal")
