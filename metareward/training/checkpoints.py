"""Training checkpoints kept in the artifact store while a training runs, so that a killed, retried or restarted
training resumes from the last complete one — on this machine or on any node of a Ray cluster.

Every save_steps optimizer steps the Trainer writes `checkpoint-{step}` locally (weights, optimizer, scheduler,
trainer state with its log, each rank's RNG state; under FSDP each rank's shard). Each rank uploads the files it
wrote to `{prefix}/checkpoint-{step}/`; once all have, rank 0 writes `complete.json` there and removes the older
steps. A step without `complete.json` (its upload was cut short) is never resumed from; resuming, each node fetches
the step once into a folder its ranks share. Beside the steps, DPO keeps the reference model's log-probabilities of
its training set from before the first step (`reference-log-probs.parquet`): a resumed DPO reads them instead of
running the reference model over every pair again. The stage removes the whole prefix once its job is recorded
(pipeline.jobs.run_job).
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from metareward.artifacts.store import ArtifactStore, open_store

COMPLETE_FILE = "complete.json"
"""Written last into a stored checkpoint, by rank 0, once every rank's files are there."""

REFERENCE_FILE = "reference-log-probs.parquet"
"""The reference log-probabilities of a DPO's training set (ref_chosen_logps, ref_rejected_logps, float32, in the
training set's order, each beside its pair's row hash), kept beside the job's checkpoints."""

_PER_RANK_FILE = re.compile(r"^(?:rng_state_(\d+)\.pth|__(\d+)_\d+\.distcp)$")
_STEP_FOLDER = re.compile(r"/checkpoint-(\d+)/")

log = logging.getLogger(__name__)


def file_rank(name: str) -> int | None:
    """The rank that writes, and alone reads back, a per-rank file of a Trainer checkpoint — its RNG state
    (`rng_state_{rank}.pth`), its shard of a sharded state dict (`__{rank}_0.distcp`) — or None for a file that rank
    0 writes and every rank reads (weights, optimizer, scheduler, trainer state, a single process's rng_state.pth)."""
    match = _PER_RANK_FILE.match(name)
    return None if match is None else int(match.group(1) or match.group(2))


@dataclass(frozen=True)
class CheckpointStore:
    """The checkpoints of one training job: under `prefix` (the job's key + "/checkpoints") in the artifact store at
    `root`. Picklable: a Ray Train worker opens the same store from the environment of the node it runs on."""

    root: str
    prefix: str

    @property
    def store(self) -> ArtifactStore:
        """The artifact store (made once per process)."""
        return open_store(self.root)

    def uri(self, step: int | None = None) -> str:
        """Where the job's checkpoints (or the one of `step`) live."""
        return self.store.uri(self.prefix if step is None else self._key(step))

    def latest(self) -> int | None:
        """The step of the latest complete checkpoint, or None when there is none."""
        return max((step for step, key in self._stored() if key.endswith("/" + COMPLETE_FILE)), default=None)

    def fetch(self, step: int) -> Path:
        """The checkpoint of `step` in this node's local copy, downloaded once per node: every file of it, since a
        rank of a sharded checkpoint reads values that torch's planner stored in other ranks' files. The ranks of
        one node share the copy (a lock file orders them; a file already there is not fetched again). Remove it
        with drop_local once every rank of the node has loaded it."""
        target = self.local_folder() / f"checkpoint-{step}"
        target.mkdir(parents=True, exist_ok=True)
        prefix = self._key(step)
        with open(target.parent / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            for key in self.store.list(prefix):
                local = target / key[len(prefix) + 1:]
                if key.rsplit("/", 1)[1] != COMPLETE_FILE and not local.exists():
                    self.store.get_file(key, local)
        return target

    def local_folder(self) -> Path:
        """This node's folder for the job's fetched checkpoints (the same path for every rank on the node)."""
        digest = hashlib.blake2b(self.uri().encode(), digest_size=8).hexdigest()
        return Path(tempfile.gettempdir()) / "metareward-checkpoints" / digest

    def drop_local(self) -> None:
        """Remove this node's fetched copies (once the training no longer reads them)."""
        shutil.rmtree(self.local_folder(), ignore_errors=True)

    def upload(self, folder: str | Path, step: int, rank: int) -> None:
        """Upload the files of a local checkpoint folder that rank `rank` wrote (rank 0: also the shared ones)."""
        folder = Path(folder)
        for file in sorted(p for p in folder.rglob("*") if p.is_file()):
            owner = file_rank(file.name)
            if owner == rank or (owner is None and rank == 0):
                self.store.put_file(file, f"{self._key(step)}/{file.relative_to(folder).as_posix()}")

    def mark_complete(self, step: int, world_size: int) -> None:
        """Mark the checkpoint of `step` complete (after every rank's upload; complete.json records the step and the
        ranks that wrote it), then remove every other step, complete or cut short."""
        self.store.write_json(f"{self._key(step)}/{COMPLETE_FILE}", {"step": step, "world_size": world_size})
        for older in self._steps() - {step}:
            self.store.delete_prefix(self._key(older))
        log.info("checkpoint of step %d kept at %s", step, self.uri(step))

    def read_reference(self, pair_hashes: list[int]) -> pl.DataFrame | None:
        """The kept reference log-probabilities when they were computed for these pairs in this order (the training
        set's row hashes, kept beside them), else None: none kept yet, or kept for other pairs."""
        key = f"{self.prefix}/{REFERENCE_FILE}"
        if not self.store.exists(key):
            return None
        kept = self.store.read_table(key)
        if kept["pair_hash"].to_list() != list(pair_hashes):
            log.warning("reference log-probs at %s are for other pairs (%d kept, %d now): computed again",
                        self.store.uri(key), kept.height, len(pair_hashes))
            return None
        return kept

    def keep_reference(self, chosen: list[float], rejected: list[float], pair_hashes: list[int]) -> None:
        """Keep the reference log-probabilities of the training set with its row hashes (rank 0, before the first
        step)."""
        self.store.write_table(f"{self.prefix}/{REFERENCE_FILE}", pl.DataFrame(
            {"pair_hash": pair_hashes, "ref_chosen_logps": chosen, "ref_rejected_logps": rejected},
            schema={"pair_hash": pl.UInt64, "ref_chosen_logps": pl.Float32, "ref_rejected_logps": pl.Float32}))

    def clear(self) -> None:
        """Remove every checkpoint of the job (its kept model is written)."""
        self.store.delete_prefix(self.prefix)

    def _steps(self) -> set[int]:
        return {step for step, _ in self._stored()}

    def _stored(self) -> list[tuple[int, str]]:
        """(step, key) of every stored file, at any depth of its checkpoint folder."""
        return [(int(match.group(1)), key) for key in self.store.list(self.prefix)
                if (match := _STEP_FOLDER.search(key))]

    def _key(self, step: int) -> str:
        return f"{self.prefix}/checkpoint-{step}"


def uploading_callback(checkpoints: CheckpointStore):
    """A TrainerCallback that, after each checkpoint the Trainer saves, has every rank upload its files, then rank 0
    mark the step complete (barriers around the uploads: a Trainer's ranks reach on_save without waiting for
    each other)."""
    from transformers import TrainerCallback

    class UploadCheckpoints(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            _barrier()
            checkpoints.upload(folder, state.global_step, args.process_index)
            _barrier()
            if args.process_index == 0:
                checkpoints.mark_complete(state.global_step, args.world_size)
            return control

    return UploadCheckpoints()


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
