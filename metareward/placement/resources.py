"""GPU memory a campaign needs, estimated per GPU from the model's architecture: DPO and the seed's SFT (weights,
gradients, optimizer states, reference, activations) and inference (weights, KV cache), checked against the GPUs at
hand.

An estimate, not a measurement: it counts the tensors that must be resident and states its assumptions (see
`ASSUMPTIONS`); allocator fragmentation, CUDA graphs and library workspaces are covered by a flat overhead.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

from metareward.config.campaign import CampaignConfig, ConfigError, DPOConfig, TrainingConfig
from metareward.training.sharing import Sharing, read_sharing

GB = 1e9
OVERHEAD_BYTES = 2 * GB
"""CUDA context, allocator fragmentation and library workspaces, per GPU."""

VLLM_MEMORY_SHARE = 0.9
"""vLLM's default gpu_memory_utilization: the share of a GPU an engine takes for weights and KV cache."""

ASSUMPTIONS = (
    "a full fine-tuning holds, per GPU, float32 master weights, gradients and two Adam states (16 bytes a parameter, "
    "as measured under FSDP2 on an H200; in one process or under DDP too, where a bf16 training steps float32 "
    "masters), divided by the number of processes under FSDP or DeepSpeed ZeRO-3, not under DDP",
    "DPO's reference model: a second copy of the weights kept through training when its log-probs are not "
    "precomputed; precomputed, none in one process or under DDP (the policy computes them before its first step), "
    "while under FSDP TRL loads a second copy and wraps it as one FSDP unit, so its precompute gathers the whole "
    "model on each GPU before training (estimated apart); none with LoRA (the adapter disabled is the reference); "
    "SFT has none",
    "activations: every micro-batch of p pairs is 2p sequences of max_length tokens (of p SFT examples, p "
    "sequences); a layer's activations per "
    "token are the norm inputs (and their fp32 upcast), q/k/v, the attention output (memory-efficient "
    "attention: no score matrix) and the MLP's gate, up, activation and product, kept for every layer without "
    "activation checkpointing, and with it (the default) only each layer's input plus one layer's at a time; "
    "logits in the dtype plus fp32 log-softmax and its gradient",
    f"{OVERHEAD_BYTES / GB:.0f} GB per GPU for the CUDA context, fragmentation and workspaces",
    "host memory while a training first loads M_t: every rank on a node holds the whole model on the host "
    "(transformers 5.25 loads it in each process before FSDP shards it), in float32 for a full fine-tuning (its "
    "master weights), else in the training dtype",
    f"vLLM engines take {VLLM_MEMORY_SHARE:.0%} of a GPU (gpu_memory_utilization); weights must leave room for "
    "at least one sequence of max_model_len tokens in the KV cache",
)


@dataclass(frozen=True)
class Architecture:
    """What memory depends on: parameters and the dense decoder's shapes."""

    parameters: int
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    dtype_bytes: int
    source: str

    @property
    def linear_shapes(self) -> list[tuple[int, int]]:
        """(in, out) of each linear layer of one decoder layer (q, k, v, o, gate, up, down): LoRA's targets."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return [(h, q), (h, kv), (h, kv), (q, h), (h, i), (h, i), (i, h)]

    @property
    def master_bytes(self) -> int:
        """Bytes a parameter takes as a full fine-tuning's master weight (and its gradient and each Adam state):
        float32, or the dtype's when wider."""
        return max(4, self.dtype_bytes)


def architecture(model_path: str, model_config: str | None = None, dtype: str = "auto") -> Architecture:
    """The architecture of model_path (a local folder, or a hub id with a config.json in the local Hugging Face
    cache), or of the config.json given as model_config. Parameters are counted exactly from the safetensors
    headers when the weights are there, otherwise from the shapes (a dense decoder: Llama, Mistral, Qwen).
    Raises ConfigError saying how to point at a config.json when none is found offline."""
    source = Path(model_config) if model_config else _config_file(model_path)
    if source is None:
        raise ConfigError(f"model.path {model_path}: no config.json found offline (not a local folder, not in the "
                          "Hugging Face cache): pass --model-config PATH/TO/config.json")
    try:
        config = json.loads(source.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"{source}: not a readable config.json ({error})") from None
    if config.get("num_local_experts") or config.get("num_experts"):
        raise ConfigError(f"{source}: mixture-of-experts models are not estimated (only dense decoders)")
    try:
        hidden, layers, heads = config["hidden_size"], config["num_hidden_layers"], config["num_attention_heads"]
        shapes = dict(hidden=hidden, layers=layers, heads=heads, kv_heads=config.get("num_key_value_heads") or heads,
                      head_dim=config.get("head_dim") or hidden // heads, intermediate=config["intermediate_size"],
                      vocab=config["vocab_size"])
    except KeyError as error:
        raise ConfigError(f"{source}: config.json has no {error.args[0]!r}: "
                          "not a decoder this estimate knows") from None
    torch_dtype = config.get("torch_dtype") or config.get("dtype") or "float32"
    named = torch_dtype if dtype == "auto" else dtype
    dtype_bytes = 4 if named == "float32" else 2
    counted = _safetensors_parameters(source.parent)
    if counted is None:
        counted = _dense_parameters(shapes, bool(config.get("tie_word_embeddings", False)))
    return Architecture(parameters=counted, dtype_bytes=dtype_bytes, source=str(source), **shapes)


def _config_file(model_path: str) -> Path | None:
    from metareward.training.models import BUILTIN_DEMO_MODEL, smollm2_model

    if model_path == BUILTIN_DEMO_MODEL:
        return smollm2_model() / "config.json"
    local = Path(model_path).expanduser() / "config.json"
    if local.is_file():
        return local
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(model_path, "config.json")
    except Exception:  # an id that is not a valid repo name
        return None
    return Path(cached) if isinstance(cached, str) else None


def _safetensors_parameters(folder: Path) -> int | None:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        return None
    total = 0
    for file in files:
        with file.open("rb") as handle:
            header = json.loads(handle.read(struct.unpack("<Q", handle.read(8))[0]))
        for name, tensor in header.items():
            if name != "__metadata__":
                count = 1
                for size in tensor["shape"]:
                    count *= size
                total += count
    return total


def _dense_parameters(shapes: dict, tied: bool) -> int:
    h, i, v = shapes["hidden"], shapes["intermediate"], shapes["vocab"]
    q, kv = shapes["heads"] * shapes["head_dim"], shapes["kv_heads"] * shapes["head_dim"]
    per_layer = h * q + 2 * h * kv + q * h + 3 * h * i + 2 * h
    return shapes["layers"] * per_layer + v * h * (1 if tied else 2) + h


@dataclass
class Estimate:
    """Bytes per GPU by component, for one use of the GPUs (training or inference)."""

    title: str
    gpus: int
    parts: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> float:
        """Bytes per GPU, all components."""
        return sum(self.parts.values())


def training_estimate(arch: Architecture, training: TrainingConfig, label: str,
                      sharded: bool | None = None) -> Estimate:
    """Per-GPU memory of a training with these settings (see ASSUMPTIONS): DPO for a DPOConfig (pairs, a reference
    model), else the seed's SFT (one sequence per example, no reference); `sharded` says whether the processes
    shard the model (None: as training.accelerate_config says — FSDP or ZeRO-3)."""
    preference = isinstance(training, DPOConfig)
    shards = training.num_processes if (_shards_model(training) if sharded is None else sharded) else 1
    w = arch.dtype_bytes
    estimate = Estimate(f"{'DPO' if preference else 'SFT'} {label}: "
                        f"{'LoRA r=' + str(training.lora_rank) if training.lora_rank else 'full fine-tuning'}, "
                        f"{training.num_processes} process(es)" + (f", sharded over {shards}" if shards > 1 else ""),
                        gpus=training.num_processes)
    if training.lora_rank:
        trainable = arch.layers * sum(training.lora_rank * (a + b) for a, b in arch.linear_shapes)
        estimate.parts["weights (frozen)"] = arch.parameters * w / shards
        estimate.parts["LoRA weights, gradients, Adam"] = trainable * w * 4
    else:
        estimate.parts["weights"] = arch.parameters * arch.master_bytes / shards
        estimate.parts["gradients"] = arch.parameters * arch.master_bytes / shards
        estimate.parts["Adam states"] = 2 * arch.parameters * arch.master_bytes / shards
        if preference and not training.precompute_ref_log_probs:
            # Under FSDP TRL wraps the reference as one unit: each of its forwards gathers the whole model.
            whole = shards > 1 and _shared_with_fsdp(training, sharded)
            estimate.parts["reference model"] = arch.parameters * w / (1 if whole else shards)
    tokens = (2 if preference else 1) * training.per_device_batch_size * (training.max_length or 2048)
    h, q, kv = arch.hidden, arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    per_token_layer = w * (2 * h) + 4 * (2 * h) + w * (h + q + 2 * kv + q) + w * (h + 4 * arch.intermediate)
    if training.activation_checkpointing:
        estimate.parts["activations"] = tokens * (arch.layers * w * h + per_token_layer)
    else:
        estimate.parts["activations"] = tokens * arch.layers * per_token_layer
    estimate.parts["logits"] = tokens * arch.vocab * (w + 4 + 4)
    estimate.parts["overhead"] = OVERHEAD_BYTES
    estimate.notes.append(f"micro-batch {training.per_device_batch_size} {'pair' if preference else 'example'}(s) = "
                          f"{tokens} tokens at max_length {training.max_length}; "
                          f"{training.gradient_accumulation_steps} accumulation step(s); activation checkpointing "
                          f"{'on' if training.activation_checkpointing else 'off'}")
    return estimate


def reference_precompute_estimate(arch: Architecture, dpo: DPOConfig, label: str,
                                  sharded: bool | None = None) -> Estimate | None:
    """Per-GPU memory of the reference log-probs' precompute where it needs its own GPU memory: a full fine-tuning
    DPO under FSDP over several processes, where TRL loads the reference as a second model wrapped as one FSDP unit,
    so each GPU gathers the whole model for the forward passes (before the policy is on the GPU). None elsewhere
    (one process and DDP compute them with the policy, DeepSpeed ZeRO-3 with its inference engine over the shards).
    `sharded` True stands for FSDP over all the processes (None: as dpo.accelerate_config says)."""
    full_and_precomputed = not dpo.lora_rank and dpo.precompute_ref_log_probs
    if dpo.num_processes < 2 or not full_and_precomputed or not _shared_with_fsdp(dpo, sharded):
        return None
    w = arch.dtype_bytes
    tokens = 2 * dpo.per_device_batch_size * (dpo.max_length or 2048)
    estimate = Estimate(f"DPO {label}: the reference log-probs' precompute, {dpo.num_processes} process(es)",
                        gpus=dpo.num_processes)
    estimate.parts["reference model, gathered whole"] = arch.parameters * w
    estimate.parts["activations"] = tokens * w * (arch.hidden + 4 * arch.intermediate)  # one layer's, no backward
    estimate.parts["logits"] = tokens * arch.vocab * (w + 4)
    estimate.parts["overhead"] = OVERHEAD_BYTES
    estimate.notes.append("TRL wraps the reference as one FSDP unit: its forward gathers every weight at once")
    return estimate


def first_load_host_bytes(arch: Architecture, training: TrainingConfig, gpus_per_node: int) -> float:
    """Host memory one node needs while the training first loads M_t: every rank on the node loads the whole model
    on the host (transformers 5.25 loads it in each process, before FSDP shards it, even with FSDP's
    cpu_ram_efficient_loading: tests/integration/test_first_load.py), a full fine-tuning's in float32 (its master
    weights: loaded so, or upcast there by FSDP)."""
    ranks = min(training.num_processes, gpus_per_node)
    return ranks * arch.parameters * (arch.dtype_bytes if training.lora_rank else arch.master_bytes)


def inference_estimate(arch: Architecture, config: CampaignConfig) -> Estimate:
    """Per-GPU memory of the inference engine: its share of the weights and of the KV cache of one full-length
    sequence (vllm: inference.replicas engines of inference.tensor_parallel_size GPUs each, which split the
    weights and the KV heads between them; transformers: one batch of full-length sequences on one GPU)."""
    inference = config.inference
    context = inference.max_model_len or 8192
    vllm = inference.backend == "vllm"
    tensor_parallel = inference.tensor_parallel_size if vllm else 1
    # Each GPU of a tensor-parallel group holds its share of the KV heads (a head is replicated, not split, when
    # there are fewer heads than GPUs).
    kv_per_token = 2 * arch.layers * -(-arch.kv_heads // tensor_parallel) * arch.head_dim * arch.dtype_bytes
    engines = (inference.replicas or 1) if vllm else 1
    estimate = Estimate(f"inference ({inference.backend}): {engines} engine(s) of {tensor_parallel} GPU(s)",
                        gpus=engines * tensor_parallel)
    estimate.parts["weights"] = arch.parameters * arch.dtype_bytes / tensor_parallel
    sequences = inference.batch_size if inference.backend == "transformers" else 1
    estimate.parts["KV cache"] = sequences * context * kv_per_token
    estimate.parts["overhead"] = OVERHEAD_BYTES
    estimate.notes.append(f"KV cache {kv_per_token / 2**20:.2f} MiB per token; "
                          + (f"{sequences} sequences" if sequences > 1 else "at least one sequence")
                          + f" of {context} tokens" + ("; vLLM fills the rest of its share with more"
                                                       if inference.backend == "vllm" else ""))
    return estimate


def _sharing(training: TrainingConfig) -> Sharing:
    """The training's accelerate config; ConfigError naming it when it is missing or not one."""
    try:
        return read_sharing(training.accelerate_config, "accelerate_config (of dpo or sft)")
    except (FileNotFoundError, ValueError) as error:
        raise ConfigError(str(error)) from None


def _shared_with_fsdp(training: TrainingConfig, sharded: bool | None = None) -> bool:
    """Whether FSDP shares the model across the training's processes (`sharded` True/False overrides the config)."""
    return sharded if sharded is not None else _sharing(training).distributed_type == "FSDP"


def _shards_model(training: TrainingConfig) -> bool:
    return training.num_processes > 1 and _sharing(training).shards_model


@dataclass(frozen=True)
class TrainingSize:
    """The fewest GPUs of one size that a training fits on, sharded (FSDP) over all of them; None when none of the
    process counts its global batch allows fits."""

    what: str
    gpus: int | None
    per_gpu: float

    def nodes(self, gpus_per_node: int) -> int | None:
        """Nodes of gpus_per_node GPUs those GPUs take."""
        return None if self.gpus is None else -(-self.gpus // gpus_per_node)


def smallest_trainings(arch: Architecture, dpo: DPOConfig, gpu_memory: float, lora_rank: int) -> list[TrainingSize]:
    """How few GPUs of gpu_memory bytes DPO with these settings needs, sharded over all of them: with full
    fine-tuning, and with LoRA of dpo.lora_rank (or lora_rank). Process counts are those that divide the global
    batch into whole micro-batches."""
    sizes = []
    rank_of_lora = dpo.lora_rank or lora_rank
    for what, rank in (("full fine-tuning", None), (f"LoRA r={rank_of_lora}", rank_of_lora)):
        fitting = None
        for processes in range(1, dpo.global_batch_size + 1):
            if dpo.global_batch_size % (dpo.per_device_batch_size * processes):
                continue
            settings = dpo.model_copy(update={"num_processes": processes, "lora_rank": rank})
            estimates = [training_estimate(arch, settings, what, sharded=processes > 1),
                         reference_precompute_estimate(arch, settings, what, sharded=processes > 1)]
            needed = max(estimate.total for estimate in estimates if estimate is not None)
            if needed <= gpu_memory:
                fitting = TrainingSize(what, processes, needed)
                break
        sizes.append(fitting or TrainingSize(what, None, 0.0))
    return sizes


def campaign_estimates(config: CampaignConfig, arch: Architecture) -> list[Estimate]:
    """The inference engines' estimate and, per distinct DPO setting and for the seed's SFT (with an sft section),
    the training's (largest first)."""
    trainings = {}
    for index, iteration in enumerate(config.iterations, start=1):
        key = iteration.dpo.model_dump_json(exclude={"num_epochs", "checkpoint_epoch", "learning_rate", "beta"})
        trainings.setdefault(key, (iteration.dpo, []))[1].append(index)
    labels = {key: "iteration" + ("s " if len(its) > 1 else " ") + ", ".join(map(str, its))
              for key, (_, its) in trainings.items()}
    estimates = [estimate for key, (dpo, _) in trainings.items()
                 for estimate in (training_estimate(arch, dpo, labels[key]),
                                  reference_precompute_estimate(arch, dpo, labels[key])) if estimate is not None]
    if config.sft:
        estimates.append(training_estimate(arch, config.sft.training(), "stage 0 (the seed M_1)"))
    return [inference_estimate(arch, config)] + sorted(estimates, key=lambda e: -e.total)


def visible_gpu_memory() -> list[tuple[str, float]]:
    """(name, memory in bytes) of each CUDA device this process sees; empty without one."""
    try:
        import torch
    except ImportError:
        return []
    if not torch.cuda.is_available():
        return []
    return [(torch.cuda.get_device_name(i), float(torch.cuda.get_device_properties(i).total_memory))
            for i in range(torch.cuda.device_count())]


def problems(estimates: list[Estimate], gpus: list[tuple[str, float]]) -> list[str]:
    """What does not fit on these GPUs: too few of them, or an estimate over a GPU's memory (an inference
    engine's weights over its vLLM share)."""
    found = []
    for estimate in estimates:
        if estimate.gpus > len(gpus):
            found.append(f"{estimate.title}: needs {estimate.gpus} GPU(s), {len(gpus)} visible")
        if not gpus:
            continue
        smallest = min(memory for _, memory in gpus)
        budget = smallest * (VLLM_MEMORY_SHARE if estimate.title.startswith("inference (vllm)") else 1.0)
        if estimate.total > budget:
            found.append(f"{estimate.title}: ≈{estimate.total / GB:.1f} GB per GPU, over the "
                         f"{budget / GB:.1f} GB available on each")
    return found
