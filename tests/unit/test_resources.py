"""GPU memory estimates: parameters counted exactly, each component by hand, the shipped configs' headers true."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cli import main
from metareward.config.campaign import CampaignConfig, DPOConfig, SFTConfig
from metareward.placement.resources import (
    GB,
    OVERHEAD_BYTES,
    architecture,
    campaign_estimates,
    inference_estimate,
    problems,
    reference_precompute_estimate,
    training_estimate,
)

REPO = Path(__file__).resolve().parents[2]
LLAMA = REPO / "deployments" / "architectures" / "Meta-Llama-3-8B-Instruct.json"
LLAMA_70B = REPO / "deployments" / "architectures" / "Meta-Llama-3-70B-Instruct.json"


def test_llama_3_8b_and_70b_have_their_published_parameter_counts():
    arch = architecture("meta-llama/Meta-Llama-3-8B-Instruct", str(LLAMA))
    assert arch.parameters == 8_030_261_248 and arch.dtype_bytes == 2
    assert architecture("meta-llama/Meta-Llama-3-70B-Instruct", str(LLAMA_70B)).parameters == 70_553_706_496


def test_config_check_says_how_many_gpus_and_nodes_a_training_needs(capsys):
    path = REPO / "deployments" / "configs" / "paper-llama3-70b.yaml"
    main(["config", "check", str(path), "--model-config", str(LLAMA_70B), "--gpus", "32", "--gpus-per-node", "8"])
    out = capsys.readouterr().out
    # TRL's reference precompute gathers the whole 70B model on each GPU: full fine-tuning fits no 80 GB GPU count.
    assert "training, full fine-tuning: does not fit GPUs of 80 GB at global_batch_size 32" in out
    assert "training, LoRA r=64: ≥ 4 GPU(s) of 80 GB" in out
    main(["config", "check", str(path), "--model-config", str(LLAMA_70B), "--gpus", "32", "--gpu-memory", "192"])
    assert "training, full fine-tuning: ≥ 8 GPU(s) of 192 GB (≈155.4 GB each, sharded), 1 node(s) of 8" in \
        capsys.readouterr().out
    # The training itself: 32 sharded processes fit 80 GB and 16 do not (float32 master weights, gradients and Adam
    # states: 16 bytes a parameter over the processes); the precompute needs the whole model whatever the count.
    config = CampaignConfig.from_yaml(path)
    arch = architecture("x", str(LLAMA_70B))
    for processes, fits in ((16, False), (32, True)):
        dpo = config.iterations[0].dpo.model_copy(update={"num_processes": processes})
        assert (training_estimate(arch, dpo, "n", sharded=True).total <= 80 * GB) is fits
        assert reference_precompute_estimate(arch, dpo, "n", sharded=True).parts[
            "reference model, gathered whole"] == arch.parameters * 2


def test_parameters_are_counted_from_the_safetensors_when_the_weights_are_there(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    arch = architecture(str(tiny_model))
    assert arch.parameters == model.num_parameters()  # tied embeddings counted once, as stored
    assert arch.dtype_bytes == 4


def test_components_by_hand():
    arch = architecture("x", str(LLAMA), "bfloat16")
    p, w = arch.parameters, 2
    single = training_estimate(arch, DPOConfig(per_device_batch_size=1, max_length=1024), "one")
    tokens = 2 * 1 * 1024
    h, i = 4096, 14336
    per_token_layer = w * 2 * h + 4 * 2 * h + w * (h + 4096 + 2 * 1024 + 4096) + w * (h + 4 * i)
    # Float32 master weights, gradients and Adam states (16 bytes a parameter) for a bf16 full fine-tuning; with the
    # reference log-probs precomputed (the default), the policy computes them in one process: no second copy.
    assert single.parts == {"weights": p * 4, "gradients": p * 4, "Adam states": 2 * p * 4,
                            "activations": tokens * (32 * w * h + per_token_layer),
                            "logits": tokens * 128256 * (w + 8), "overhead": OVERHEAD_BYTES}
    assert reference_precompute_estimate(arch, DPOConfig(per_device_batch_size=1), "one") is None
    kept_reference = training_estimate(arch, DPOConfig(per_device_batch_size=1, max_length=1024,
                                                       precompute_ref_log_probs=False), "kept reference")
    assert kept_reference.parts["reference model"] == p * w
    # Without activation checkpointing every layer keeps all its activations for the backward pass.
    kept = training_estimate(arch, DPOConfig(per_device_batch_size=1, max_length=1024,
                                             activation_checkpointing=False), "kept")
    assert kept.parts["activations"] == tokens * 32 * per_token_layer
    fsdp_settings = DPOConfig(per_device_batch_size=1, max_length=1024, num_processes=8, global_batch_size=32)
    fsdp = training_estimate(arch, fsdp_settings, "fsdp")
    # Sharded: float32 master weights, gradients and Adam states over the 8 processes (measured under FSDP2).
    assert fsdp.parts["weights"] == fsdp.parts["gradients"] == p * 4 / 8 and fsdp.parts["Adam states"] == p * 8 / 8
    assert fsdp.parts["activations"] == single.parts["activations"]
    assert reference_precompute_estimate(arch, fsdp_settings, "fsdp").parts["reference model, gathered whole"] == p * w
    # Not precomputed under FSDP: TRL's one-unit reference gathers the whole model at every forward.
    unprecomputed = training_estimate(arch, fsdp_settings.model_copy(update={"precompute_ref_log_probs": False}), "f")
    assert unprecomputed.parts["reference model"] == p * w
    # DeepSpeed ZeRO-3 precomputes with its inference engine over the shards: no whole-model gather.
    zero3 = fsdp_settings.model_copy(update={"accelerate_config": str(REPO / "deployments/accelerate/"
                                                                            "deepspeed-zero3.yaml")})
    assert reference_precompute_estimate(arch, zero3, "zero3") is None
    ddp = training_estimate(arch, DPOConfig(per_device_batch_size=1, num_processes=8, global_batch_size=32,
                                            accelerate_config=str(REPO / "deployments/accelerate/ddp.yaml")), "ddp")
    assert ddp.parts["weights"] == p * 4  # not sharded under DDP
    lora = training_estimate(arch, DPOConfig(per_device_batch_size=1, max_length=1024, lora_rank=8), "lora")
    assert "reference model" not in lora.parts and "gradients" not in lora.parts
    assert lora.parts["LoRA weights, gradients, Adam"] == 32 * 8 * sum(a + b for a, b in arch.linear_shapes) * w * 4


def test_sft_holds_one_sequence_per_example_and_no_reference():
    arch = architecture("x", str(LLAMA), "bfloat16")
    settings = dict(per_device_batch_size=1, max_length=1024)
    dpo = training_estimate(arch, DPOConfig(**settings), "dpo")
    sft = training_estimate(arch, SFTConfig(path="eft.jsonl", **settings).training(), "sft")
    assert sft.title.startswith("SFT sft: full fine-tuning") and "reference model" not in sft.parts
    assert sft.parts["activations"] == dpo.parts["activations"] / 2 and sft.parts["logits"] == dpo.parts["logits"] / 2
    assert {name: sft.parts[name] for name in ("weights", "gradients", "Adam states")} == {
        name: dpo.parts[name] for name in ("weights", "gradients", "Adam states")}
    lora = training_estimate(arch, SFTConfig(path="eft.jsonl", lora_rank=64, **settings).training(), "sft")
    assert lora.parts["weights (frozen)"] == arch.parameters * 2 and "gradients" not in lora.parts


def test_tensor_parallel_engines_split_the_weights_and_the_kv_heads():
    arch = architecture("x", str(LLAMA), "bfloat16")  # 8 KV heads of 128, 32 layers
    config = CampaignConfig.from_yaml(REPO / "deployments" / "configs" / "paper-llama3-8b.yaml")

    def engine(replicas, tensor_parallel_size):
        inference = config.inference.model_copy(update={"replicas": replicas,
                                                         "tensor_parallel_size": tensor_parallel_size})
        return inference_estimate(arch, config.model_copy(update={"inference": inference}))

    one, four = engine(8, 1), engine(2, 4)
    assert (one.gpus, four.gpus) == (8, 8)
    assert four.parts["weights"] == one.parts["weights"] / 4 == arch.parameters * 2 / 4
    assert four.parts["KV cache"] == one.parts["KV cache"] / 4
    # 16 GPUs for 8 KV heads: each GPU still holds a whole head.
    assert engine(1, 16).parts["KV cache"] == one.parts["KV cache"] / 8


@pytest.mark.parametrize("name,gpus,architecture_file", [("paper-llama3-8b", 8, LLAMA),
                                                          ("paper-llama3-8b-1gpu", 1, LLAMA),
                                                          ("paper-llama3-70b", 32, LLAMA_70B)])
def test_shipped_paper_configs_fit_and_their_headers_say_what_the_check_prints(name, gpus, architecture_file, capsys):
    """The 8B recipes fit their GPUs and a GPU node's host memory (960 GB: the 960 GiB pod of
    infra/kubernetes/raycluster.yaml less its /dev/shm and object store); the 70B recipe does not yet, and its header
    says so: its reference precompute gathers the whole model on each GPU and its first load holds the whole model
    on the host once per rank."""
    path = REPO / "deployments" / "configs" / f"{name}.yaml"
    fits = name != "paper-llama3-70b"
    assert main(["config", "check", str(path), "--model-config", str(architecture_file), "--gpus", str(gpus),
                 "--host-memory", "960"]) == (0 if fits else 1)
    out = capsys.readouterr().out
    warnings = re.findall(r"^warning: (.*)$", out, flags=re.MULTILINE)
    if fits:
        assert not warnings
    else:
        assert len(warnings) == 2 and "the reference log-probs' precompute" in warnings[0], warnings
        assert "the first load needs ≈ 2258 GB of host memory per node, over the 960 GB given" in warnings[1]
    dpo = float(re.search(r"DPO iterations 1, 2, 3, 4.*\n    per GPU ≈ ([\d.]+) GB", out).group(1))
    needed = re.search(r"needs (\d+) GPU\(s\) with ≥ (\d+) GB each", out)
    host = re.search(r"host memory, DPO: ≈ (\d+) GB per node", out).group(1)
    header = path.read_text().split("\nname:")[0]
    assert f"≈ {dpo:.1f} GB" in header
    assert f"needs {needed.group(1)} GPU" in header and f"≥ {needed.group(2)} GB" in header
    assert int(needed.group(1)) == gpus
    assert gpus == 1 or f"≈ {host} GB" in header
    config = CampaignConfig.from_yaml(path)
    # The seed's SFT (stage 0) is estimated too, where the config runs it, and its header says what it needs.
    sft = re.search(r"SFT stage 0 \(the seed M_1\).*\n    per GPU ≈ ([\d.]+) GB", out)
    assert (sft is not None) == (config.sft is not None)
    assert sft is None or f"≈ {float(sft.group(1)):.1f} GB" in header
    # The paper's judge saturates in later iterations: a person decides, and an unattended schedule keeps M_t.
    assert (config.health.action, config.health.on_timeout) == ("ask", "keep_model")
    assert all(it.dpo.num_processes == gpus for it in config.iterations)


def test_too_few_or_too_small_gpus_are_warned_about(capsys):
    path = REPO / "deployments" / "configs" / "paper-llama3-8b.yaml"
    assert main(["config", "check", str(path), "--model-config", str(LLAMA), "--gpus", "4"]) == 1
    assert "warning: DPO iterations 1, 2, 3, 4: full fine-tuning, 8 process(es), sharded over 8: needs 8 GPU(s), " \
           "4 visible" in capsys.readouterr().out
    config = CampaignConfig.from_yaml(path)
    estimates = campaign_estimates(config, architecture("x", str(LLAMA)))
    # Without activation checkpointing DPO keeps every layer's activations: ≈ 49.6 GB a GPU.
    unchecked = config.model_copy(update={"iterations": [
        it.model_copy(update={"dpo": it.dpo.model_copy(update={"activation_checkpointing": False})})
        for it in config.iterations]})
    small = problems(campaign_estimates(unchecked, architecture("x", str(LLAMA))), [("a", 24 * GB)] * 8)
    assert any(problem.startswith("DPO") and "over the 24.0 GB available" in problem for problem in small)
    assert not any(problem.startswith("inference") for problem in small)  # 19.1 GB fits 90 % of 24 GB
    tiny = problems(estimates, [("a", 16 * GB)] * 8)
    assert any(problem.startswith("inference (vllm)") and "over the 14.4 GB available" in problem for problem in tiny)
