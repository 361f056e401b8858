"""What a stage's runner gets besides its settings: its input tables, its shard, the iteration, the model M_t."""

from __future__ import annotations

from dataclasses import dataclass, field

import polars as pl

from metareward.artifacts.store import ArtifactStore, TableRef
from metareward.config.campaign import InferenceConfig, OrchestrationConfig
from metareward.training.models import resolve_model


@dataclass(frozen=True)
class ModelRef:
    """A model M_t: where it lives (local folder, s3:// checkpoint, the builtin demo model, a hub id) and its
    content digest (model_id)."""

    uri: str
    model_id: str


@dataclass
class StageContext:
    """One job's view for its runner: which stage, iteration and shard, the model it runs (model stages) or the
    model behind its inputs (model_id), its input tables by stage, where a model it trains goes
    (model_key), the store, and where engines run (`inference`: no field of it that changes outputs is read
    from here — those come hashed, as the runner's `engine` setting)."""

    stage: str
    iteration: int
    shard: int | None
    runs_model: ModelRef | None
    model_id: str | None
    inputs: dict[str, list[TableRef]]
    model_key: str
    store: ArtifactStore
    inference: InferenceConfig
    orchestration: OrchestrationConfig
    checkpoints_key: str
    _local_model: str | None = field(default=None, repr=False)

    @property
    def shard_index(self) -> int:
        """The job's shard (sharded stages only)."""
        if self.shard is None:
            raise ValueError(f"{self.stage} is not sharded")
        return self.shard

    @property
    def model(self) -> ModelRef:
        """M_t (model stages only)."""
        if self.runs_model is None:
            raise ValueError(f"{self.stage} does not run the model")
        return self.runs_model

    def has(self, input_stage: str) -> bool:
        """Whether the job reads a table of input_stage (optional inputs may be absent)."""
        return input_stage in self.inputs

    def table(self, input_stage: str, columns: list[str] | None = None) -> pl.DataFrame:
        """The job's input table of input_stage: its shards concatenated in order, each checked against the
        digest its producer recorded (CorruptArtifactError names the one that does not match)."""
        return self.store.read_tables(self.inputs[input_stage], columns)

    def local_model(self) -> str:
        """M_t as a local folder (an s3:// checkpoint is downloaded once per machine)."""
        if self._local_model is None:
            self._local_model = resolve_model(self.model.uri)
        return self._local_model
