"""The kept model of a sharded (FSDP2) training written as a plain Hugging Face checkpoint one parameter at a time:
each is gathered from the ranks' shards and rank 0 holds at most one safetensors file's worth of weights, never
the whole model (a 70B model's full state dict is ~141 GB in bf16)."""

from __future__ import annotations

import json
from pathlib import Path

FILE_BYTES = 5 * 10**9
"""Largest safetensors file written (the size the hub's large checkpoints come in; save_pretrained's own default is
50 GB)."""


def save_gathered(model, target: str | Path, is_main: bool, file_bytes: int = FILE_BYTES, dtype=None) -> None:
    """Write `model` — its parameters sharded as DTensors by FSDP2, or whole — into `target` as save_pretrained
    would: model.safetensors, or model-0000i-of-0000n.safetensors files and their index when over file_bytes, plus
    config.json and generation_config.json. Every rank must call it (each gather is a collective); only rank 0
    (is_main) writes. A weight tied to another (the output embedding of a tied-embedding model) is left out, as
    save_pretrained leaves it out. With `dtype` (a torch dtype) floating-point weights are written in it (FSDP
    trains float32 master weights of a bf16 model, which is kept in bf16) and the config says so."""
    from safetensors.torch import save_file

    target = Path(target)
    tied = _tied_names(model)
    files: list[list[str]] = []
    pending: dict = {}
    pending_bytes = total_bytes = 0

    def flush() -> None:
        nonlocal pending, pending_bytes
        if pending:
            save_file(pending, str(target / f"part-{len(files):05d}.safetensors"), metadata={"format": "pt"})
            files.append(list(pending))
        pending, pending_bytes = {}, 0

    if is_main:
        target.mkdir(parents=True, exist_ok=True)
    for name, tensor in model.state_dict().items():
        whole = tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor
        if not is_main or name in tied:
            continue
        whole = whole.detach().to("cpu")
        pending[name] = (whole.to(dtype) if dtype is not None and whole.is_floating_point() else whole).contiguous()
        size = pending[name].numel() * pending[name].element_size()
        pending_bytes, total_bytes = pending_bytes + size, total_bytes + size
        if pending_bytes >= file_bytes:
            flush()
    if not is_main:
        return
    flush()
    _name_files(target, files, total_bytes)
    if dtype is not None:
        model.config.dtype = dtype
    model.config.save_pretrained(target)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(target)


def _name_files(target: Path, files: list[list[str]], total_bytes: int) -> None:
    """Give the written parts save_pretrained's names, with an index when there are several."""
    if len(files) == 1:
        (target / "part-00000.safetensors").rename(target / "model.safetensors")
        return
    weight_map = {}
    for number, names in enumerate(files):
        final = f"model-{number + 1:05d}-of-{len(files):05d}.safetensors"
        (target / f"part-{number:05d}.safetensors").rename(target / final)
        weight_map.update(dict.fromkeys(names, final))
    (target / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total_bytes}, "weight_map": weight_map}, indent=2, sort_keys=True))


def _tied_names(model) -> set[str]:
    """The state-dict names of weights tied to another (None when the model ties none)."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    declared = getattr(model, "_tied_weights_keys", None) or ()
    return set(declared.keys() if isinstance(declared, dict) else declared)
