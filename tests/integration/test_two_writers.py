"""Two runs of one campaign on one artifact root (issue 25, "Two writers"), as real `metareward run` processes of
a tiny campaign, each fault in place before the step that meets it: a second run while the first is held inside a
stage stops at once naming the first's flow run, and a third allowed to wait goes on once the first ends; the lease
of a run killed with SIGKILL is taken over by the next run; a run whose lease is taken starts no more jobs."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
from pathlib import Path

import pytest

from metareward.artifacts.conditional import read_versioned, replace_if
from metareward.artifacts.store import ArtifactStore
from metareward.pipeline.lease import Holder, Lease, lease_key, read_lease
from tests.integration.campaigns import cli_environment, run_cli, start_cli, wait_for, write_config

pytestmark = pytest.mark.slow
HOST = socket.gethostname()
TIME = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC"
FINISHED_BEFORE_THE_HOLD = {"prompts iter-1 all", "responses iter-1 shard-0000", "responses iter-1 shard-0001",
                            "responses iter-1 shard-0002", "judgments iter-1 shard-0000"}
"""The jobs a tiny campaign held at judgments' shard-0001 has finished."""


def lease_file(root: Path) -> dict:
    return json.loads((root / "tiny" / "_lease.json").read_text())


def files_written(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under root with its size and modification time, but the lease's own (its holder renews it)."""
    return {str(path.relative_to(root)): (path.stat().st_size, path.stat().st_mtime_ns) for path in root.rglob("*")
            if path.is_file() and "_lease.json" not in path.name}


def tables_written(root: Path) -> dict[str, tuple[int, int]]:
    """Every Parquet table under root with its size and modification time: equal before and after = none rewritten."""
    return {name: stamp for name, stamp in files_written(root).items() if name.endswith(".parquet")}


def job_lines(log: str, how: str) -> set[str]:
    """The jobs (e.g. 'judgments iter-1 shard-0001') whose line in the log says `how` ('computed in', 'found in the
    store')."""
    return {match.group(1) for match in re.finditer(rf"(\w+ iter-\d+ (?:shard-\d+|all)): \d+ rows, {how}", log)}


@pytest.fixture
def processes():
    """Runs a test starts; any still alive when it ends (a failed assertion) are killed with their children."""
    started: list = []
    yield started
    for process in started:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def test_a_second_run_stops_at_once_naming_the_first_and_a_third_waits_for_it(tmp_path, tiny_model, processes):
    root = tmp_path / "artifacts"
    config = write_config(tmp_path, tiny_model, str(root), orchestration={"lease_ttl_s": 30})
    release = tmp_path / "release"
    first_log, third_log = tmp_path / "first.log", tmp_path / "third.log"
    first = start_cli(["run", str(config)], cli_environment(
        tmp_path / "prefect-1", METAREWARD_INJECT_FAULT=f"judgments:shard-0001:hold={release}"), first_log)
    processes.append(first)
    # The first run holds the campaign and is held inside a stage: responses and judgments' shard-0000 are written.
    wait_for(lambda: release.with_name("release.started").exists(), first, first_log, "the first run to be held")
    holder = lease_file(root)["holder"]
    assert holder["pid"] == first.pid and holder["host"] == HOST and holder["flow_run_name"] == "tiny"
    assert (f"lease {root}/tiny/_lease.json held by flow run 'tiny' ({holder['flow_run_id']}) on {HOST} pid "
            f"{first.pid}, renewed every 10 s") in first_log.read_text()
    before = files_written(root)
    assert job_lines(first_log.read_text(), "computed in") == FINISHED_BEFORE_THE_HOLD

    # A second run of the same campaign on the same root (its own Prefect home, as a schedule's run on another
    # worker would be) stops in seconds, before Prefect starts, naming the first's flow run; it writes nothing.
    started = time.monotonic()
    second = run_cli(["run", str(config)], cli_environment(tmp_path / "prefect-2"), timeout=120)
    assert second.returncode == 2, second.stderr[-3000:]
    assert time.monotonic() - started < 30  # 0.9 s here
    assert re.search(
        rf"error: campaign 'tiny' on {re.escape(str(root))} is held by flow run 'tiny' \({holder['flow_run_id']}\) on "
        rf"{re.escape(HOST)} pid {first.pid} since {TIME}; its lease expires at {TIME} unless renewed .*Wait for it, "
        rf"cancel it \(`prefect flow-run cancel {holder['flow_run_id']}`\), or set orchestration.lease_wait_s",
        second.stderr), second.stderr[-3000:]
    assert "Beginning flow run" not in second.stdout + second.stderr
    assert files_written(root) == before
    shown = run_cli(["show", "tiny", "--artifact-root", str(root)], cli_environment(tmp_path / "prefect-2"))
    assert shown.returncode == 0 and (f"campaign 'tiny' is running: held by flow run 'tiny' ({holder['flow_run_id']}) "
                                      f"on {HOST} pid {first.pid} since") in shown.stderr, shown.stderr[-2000:]
    # As a run started from the Prefect UI is (no CLI preflight): its flow stops before the first stage, here after
    # waiting the 1 s its orchestration.lease_wait_s allows.
    (tmp_path / "briefly").mkdir()
    briefly = write_config(tmp_path / "briefly", tiny_model, str(root), orchestration={"lease_ttl_s": 30,
                                                                                        "lease_wait_s": 1})
    started = time.monotonic()
    impatient = run_cli(["run", str(briefly)], cli_environment(tmp_path / "prefect-2"), timeout=180)
    assert impatient.returncode == 2, impatient.stderr[-3000:]
    assert time.monotonic() - started < 120
    assert "Beginning flow run 'tiny' for flow 'metareward-campaign'" in impatient.stdout + impatient.stderr
    assert re.search(rf"error: campaign 'tiny' on {re.escape(str(root))} is held by flow run 'tiny' "
                     rf"\({holder['flow_run_id']}\) on {re.escape(HOST)} pid {first.pid} since .*; waited 1 s for it "
                     r"\(orchestration.lease_wait_s\)", impatient.stderr), impatient.stderr[-3000:]
    assert "Task run" not in impatient.stdout + impatient.stderr
    assert files_written(root) == before

    # A third run allowed to wait (orchestration.lease_wait_s) waits in its flow, writing nothing, until the first
    # ends; then it takes the lease and finds every table in the store.
    (tmp_path / "third").mkdir()
    waiting = write_config(tmp_path / "third", tiny_model, str(root), orchestration={"lease_ttl_s": 30,
                                                                                       "lease_wait_s": 600})
    third = start_cli(["run", str(waiting)], cli_environment(tmp_path / "prefect-3"), third_log)
    processes.append(third)
    wait_for(lambda: "waiting up to" in third_log.read_text(), third, third_log, "the third run to wait")
    assert f"is held by flow run 'tiny' ({holder['flow_run_id']}) on {HOST} pid {first.pid}" in third_log.read_text()
    assert files_written(root) == before
    release.touch()
    assert first.wait(timeout=600) == 0, first_log.read_text()[-4000:]
    assert f"released the lease {root}/tiny/_lease.json" in first_log.read_text()
    assert len(job_lines(first_log.read_text(), "computed in")) > 4
    tables = tables_written(root)
    assert third.wait(timeout=600) == 0, third_log.read_text()[-4000:]
    text = third_log.read_text()
    third_run = re.search(r"held by flow run 'tiny' \(([0-9a-f-]+)\) on \S+ pid (\d+), renewed every", text)
    assert third_run and third_run.group(1) != holder["flow_run_id"] and int(third_run.group(2)) == third.pid
    assert job_lines(text, "computed in") == set() and "judgments iter-1 shard-0001" in job_lines(
        text, r"found in the store")
    assert tables_written(root) == tables
    assert not (root / "tiny" / "_lease.json").exists()


def test_the_lease_of_a_run_killed_with_sigkill_is_taken_over_by_the_next_run(tmp_path, tiny_model, processes):
    root = tmp_path / "artifacts"
    config = write_config(tmp_path, tiny_model, str(root))
    release = tmp_path / "release"
    killed_log = tmp_path / "killed.log"
    killed = start_cli(["run", str(config)], cli_environment(
        tmp_path / "prefect-1", METAREWARD_INJECT_FAULT=f"judgments:shard-0001:hold={release}"), killed_log)
    processes.append(killed)
    wait_for(lambda: release.with_name("release.started").exists(), killed, killed_log, "the first run to be held")
    os.killpg(killed.pid, signal.SIGKILL)  # the holder dies with its lease in the store
    killed.wait()
    kept = tables_written(root)
    lease = lease_file(root)
    assert lease["holder"]["pid"] == killed.pid
    # Its process is gone from this host: the next run takes the lease over at once, long before it would expire.
    started = time.monotonic()
    after = run_cli(["run", str(config)], cli_environment(tmp_path / "prefect-2"))
    assert after.returncode == 0, after.stderr[-4000:]
    text = after.stdout + after.stderr
    taken_over = (rf"campaign 'tiny' on {re.escape(str(root))}: took over the lease of flow run 'tiny' "
                  rf"\({lease['holder']['flow_run_id']}\) on {re.escape(HOST)} pid {killed.pid}: its process is gone "
                  rf"from this host \(killed or crashed; the lease would expire at {TIME}\)")
    assert re.search(taken_over, text), text[-4000:]
    assert time.time() < lease["expires_at"]
    # Kept: what the killed run finished. Redone: the job it was killed in, and what follows.
    assert FINISHED_BEFORE_THE_HOLD <= job_lines(text, "found in the store")
    assert "judgments iter-1 shard-0001" in job_lines(text, "computed in")
    assert not FINISHED_BEFORE_THE_HOLD & job_lines(text, "computed in")
    final = tables_written(root)
    assert {name: final[name] for name in kept} == kept
    assert not (root / "tiny" / "_lease.json").exists()
    assert time.monotonic() - started < 600


def test_a_run_whose_lease_is_taken_starts_no_more_jobs_and_fails(tmp_path, tiny_model, processes):
    root = tmp_path / "artifacts"
    config = write_config(tmp_path, tiny_model, str(root), orchestration={"lease_ttl_s": 3})
    release, log = tmp_path / "release", tmp_path / "run.log"
    run = start_cli(["run", str(config)], cli_environment(
        tmp_path / "prefect", METAREWARD_INJECT_FAULT=f"judgments:shard-0001:hold={release}"), log)
    processes.append(run)
    wait_for(lambda: release.with_name("release.started").exists(), run, log, "the run to be held")
    # Another run writes its own lease over this one's (as one whose clock ran minutes ahead would).
    store = ArtifactStore(str(root))
    now = time.time()
    thief = Lease("tiny", Holder("0b0b0b0b-0000-4000-8000-00000000000b", "thief", HOST, 102), "thief", now, now,
                  now + 600)
    while not replace_if(store, lease_key("tiny"), thief.to_bytes(), read_versioned(store, lease_key("tiny"))[1]):
        pass  # renewed between the read and the write: read again
    wait_for(lambda: "LEASE LOST" in log.read_text(), run, log, "the run's renewal to find its lease taken")
    release.touch()
    assert run.wait(timeout=300) == 2, log.read_text()[-4000:]
    text = log.read_text()
    # The job that was running when the lease was lost ends (its write is atomic); no job starts after it.
    assert job_lines(text, "computed in") == FINISHED_BEFORE_THE_HOLD | {"judgments iter-1 shard-0001"}
    assert not list((root / "tiny" / "iter-1" / "judgments").glob("shard-0002-*"))
    assert re.search(rf"error: the lease {re.escape(str(root))}/tiny/_lease.json of flow run 'tiny' \([0-9a-f-]+\) on "
                     rf"{re.escape(HOST)} pid {run.pid} was taken by flow run 'thief' \({thief.holder.flow_run_id}\) "
                     rf"on {re.escape(HOST)} pid 102 at {TIME}; this run stops", text), text[-4000:]
    assert read_lease(store, "tiny")[0].token == "thief"  # left to the run that holds it
