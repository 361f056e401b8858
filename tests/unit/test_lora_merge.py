"""The LoRA adapter merged file by file gives the weights peft's merge_and_unload gives, in float32 and bfloat16,
with rsLoRA, on a base split over several safetensors files; what it cannot merge is a clear error."""

from __future__ import annotations

import json

import pytest

from metareward.training.merge import UnsupportedAdapterError, merge_lora


def _adapter(base, folder, use_rslora=False):
    """A rank-4 LoRA of every linear weight of `base`, its B factors random (peft starts them at zero)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_rslora=use_rslora,
                                      task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)
    model.save_pretrained(folder)
    return folder


def _peft_merged(base, adapter, dtype) -> dict:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=dtype), str(adapter))
    return model.merge_and_unload().state_dict()


def _loaded(folder, dtype) -> dict:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype).state_dict()


@pytest.mark.parametrize("dtype_name, rslora", [("float32", False), ("bfloat16", True)])
def test_merged_file_by_file_equals_peft_merge_and_unload(tiny_model, tmp_path, dtype_name, rslora):
    import torch
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, dtype_name)
    base = tmp_path / "base"  # the tiny model split into several files, as a large model is
    AutoModelForCausalLM.from_pretrained(tiny_model).save_pretrained(base, max_shard_size="60KB")
    assert len(list(base.glob("*.safetensors"))) > 2
    adapter = _adapter(base, tmp_path / "adapter", use_rslora=rslora)
    merged = merge_lora(adapter, base, tmp_path / "merged", dtype)
    assert sorted(p.name for p in merged.glob("*.safetensors")) == sorted(p.name for p in base.glob("*.safetensors"))
    assert json.loads((merged / "config.json").read_text())["dtype"] == dtype_name
    from safetensors.torch import load_file

    written = sum(t.numel() * t.element_size() for f in merged.glob("*.safetensors") for t in load_file(f).values())
    assert json.loads((merged / "model.safetensors.index.json").read_text())["metadata"]["total_size"] == written
    ours, reference = _loaded(merged, dtype), _peft_merged(base, adapter, dtype)
    assert ours.keys() == reference.keys()
    for name in ours:
        assert torch.equal(ours[name], reference[name]), name  # the same bits
    original = _loaded(base, dtype)
    assert not torch.equal(ours["model.layers.0.self_attn.q_proj.weight"],
                           original["model.layers.0.self_attn.q_proj.weight"])  # the adapter did change it


def test_what_cannot_be_merged_file_by_file_is_named(tiny_model, tmp_path):
    adapter = _adapter(tiny_model, tmp_path / "adapter")
    settings = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**settings, "use_dora": True}))
    with pytest.raises(UnsupportedAdapterError, match=r"adapter_config\.json: use_dora — only plain LoRA"):
        merge_lora(adapter, tiny_model, tmp_path / "merged")
    (adapter / "adapter_config.json").write_text(json.dumps({**settings, "rank_pattern": {"q_proj": 8}}))
    with pytest.raises(UnsupportedAdapterError, match=r"rank_pattern — only plain LoRA"):
        merge_lora(adapter, tiny_model, tmp_path / "merged")
    (adapter / "adapter_config.json").write_text(json.dumps(settings))
    from safetensors.torch import load_file, save_file

    factors = load_file(str(adapter / "adapter_model.safetensors"))
    half = next(name for name in factors if name.endswith("lora_B.weight"))
    save_file({n: t for n, t in factors.items() if n != half}, str(adapter / "adapter_model.safetensors"))
    with pytest.raises(UnsupportedAdapterError, match=r"has only one of its two LoRA factors"):
        merge_lora(adapter, tiny_model, tmp_path / "merged")
    assert not (tmp_path / "merged").exists()  # refused before anything was written
    save_file(factors, str(adapter / "adapter_model.safetensors"))
    empty = tmp_path / "no-safetensors"
    empty.mkdir()
    with pytest.raises(UnsupportedAdapterError, match=r"no \*\.safetensors weights"):
        merge_lora(adapter, empty, tmp_path / "merged")
