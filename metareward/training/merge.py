"""A trained LoRA adapter merged into its base model one safetensors file at a time: the merged checkpoint keeps the
base's file layout, and at most one of the base's files is in memory at once, never the whole base (a 70B base is
~141 GB in bf16, in files of a few GB as the hub ships them)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

ADAPTER_PREFIX = "base_model.model."
"""What peft puts before a base weight's name in a saved adapter."""


class UnsupportedAdapterError(ValueError):
    """An adapter or base this merge does not handle (the message says which setting or file)."""


def merge_lora(adapter: str | Path, base: str | Path, target: str | Path, dtype=None) -> Path:
    """Write `base` with the LoRA `adapter` merged in to `target` and return it. Every weight the adapter trained
    becomes W + scaling · (B @ A) (scaling = lora_alpha / r, or lora_alpha / √r with rsLoRA), computed as peft's
    merge_and_unload computes it: the product in float32, added to the weight in float32, rounded once to the
    weight's dtype. Every other tensor is copied. With `dtype` (a torch dtype) the base's tensors are cast to it
    first and the config says so, as loading the base in that dtype would. The base's file names and index, its
    config and generation config are kept (the index's total size recounted); the tokenizer is not written here.
    Modules the model's class keeps in float32 stay so, as from_pretrained keeps them. Raises UnsupportedAdapterError,
    before anything is written, for an adapter that is not plain LoRA on linear weights (DoRA, biases,
    modules_to_save, per-module ranks or alphas, …), one that trained a weight the base does not hold, or a base
    without safetensors files."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig

    adapter, base, target = Path(adapter), Path(base), Path(target)
    scaling = _scaling(adapter)
    pending = _pairs(load_file(str(adapter / "adapter_model.safetensors")), adapter)
    index_file = base / "model.safetensors.index.json"
    index = json.loads(index_file.read_text()) if index_file.is_file() else None
    files = ([base / name for name in sorted(set(index["weight_map"].values()))] if index
             else sorted(base.glob("*.safetensors")))
    if not files:
        raise UnsupportedAdapterError(f"{base}: no *.safetensors weights to merge the LoRA adapter into (convert the "
                                      "base model's pytorch_model*.bin to safetensors)")
    stored = set()
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            stored.update(handle.keys())
    if set(pending) - stored:
        raise UnsupportedAdapterError(f"{adapter}: the adapter trained {sorted(set(pending) - stored)[:3]}, which no "
                                      f"safetensors file of {base} holds")
    config = AutoConfig.from_pretrained(str(base))
    kept_in_float32 = _kept_in_float32(config) if dtype is not None else set()
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    total_bytes = 0
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata()
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        for name, tensor in tensors.items():
            if dtype is not None and tensor.is_floating_point() and not kept_in_float32 & set(name.split(".")):
                tensor = tensor.to(dtype)
            if name in pending:
                low_a, low_b = pending.pop(name)
                delta = (low_b.to(torch.float32) @ low_a.to(torch.float32)) * scaling
                tensor = (tensor.to(torch.float32) + delta).to(tensor.dtype)
            tensors[name] = tensor.contiguous()
            total_bytes += tensor.numel() * tensor.element_size()
        save_file(tensors, str(target / file.name), metadata=metadata)
        del tensors
    if index:
        index.setdefault("metadata", {})["total_size"] = total_bytes
        (target / index_file.name).write_text(json.dumps(index, indent=2, sort_keys=True))
    if (base / "generation_config.json").is_file():
        shutil.copyfile(base / "generation_config.json", target / "generation_config.json")
    if dtype is not None:
        config.dtype = dtype
    config.save_pretrained(target)
    return target


def _kept_in_float32(config) -> set[str]:
    """The modules the model's class keeps in float32 whatever dtype it is loaded in (as from_pretrained keeps them)."""
    from transformers import AutoModelForCausalLM

    model_class = AutoModelForCausalLM._model_mapping.get(type(config), None)
    return {name for attribute in ("_keep_in_fp32_modules", "_keep_in_fp32_modules_strict")
            for name in (getattr(model_class, attribute, None) or [])}


def _scaling(adapter: Path) -> float:
    """lora_alpha / r (rsLoRA: / √r) from adapter_config.json, after checking the adapter is plain LoRA."""
    settings = json.loads((adapter / "adapter_config.json").read_text())
    unsupported = {"peft_type": settings.get("peft_type") != "LORA", "use_dora": settings.get("use_dora"),
                   "bias": settings.get("bias", "none") != "none", "lora_bias": settings.get("lora_bias"),
                   **{name: settings.get(name) for name in ("modules_to_save", "fan_in_fan_out", "rank_pattern",
                                                            "alpha_pattern", "layer_replication",
                                                            "target_parameters")}}
    named = [setting for setting, present in unsupported.items() if present]
    if named:
        raise UnsupportedAdapterError(f"{adapter}/adapter_config.json: {', '.join(named)} — only plain LoRA on linear "
                                      "weights is merged file by file")
    rank = settings["r"]
    return settings["lora_alpha"] / (math.sqrt(rank) if settings.get("use_rslora") else rank)


def _pairs(factors: dict, adapter: Path) -> dict:
    """{base weight name: (A, B)} from the adapter's tensors; UnsupportedAdapterError for any other tensor."""
    pairs: dict = {}
    for name in factors:
        stem, _, kind = name.removeprefix(ADAPTER_PREFIX).rpartition(".lora_")
        if not name.startswith(ADAPTER_PREFIX) or kind not in ("A.weight", "B.weight"):
            raise UnsupportedAdapterError(f"{adapter}: tensor {name} is not a LoRA factor of a linear weight")
        pairs.setdefault(f"{stem}.weight", {})[kind[0]] = factors[name]
    halves = [weight for weight, both in pairs.items() if len(both) != 2]
    if halves:
        raise UnsupportedAdapterError(f"{adapter}: {halves[0]} has only one of its two LoRA factors")
    return {weight: (both["A"], both["B"]) for weight, both in pairs.items()}
