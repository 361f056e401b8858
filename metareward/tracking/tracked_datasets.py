"""Stage tables as MLflow datasets: name, digest, source (their URI in the artifact store), schema and profile,
logged as a run's inputs with the context of their stage (generation, evaluation, training)."""

from __future__ import annotations

import hashlib
import json
import warnings
from typing import Any

import polars as pl

from metareward.artifacts.store import ArtifactStore
from metareward.pipeline.stages import stage


def stage_dataset(campaign: str, store: ArtifactStore, manifest: dict) -> dict[str, Any]:
    """A stage's table as a dataset: "{campaign}/iter-{t}/{stage}", the Parquet digest and URI of a table in one
    shard (of a sharded one: the digest of its shards' digests and the URI of its manifest), rows, shards,
    context and schema."""
    shards = [shard for _, shard in sorted(manifest["shards"].items())]
    if len(shards) == 1:
        source, digest = shards[0]["uri"], shards[0]["digest"]
    else:
        source = store.uri(manifest["key"])
        digest = hashlib.blake2b("".join(s["digest"] for s in shards).encode(), digest_size=8).hexdigest()
    entry = stage(manifest["stage"])
    return {"name": f"{campaign}/iter-{manifest['iteration']}/{manifest['stage']}", "digest": digest,
            "source": source, "rows": manifest["rows"], "shards": len(shards), "context": entry.dataset_context,
            "schema": entry.schema}


def log_datasets(client, run_id: str, datasets: dict[str, dict[str, Any]]) -> None:
    """Log the datasets (stage_dataset's dicts, or any with the same keys) as the run's inputs."""
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import Dataset, DatasetInput, InputTag

    inputs = []
    for dataset in datasets.values():
        with warnings.catch_warnings():  # local paths match MLflow's local source twice; it picks either
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(dataset["source"])
        meta = MetaDataset(source, name=dataset["name"], digest=dataset["digest"],
                           schema=mlflow_schema(dataset["schema"]))
        fields = meta.to_dict()
        fields["profile"] = json.dumps({"num_rows": dataset["rows"], "shards": dataset["shards"]})
        inputs.append(DatasetInput(Dataset(**fields), tags=[InputTag("mlflow.data.context", dataset["context"])]))
    client.log_inputs(run_id, datasets=inputs)


def mlflow_schema(schema: pl.Schema):
    """A Parquet table's schema as MLflow's (lists as arrays, structs as objects)."""
    from mlflow.types import ColSpec, Schema

    return Schema([ColSpec(_mlflow_type(dtype), name) for name, dtype in schema.items()])


def _mlflow_type(dtype: pl.DataType):
    from mlflow.types import DataType
    from mlflow.types.schema import Array, Object, Property

    if isinstance(dtype, pl.List):
        return Array(_mlflow_type(dtype.inner))
    if isinstance(dtype, pl.Struct):
        return Object([Property(field.name, _mlflow_type(field.dtype)) for field in dtype.fields])
    if dtype in (pl.Int32, pl.Int16, pl.Int8):
        return DataType.integer
    if dtype in (pl.Int64, pl.UInt32, pl.UInt64):
        return DataType.long
    if dtype in (pl.Float32, pl.Float64):
        return DataType.double
    if dtype == pl.Boolean:
        return DataType.boolean
    return DataType.string
