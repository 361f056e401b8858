"""The accelerate config read once for every use: whether it shards the model, DeepSpeed, and clear errors."""

from __future__ import annotations

import pytest

from metareward.training.sharing import read_sharing
from tests.conftest import REPO


def test_the_shipped_configs_say_how_they_share_the_model():
    shipped = REPO / "deployments" / "accelerate"
    assert read_sharing(shipped / "fsdp.yaml").shards_model
    assert read_sharing(shipped / "fsdp-sharded.yaml").shards_model
    zero3 = read_sharing(shipped / "deepspeed-zero3.yaml")
    assert zero3.deepspeed and zero3.shards_model
    ddp = read_sharing(shipped / "ddp.yaml")
    assert ddp.distributed_type == "MULTI_GPU" and not ddp.shards_model and not ddp.deepspeed


def test_a_missing_or_malformed_file_is_named_with_its_setting(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"dpo\.accelerate_config .*nowhere\.yaml does not exist"):
        read_sharing(tmp_path / "nowhere.yaml", "dpo.accelerate_config")
    (tmp_path / "list.yaml").write_text("- FSDP\n")
    with pytest.raises(ValueError, match=r"list\.yaml: not an accelerate config"):
        read_sharing(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("distributed_type: [FSDP\n")
    with pytest.raises(ValueError, match=r"broken\.yaml: not YAML"):
        read_sharing(tmp_path / "broken.yaml")
