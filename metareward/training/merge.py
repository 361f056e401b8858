"""A trained LoRA adapter merged into its base model one safetensors file at a time: the merged checkpoint keeps the
base's file layout, and at most one of the base's files (≤ 5 GB as save_pretrained writes them) is in memory at once,
never the whole base (a 70B base is ~141 GB in bf16)."""

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
    config and generation config are kept; the tokenizer is not written here. Raises UnsupportedAdapterError for an
    adapter that is not plain LoRA on linear weights (DoRA, biases, modules_to_save), or a base without safetensors
    files."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig

    adapter, base, target = Path(adapter), Path(base), Path(target)
    scaling = _scaling(adapter)
    factors = load_file(str(adapter / "adapter_model.safetensors"))
    pending = _pairs(factors, adapter)
    files = sorted(base.glob("*.safetensors"))
    if not files:
        raise UnsupportedAdapterError(f"{base}: no *.safetensors weights to merge the LoRA adapter into (convert the "
                                      "base model's pytorch_model*.bin to safetensors)")
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata()
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        for name, tensor in tensors.items():
            if dtype is not None and tensor.is_floating_point():
                tensor = tensor.to(dtype)
            if name in pending:
                low_a, low_b = pending.pop(name)
                delta = (low_b.to(torch.float32) @ low_a.to(torch.float32)) * scaling
                tensor = (tensor.to(torch.float32) + delta).to(tensor.dtype)
            tensors[name] = tensor.contiguous()
        save_file(tensors, str(target / file.name), metadata=metadata)
        del tensors
    if pending:
        raise UnsupportedAdapterError(f"{adapter}: the adapter trained {sorted(pending)[:3]}…, which no safetensors "
                                      f"file of {base} holds")
    for name in ("model.safetensors.index.json", "generation_config.json"):
        if (base / name).is_file():
            shutil.copyfile(base / name, target / name)
    config = AutoConfig.from_pretrained(str(base))
    if dtype is not None:
        config.dtype = dtype
    config.save_pretrained(target)
    return target


def _scaling(adapter: Path) -> float:
    """lora_alpha / r (rsLoRA: / √r) from adapter_config.json, after checking the adapter is plain LoRA."""
    settings = json.loads((adapter / "adapter_config.json").read_text())
    unsupported = {"peft_type": settings.get("peft_type") != "LORA", "use_dora": settings.get("use_dora"),
                   "bias": settings.get("bias", "none") != "none", "lora_bias": settings.get("lora_bias"),
                   "modules_to_save": settings.get("modules_to_save"),
                   "fan_in_fan_out": settings.get("fan_in_fan_out")}
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
    return {weight: (both["A"], both["B"]) for weight, both in pairs.items()}
