"""The campaign lease on a local root and on a real S3 endpoint over HTTP (moto's server): conditional writes,
exclusive taking, the error a second run gets, take-over of an expired lease, renewal, release by its holder only,
waiting for it. tests/integration/test_two_writers.py runs real campaigns against each other."""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import sys
import threading
import time

import boto3
import httpx
import pytest
from moto.server import ThreadedMotoServer

from metareward.artifacts.conditional import create_exclusive, delete_if, read_versioned, replace_if
from metareward.artifacts.store import ArtifactStore
from metareward.host.ports import free_port
from metareward.pipeline.lease import (
    CampaignHeldError,
    HeldLease,
    Holder,
    Lease,
    LeaseError,
    LeaseLostError,
    acquire,
    check_campaign_free,
    ensure_held,
    hold_campaign,
    lease_key,
    lease_status,
    read_lease,
)

HOST = "lease-test-host"
"""The host of the holders these tests make up: not this one, so that only expiry frees their leases (a holder on
this host whose process is gone frees its lease at once: tested below)."""
RUN_A = Holder("0a0a0a0a-0000-4000-8000-00000000000a", "tiny-a", HOST, 101)
RUN_B = Holder("0b0b0b0b-0000-4000-8000-00000000000b", "tiny-b", HOST, 102)
TIME = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC"


@pytest.fixture(scope="module")
def moto_endpoint():
    """moto's S3 server on 127.0.0.1 with a bucket `leases`; the S3 environment set for this module's tests."""
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    environment = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                   "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": endpoint}
    saved = {name: os.environ.get(name) for name in environment}
    os.environ.update(environment)
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="leases")
    yield endpoint
    httpx.post(f"{endpoint}/moto-api/reset")
    server.stop()
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path) -> ArtifactStore:
    """An artifact store on a local folder, or on moto's S3 server over HTTP (a fresh prefix per test)."""
    if request.param == "local":
        return ArtifactStore(str(tmp_path / "root"))
    request.getfixturevalue("moto_endpoint")
    return ArtifactStore(f"s3://leases/{tmp_path.name}")


@pytest.fixture
def logger(caplog) -> logging.Logger:
    caplog.set_level(logging.INFO, logger="lease-test")
    return logging.getLogger("lease-test")


def stored_keys(store: ArtifactStore) -> list[str]:
    """Every object under the store's root but the local lock file (which only a local root has)."""
    return [key for key in store.list("") if not key.endswith(".lock")]


def test_conditional_writes_hold_only_while_their_condition_does(store):
    first = create_exclusive(store, "c/object", b"one")
    assert first is not None and create_exclusive(store, "c/object", b"two") is None
    assert read_versioned(store, "c/object") == (b"one", first)
    assert replace_if(store, "c/object", b"two", "not-its-version") is None
    second = replace_if(store, "c/object", b"two", first)
    assert second not in (None, first)
    assert replace_if(store, "c/object", b"three", first) is None  # a stale version
    assert not delete_if(store, "c/object", first)
    assert read_versioned(store, "c/object") == (b"two", second)
    assert delete_if(store, "c/object", second)
    assert read_versioned(store, "c/object") is None
    assert replace_if(store, "c/object", b"x", second) is None and not delete_if(store, "c/object", second)


def test_of_many_runs_starting_at_once_exactly_one_holds_the_campaign(store, logger):
    holders = [Holder(f"{index:08d}-0000-4000-8000-000000000000", f"run-{index}", HOST, 200 + index)
               for index in range(6)]
    start = threading.Barrier(len(holders))
    outcomes: dict[int, object] = {}

    def take(index: int) -> None:
        start.wait()
        try:
            outcomes[index] = acquire(store, "tiny", holders[index], ttl_s=60, logger=logger)
        except CampaignHeldError as error:
            outcomes[index] = error

    threads = [threading.Thread(target=take, args=(index,)) for index in range(len(holders))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [index for index, outcome in outcomes.items() if not isinstance(outcome, Exception)]
    assert len(winners) == 1, outcomes
    winner = holders[winners[0]]
    refusals = [str(outcome) for outcome in outcomes.values() if isinstance(outcome, Exception)]
    assert len(refusals) == len(holders) - 1
    assert all(f"held by flow run {winner.flow_run_name!r} ({winner.flow_run_id})" in text for text in refusals)
    assert read_lease(store, "tiny")[0].holder == winner
    assert outcomes[winners[0]].release()
    assert stored_keys(store) == []


def test_a_held_campaign_refuses_a_second_run_naming_the_holder_and_writes_nothing(store, logger, caplog):
    held = acquire(store, "tiny", RUN_A, ttl_s=60, logger=logger)
    assert "does not enforce conditional writes" not in caplog.text
    with pytest.raises(CampaignHeldError) as refused:
        acquire(store, "tiny", RUN_B, ttl_s=60, logger=logger)
    assert re.fullmatch(
        rf"campaign 'tiny' on {re.escape(store.root)} is held by flow run 'tiny-a' \({RUN_A.flow_run_id}\) on "
        rf"{re.escape(HOST)} pid 101 since {TIME}; its lease expires at {TIME} unless renewed \(renewed last at "
        rf"{TIME}\)\. Wait for it, cancel it \(`prefect flow-run cancel {RUN_A.flow_run_id}`\), or set "
        r"orchestration\.lease_wait_s to wait for it; a holder that died stops renewing its lease, and the next run "
        r"takes it over once it expires \(at once on the same host\)", str(refused.value))
    with pytest.raises(CampaignHeldError, match="is held by flow run 'tiny-a'"):
        check_campaign_free(store, "tiny")
    assert lease_status(store, "tiny").startswith("campaign 'tiny' is running: held by flow run 'tiny-a'")
    # The lease is the one object in the store; it names its holder, and B is not in it.
    assert stored_keys(store) == [lease_key("tiny")]
    recorded = json.loads(read_versioned(store, lease_key("tiny"))[0])
    assert recorded["holder"] == {"flow_run_id": RUN_A.flow_run_id, "flow_run_name": "tiny-a", "host": HOST,
                                  "pid": 101}
    assert recorded["expires_at"] - recorded["renewed_at"] == pytest.approx(60)
    assert re.fullmatch(TIME, recorded["expires_at_utc"])
    # Another campaign on the same root is not held.
    other = acquire(store, "other", RUN_B, ttl_s=60, logger=logger)
    assert other.release() and held.release()
    check_campaign_free(store, "tiny")
    assert lease_status(store, "tiny") is None


def test_an_expired_lease_is_taken_over_once_and_its_holder_finds_it_lost(store, logger, caplog):
    # What a holder killed with SIGKILL leaves: its lease, last renewed 61 s ago with a TTL of 60 s.
    now = time.time()
    left = Lease("tiny", RUN_A, "killed", now - 100, now - 61, now - 1)
    dead = HeldLease(store, left, create_exclusive(store, lease_key("tiny"), left.to_bytes()), 60, logger)
    assert "expired at" in lease_status(store, "tiny") and "the next run takes it over" in lease_status(store, "tiny")
    check_campaign_free(store, "tiny")
    # Two runs that find it expired at once: one takes it over (compare-and-swap), the other is refused.
    start = threading.Barrier(2)
    outcomes: dict[str, object] = {}

    def take(holder: Holder) -> None:
        start.wait()
        try:
            outcomes[holder.flow_run_name] = acquire(store, "tiny", holder, ttl_s=60, logger=logger)
        except CampaignHeldError as error:
            outcomes[holder.flow_run_name] = error

    threads = [threading.Thread(target=take, args=(holder,)) for holder in (RUN_B, Holder(
        "0c0c0c0c-0000-4000-8000-00000000000c", "tiny-c", HOST, 103))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    [winner] = [name for name, outcome in outcomes.items() if not isinstance(outcome, Exception)]
    [loser] = [outcome for outcome in outcomes.values() if isinstance(outcome, Exception)]
    assert f"held by flow run {winner!r}" in str(loser)
    assert re.search(rf"campaign 'tiny' on {re.escape(store.root)}: took over the lease of flow run 'tiny-a' "
                     rf"\({RUN_A.flow_run_id}\) on {re.escape(HOST)} pid 101: it expired at {TIME}, not renewed since "
                     rf"\(its holder died or lost the store\); lease .*_lease.json held by flow run {winner!r}",
                     caplog.text)
    # The old holder, had it lived, finds its lease gone: it may neither renew, nor go on, nor release it.
    with pytest.raises(LeaseLostError, match=f"was taken by flow run {winner!r}"):
        dead.renew()
    with pytest.raises(LeaseLostError):
        dead.check()
    assert not dead.release()
    assert read_lease(store, "tiny")[0].holder.flow_run_name == winner
    assert outcomes[winner].release()
    assert stored_keys(store) == []


def test_the_lease_is_renewed_while_its_run_lives_and_a_lost_one_stops_the_run(store, logger, caplog):
    with pytest.raises(LeaseLostError, match="was taken by flow run 'tiny-b'"):  # raised as the block ends
        with hold_campaign(store, "tiny", RUN_A, ttl_s=0.9, logger=logger) as held:
            first = read_lease(store, "tiny")[0]
            # Renewed every ttl/3: still held well after the first expiry would have passed without renewals.
            wait_until(lambda: time.time() > first.expires_at + 0.9, "twice the first lease's lifetime")
            renewed = read_lease(store, "tiny")[0]
            assert renewed.token == first.token and renewed.renewed_at > first.renewed_at
            assert not renewed.expired(time.time())
            with pytest.raises(CampaignHeldError):
                acquire(store, "tiny", RUN_B, ttl_s=60, logger=logger)
            ensure_held(store, "tiny")
            # Another run writes over it (as one whose clock ran far ahead would): the next renewal finds it lost,
            # and the run starts no more work.
            stolen = Lease("tiny", RUN_B, "stolen", time.time(), time.time(), time.time() + 60)
            wait_until(lambda: replace_if(store, lease_key("tiny"), stolen.to_bytes(),
                                          read_versioned(store, lease_key("tiny"))[1]), "a write between renewals")
            wait_until(lambda: held.lost is not None, "a renewal to find the lease lost")
            with pytest.raises(LeaseLostError, match="was taken by flow run 'tiny-b'"):
                ensure_held(store, "tiny")
    assert "LEASE LOST: the lease" in caplog.text and "This run starts no more jobs and will fail" in caplog.text
    assert read_lease(store, "tiny")[0].token == "stolen"  # left to the run that holds it


def test_the_lease_is_released_however_the_run_ends_and_nested_flows_share_it(store, logger):
    with pytest.raises(ValueError, match="a stage failed"):
        with hold_campaign(store, "tiny", RUN_A, ttl_s=60, logger=logger):
            with hold_campaign(store, "tiny", RUN_A, ttl_s=60, logger=logger) as inner:
                assert inner.lease.holder == RUN_A
            assert read_lease(store, "tiny") is not None  # the inner flow left it to the outer one
            raise ValueError("a stage failed")
    assert read_lease(store, "tiny") is None
    ensure_held(store, "tiny")  # holds none: nothing to check


def test_a_retry_of_the_same_flow_run_takes_its_lease_back(store, logger, caplog):
    earlier = acquire(store, "tiny", RUN_A, ttl_s=60, logger=logger)
    retry = Holder(RUN_A.flow_run_id, RUN_A.flow_run_name, HOST, 999)
    again = acquire(store, "tiny", retry, ttl_s=60, logger=logger)
    assert read_lease(store, "tiny")[0].holder.pid == 999
    assert f"took back the lease of this flow run's earlier attempt (flow run 'tiny-a' ({RUN_A.flow_run_id}) on " \
           f"{HOST} pid 101" in caplog.text
    with pytest.raises(LeaseLostError, match="pid 999"):
        earlier.renew()
    assert again.release() and read_lease(store, "tiny") is None


def test_a_run_may_wait_for_the_lease(store, logger, caplog):
    held = acquire(store, "tiny", RUN_A, ttl_s=60, logger=logger)
    started = time.monotonic()
    with pytest.raises(CampaignHeldError, match=r"held by flow run 'tiny-a'.*; waited 0.5 s for it \(orchestration"
                       r"\.lease_wait_s\)\. Wait for it, cancel it .*, or set a longer orchestration\.lease_wait_s;"):
        acquire(store, "tiny", RUN_B, ttl_s=60, wait_s=0.5, logger=logger)
    assert 0.5 <= time.monotonic() - started < 5
    taken: list = []
    waiter = threading.Thread(target=lambda: taken.append(acquire(store, "tiny", RUN_B, ttl_s=60, wait_s=60,
                                                                  logger=logger)))
    caplog.clear()
    waiter.start()
    wait_until(lambda: "waiting up to" in caplog.text, "the second run to wait")
    assert "is held by flow run 'tiny-a'" in caplog.text and not taken
    released = time.monotonic()
    held.release()
    waiter.join()
    assert time.monotonic() - released < 5  # POLL_S = 2
    assert read_lease(store, "tiny")[0].holder == RUN_B
    assert taken[0].release()


def test_a_store_that_ignores_if_none_match_is_named_in_a_warning(store, logger, caplog, monkeypatch):
    from metareward.pipeline import lease

    def unconditional(store, key, data):  # what an endpoint that ignores If-None-Match does
        store.write_bytes(key, data)
        return read_versioned(store, key)[1]

    monkeypatch.setattr(lease, "create_exclusive", unconditional)
    held = acquire(store, "tiny", RUN_A, ttl_s=60, logger=logger)
    assert f"the artifact store {store.root} does not enforce conditional writes (If-None-Match): two runs of " \
           "campaign 'tiny' could both take its lease" in caplog.text
    held.renew()  # the version it holds is the object's
    assert held.release()


def test_a_lease_that_is_not_one_is_reported_not_overwritten(store, logger):
    store.write_bytes(lease_key("tiny"), b"not json")
    with pytest.raises(LeaseError, match=r"_lease.json is not readable .*delete it once no run of campaign 'tiny'"):
        acquire(store, "tiny", RUN_A, ttl_s=60, logger=logger)
    assert store.read_bytes(lease_key("tiny")) == b"not json"


def wait_until(condition, what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"no {what} within {timeout_s:g} s"
        time.sleep(0.05)


def test_the_lease_of_a_holder_whose_process_ended_on_this_host_is_taken_over_at_once(store, logger, caplog):
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = Holder("0d0d0d0d-0000-4000-8000-00000000000d", "tiny-d", socket.gethostname(), int(ended.stdout))
    now = time.time()  # what a run killed on this machine leaves: a lease far from its expiry
    left = Lease("tiny", dead, "killed", now, now, now + 600)
    create_exclusive(store, lease_key("tiny"), left.to_bytes())
    assert "the next run takes it over" in lease_status(store, "tiny")
    check_campaign_free(store, "tiny")
    held = acquire(store, "tiny", RUN_B, ttl_s=60, logger=logger)
    assert f"took over the lease of flow run 'tiny-d' ({dead.flow_run_id}) on {dead.host} pid {dead.pid}: its " \
           "process is gone from this host" in caplog.text
    assert held.release()
