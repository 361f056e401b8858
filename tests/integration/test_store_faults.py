"""A local artifact root whose disk fills up mid-write (a real, small tmpfs): nothing half-written is left, the error
names the file and the bytes it needed, and a run after freeing space goes on from the last finished shard."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from metareward.artifacts.stats import StageStats
from metareward.artifacts.store import ArtifactStore, StoreFullError
from metareward.pipeline.jobs import Job, complete, finished
from tests.integration.campaigns import cli_environment, run_cli, start_cli, write_config

REPO = Path(__file__).resolve().parents[2]
PAGE = 4096


@contextmanager
def small_disk(folder: Path, size: int) -> Iterator[bool]:
    """A tmpfs of `size` bytes mounted on folder while the block runs; yields False (nothing mounted) where this
    process may not mount (not root)."""
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True).returncode == 0
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", str(folder)], check=True)


def fill(disk: Path, leave: int) -> Path:
    """A filler file that leaves exactly `leave` bytes (a whole number of pages) free on the tmpfs at disk."""
    filler = disk / "filler"
    filler.write_bytes(bytes(shutil.disk_usage(disk).free - leave))
    assert shutil.disk_usage(disk).free == leave  # the fault is in place before the write that meets it
    return filler


def test_a_full_disk_mid_write_leaves_nothing_half_written_and_a_rerun_goes_on(tmp_path):
    disk, scratch = tmp_path / "disk", tmp_path / "scratch"
    disk.mkdir()
    scratch.mkdir()
    with small_disk(disk, 1 << 20) as mounted:
        if mounted:  # root, as on the CI machine
            full_disk_scenario(disk, scratch)
            return
    # Not root: a user namespace may mount a tmpfs, seen only by the processes inside it.
    inside = ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
              f'mount -t tmpfs -o size={1 << 20} tmpfs "$1" && shift && exec "$@"', "sh", str(disk)]
    if subprocess.run([*inside, "true"], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs: not root, and no user namespace (unshare --user --map-root-user)")
    scenario = f"from {__name__} import full_disk_scenario; full_disk_scenario({str(disk)!r}, {str(scratch)!r})"
    result = subprocess.run([*inside, sys.executable, "-c", scenario], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def full_disk_scenario(disk: str | Path, scratch: str | Path) -> None:
    """Two shards finish on the 1 MiB disk `disk`; a filler leaves half of what the third shard's table needs, so
    its write starts and cannot finish; then the filler goes and the jobs run again. `scratch` is on another disk."""
    disk, scratch = Path(disk), Path(scratch)
    store = ArtifactStore(str(disk))
    jobs = [shard_job(index) for index in range(3)]
    tables = [shard_table(index) for index in range(3)]
    for job, table in zip(jobs[:2], tables[:2], strict=True):
        complete(store, job, table, StageStats(job.stage, rows=table.height))
    finished_files = identities(disk)
    assert len(finished_files) == 4  # two tables, two markers

    buffer = io.BytesIO()
    tables[2].write_parquet(buffer, compression="zstd")
    leave = buffer.tell() // 2 // PAGE * PAGE
    filler = fill(disk, leave)
    with pytest.raises(StoreFullError) as failure:
        complete(store, jobs[2], tables[2], StageStats(jobs[2].stage, rows=tables[2].height))
    free = shutil.disk_usage(disk).free
    assert free == leave  # the part of the table that was written went with its temporary file
    assert not [path for path in disk.rglob("*") if path.name.endswith(".tmp")]
    assert not store.exists(jobs[2].table_key) and not store.exists(jobs[2].marker_key)
    assert finished(store, jobs[2]) is None and all(finished(store, job) for job in jobs[:2])
    message = str(failure.value)
    assert message.startswith(f"cannot write artifact {store.uri(jobs[2].table_key)}: No space left on device (")
    assert f" bytes needed, {free} bytes free on its filesystem); free space and run again" in message

    # A checkpoint file copied in (put_file) meets the same: nothing left, the same specific error.
    weights = scratch / "weights.bin"
    weights.write_bytes(bytes(4 * leave))
    with pytest.raises(StoreFullError, match=f"{store.uri('demo/model/weights.bin')}: .*\\({4 * leave} bytes needed"):
        store.put_file(weights, "demo/model/weights.bin")
    assert not [path for path in (disk / "demo" / "model").rglob("*") if path.is_file()]

    filler.unlink()
    for job, table in zip(jobs, tables, strict=True):
        if finished(store, job) is None:
            complete(store, job, table, StageStats(job.stage, rows=table.height))
    assert {path: identities(disk)[path] for path in finished_files} == finished_files, "a finished shard was rewritten"
    result = finished(store, jobs[2])
    assert result is not None and store.read_table(result.table).equals(tables[2])
    assert f"({result.table.size} bytes needed, " in message


def identities(folder: Path) -> dict[Path, tuple[int, int]]:
    """Every file under folder with its inode and modification time: equal before and after = not written again."""
    return {path: (path.stat().st_ino, path.stat().st_mtime_ns) for path in folder.rglob("*") if path.is_file()}


def jobs_files(root: Path) -> dict[Path, tuple[int, int]]:
    """The identities of the jobs' tables and markers under an artifact root (not the stage manifests, which every
    run writes again, nor Prefect's results)."""
    return {path: identity for path, identity in identities(root).items()
            if re.fullmatch(r"(shard-\d+|all)-\w+\.(parquet|json)", path.name) and "_prefect-results" not in path.parts}


def shard_job(index: int) -> Job:
    """Shard `index` of a judging stage in campaign "demo" (keys as the pipeline plans them)."""
    return Job(stage="judgments", iteration=1, shard=f"shard-{index:04d}", cache_key=f"k{index}",
               key=f"demo/iter-1/judgments/shard-{index:04d}-k{index}", settings_digest="s", code="c", inputs={},
               shard_index=index, shard_count=3, campaign="demo")


def shard_table(index: int) -> pl.DataFrame:
    """~64 KiB of Parquet that zstd cannot shrink: 1,024 rows of 64 random bytes."""
    rng = np.random.default_rng(index)
    return pl.DataFrame({"shard": [index] * 1024, "noise": [rng.bytes(64) for _ in range(1024)]})


@pytest.mark.slow
def test_a_campaign_whose_disk_fills_mid_judging_stops_and_goes_on_once_space_is_freed(tmp_path, tiny_model):
    # Judgments' shard-0001 is held as it starts (shards run one after another here, so nothing else writes); the
    # disk is filled; only then is the job let go, so its table's write meets the full disk.
    disk = tmp_path / "disk"
    disk.mkdir()
    with small_disk(disk, 64 << 20) as mounted:
        if not mounted:
            pytest.skip("mounting a tmpfs needs root (the store-level test above also runs in a user namespace)")
        config = write_config(tmp_path, tiny_model, str(disk / "root"))
        release = tmp_path / "release"
        environment = cli_environment(tmp_path / "prefect")
        process = start_cli(["run", str(config)], {**environment,
                                                    "METAREWARD_INJECT_FAULT": f"judgments:shard-0001:hold={release}"},
                            log := tmp_path / "run.log")
        deadline = time.monotonic() + 300
        while not release.with_name("release.started").exists():
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.1)
        before = jobs_files(disk / "root")
        filler = fill(disk, 0)
        release.touch()
        assert process.wait(timeout=300) != 0, log.read_text()[-3000:]
        text = log.read_text()
        judgments = disk / "root" / "tiny" / "iter-1" / "judgments"
        table = rf"{re.escape(str(judgments))}/shard-0001-\w+\.parquet"
        written = re.search(rf"cannot write artifact {table}: No space left on device \((\d+) bytes needed, 0 bytes "
                            r"free on its filesystem\); free space and run again", text)
        assert written, text[-4000:]
        assert not [path for path in disk.rglob("*") if path.name.endswith(".tmp")]
        assert not list(judgments.glob("shard-0001-*")) and list(judgments.glob("shard-0000-*.json"))
        assert jobs_files(disk / "root") == before

        filler.unlink()
        again = run_cli(["run", str(config)], environment)
        assert again.returncode == 0, again.stderr[-4000:]
        after = jobs_files(disk / "root")
        assert {path: after[path] for path in before} == before  # the finished jobs were not written again
        [rewritten] = judgments.glob("shard-0001-*.parquet")
        assert rewritten.stat().st_size == int(written.group(1)) and list(judgments.glob("shard-0001-*.json"))
