"""How a training's processes share the model, as its accelerate config (deployments/accelerate/*.yaml) says: read in
one place for `accelerate launch`, a Ray Train gang and the memory estimate."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml


@dataclass(frozen=True)
class Sharing:
    """An accelerate config file and what it holds."""

    path: Path
    settings: dict

    @property
    def distributed_type(self) -> str:
        """accelerate's distributed_type: FSDP, DEEPSPEED, MULTI_GPU (DDP), NO, …"""
        return str(self.settings.get("distributed_type", "NO"))

    @property
    def deepspeed(self) -> bool:
        """Whether DeepSpeed shares the model (it runs under `accelerate launch` only, never in a Ray Train gang)."""
        return self.distributed_type == "DEEPSPEED"

    @property
    def shards_model(self) -> bool:
        """Whether each process holds a share of the model's weights (FSDP, DeepSpeed ZeRO-3) rather than all of it."""
        if self.distributed_type == "FSDP":
            return True
        return self.deepspeed and (self.settings.get("deepspeed_config") or {}).get("zero_stage") == 3


def read_sharing(path: str | Path, setting: str = "accelerate_config") -> Sharing:
    """The accelerate config at `path`. Raises FileNotFoundError, naming `setting` and the file, when it does not
    exist, and ValueError when it is not a YAML mapping."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{setting} {path} does not exist (see deployments/accelerate/)")
    try:
        settings = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"{setting} {path}: not YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(settings, dict):
        raise ValueError(f"{setting} {path}: not an accelerate config (a YAML mapping of its settings)")
    return Sharing(path, settings)
