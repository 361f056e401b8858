"""The campaign lease: one run at a time computes a campaign's tables; the others are told which run holds it."""

from __future__ import annotations

import contextvars
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime

from metareward.artifacts.conditional import create_exclusive, delete_if, read_versioned, replace_if
from metareward.artifacts.store import ArtifactStore

LEASE_FILE = "_lease.json"
"""The lease's object at the top of the campaign's folder, `{artifact_root}/{campaign}/_lease.json`: in no stage's
folder (a stage's listing never sees it) and not under `_superseded`. A local root also keeps `_lease.json.lock`
beside it (see metareward.artifacts.conditional)."""
POLL_S = 2.0
"""Seconds between two looks at a held lease while waiting for it (orchestration.lease_wait_s)."""

_log = logging.getLogger(__name__)


class LeaseError(RuntimeError):
    """The campaign's lease cannot be taken or was lost; the message says which run holds it and what to do."""


class CampaignHeldError(LeaseError):
    """Another run holds the campaign's lease, and it has not expired."""


class LeaseLostError(LeaseError):
    """The run's lease was taken by another run (or deleted) while it ran: it must write no more."""


@dataclass(frozen=True)
class Holder:
    """Who runs a campaign: its Prefect flow run (id and name; None outside a flow run), host and process id."""

    flow_run_id: str | None
    flow_run_name: str | None
    host: str
    pid: int

    @classmethod
    def this_process(cls, flow_run_id: str | None = None, flow_run_name: str | None = None) -> Holder:
        """This process on this host, running the given flow run."""
        return cls(str(flow_run_id) if flow_run_id else None, flow_run_name, socket.gethostname(), os.getpid())

    def gone(self) -> bool:
        """Whether this holder was a process of this host that has ended (killed, crashed): its lease need not be
        waited out. Host names tell machines and pods apart; a holder on another host is never judged gone."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # another user's live process
            return False
        try:  # a killed process its parent has not reaped yet
            return open(f"/proc/{self.pid}/stat").read().rsplit(")", 1)[1].split()[0] == "Z"
        except (OSError, IndexError):
            return False

    def __str__(self) -> str:
        run = (f"flow run {self.flow_run_name!r} ({self.flow_run_id})" if self.flow_run_id
               else "a process outside any Prefect flow run")
        return f"{run} on {self.host} pid {self.pid}"


@dataclass(frozen=True)
class Lease:
    """What the lease object records: the campaign, its holder, a token unique to this taking of it, and when it
    was taken, last renewed and expires (seconds since the epoch, by the holder's clock)."""

    campaign: str
    holder: Holder
    token: str
    taken_at: float
    renewed_at: float
    expires_at: float

    def to_bytes(self) -> bytes:
        """The lease as the JSON document stored, its times also written out in UTC for a reader."""
        fields = asdict(self)
        fields.update({f"{name}_utc": _when(getattr(self, name)) for name in ("taken_at", "renewed_at", "expires_at")})
        return json.dumps(fields, indent=2, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Lease:
        """The lease a stored JSON document records; ValueError, KeyError or TypeError when it is not one."""
        fields = json.loads(data)
        return cls(fields["campaign"], Holder(**fields["holder"]), fields["token"], fields["taken_at"],
                   fields["renewed_at"], fields["expires_at"])

    def expired(self, now: float) -> bool:
        """Whether its holder let it lapse by `now` (seconds since the epoch)."""
        return now >= self.expires_at

    def abandoned(self, now: float) -> str | None:
        """Why another run may take it over now — it expired, or its holder's process on this host is gone — or
        None while its holder may still be running."""
        if self.expired(now):
            return f"it expired at {_when(self.expires_at)}, not renewed since (its holder died or lost the store)"
        if self.holder.gone():
            return f"its process is gone from this host (killed or crashed; the lease would expire at " \
                   f"{_when(self.expires_at)})"
        return None

    def renewed(self, now: float, ttl_s: float) -> Lease:
        """The same lease renewed at `now`: it expires ttl_s later."""
        return replace(self, renewed_at=now, expires_at=now + ttl_s)


def lease_key(campaign: str) -> str:
    """The store key of a campaign's lease."""
    return f"{campaign}/{LEASE_FILE}"


def read_lease(store: ArtifactStore, campaign: str) -> tuple[Lease, str] | None:
    """The campaign's lease and the version of its object, or None when no run holds it. Raises LeaseError naming
    the object when it is not a lease this code wrote."""
    found = read_versioned(store, lease_key(campaign))
    if found is None:
        return None
    try:
        return Lease.from_bytes(found[0]), found[1]
    except (ValueError, KeyError, TypeError) as error:
        raise LeaseError(f"the lease {store.uri(lease_key(campaign))} is not readable ({type(error).__name__}: "
                         f"{error}): delete it once no run of campaign {campaign!r} is going") from None


def held_message(store: ArtifactStore, lease: Lease, waited_s: float = 0.0) -> str:
    """What a run that finds the campaign held is told: who holds it since when, when its lease expires, how long
    this run waited for it, and what to do."""
    cancel = f" (`prefect flow-run cancel {lease.holder.flow_run_id}`)" if lease.holder.flow_run_id else ""
    waited = f"; waited {waited_s:g} s for it (orchestration.lease_wait_s)" if waited_s else ""
    wait = "a longer orchestration.lease_wait_s" if waited_s else "orchestration.lease_wait_s to wait for it"
    return (f"{_holding(store, lease)}{waited}. Wait for it, cancel it{cancel}, or set {wait}; a holder that died "
            "stops renewing its lease, and the next run takes it over once it expires (at once on the same host)")


def _holding(store: ArtifactStore, lease: Lease) -> str:
    return (f"campaign {lease.campaign!r} on {store.root} is held by {lease.holder} since {_when(lease.taken_at)}; "
            f"its lease expires at {_when(lease.expires_at)} unless renewed (renewed last at "
            f"{_when(lease.renewed_at)})")


def lease_status(store: ArtifactStore, campaign: str) -> str | None:
    """One line on the campaign's lease for `metareward show`: which run holds it until when, or whose lease
    expired (its holder died: the next run takes it over); None when no run holds it."""
    found = read_lease(store, campaign)
    if found is None:
        return None
    lease = found[0]
    abandoned = lease.abandoned(time.time())
    if abandoned:
        return (f"campaign {campaign!r}: the lease of {lease.holder} (taken {_when(lease.taken_at)}) is abandoned: "
                f"{abandoned}; the next run takes it over")
    return (f"campaign {campaign!r} is running: held by {lease.holder} since {_when(lease.taken_at)}; its lease "
            f"expires at {_when(lease.expires_at)} unless renewed")


def check_campaign_free(store: ArtifactStore, campaign: str) -> None:
    """Raise CampaignHeldError (held_message) when a run holds the campaign's lease; none, or an abandoned one
    (Lease.abandoned), passes. A look, not a taking: the run takes the lease itself when its flow starts
    (hold_campaign)."""
    found = read_lease(store, campaign)
    if found is not None and not found[0].abandoned(time.time()):
        raise CampaignHeldError(held_message(store, found[0]))


class HeldLease:
    """A lease this process holds, renewed every ttl/3 by a background thread until released. A renewal that finds
    the lease taken by another run (or gone) marks it lost and logs an error; `check` then raises LeaseLostError."""

    def __init__(self, store: ArtifactStore, lease: Lease, version: str, ttl_s: float, logger):
        self.store, self.lease, self.version, self.ttl_s, self.logger = store, lease, version, ttl_s, logger
        self.lost: str | None = None
        """Why the lease is no longer this run's (None while it is)."""
        self._lock = threading.Lock()
        self._stop = threading.Event()
        # The renewals run in the context of the thread that took the lease, so that what they log (here, and the
        # store's own retries) goes where that thread's log goes: the flow run's, under Prefect.
        self._renewer = threading.Thread(target=contextvars.copy_context().run, args=(self._renew_every_third_of_ttl,),
                                         daemon=True, name=f"lease-{lease.campaign}")

    def renew(self) -> None:
        """Push the expiry to now + ttl, only if the lease is still this one (compare-and-swap on its version).
        Raises LeaseLostError when another run holds it or it was deleted; store errors propagate."""
        with self._lock:
            if self.lost:
                raise LeaseLostError(self.lost)
            renewed = self.lease.renewed(time.time(), self.ttl_s)
            version = replace_if(self.store, lease_key(self.lease.campaign), renewed.to_bytes(), self.version)
            if version is not None:
                self.lease, self.version = renewed, version
                return
            found = read_lease(self.store, self.lease.campaign)
            if found is not None and found[0].token == self.lease.token:  # an earlier write whose answer was lost
                self.lease, self.version = found
                return
            uri = self.store.uri(lease_key(self.lease.campaign))
            how = ("is gone (deleted while it ran)" if found is None
                   else f"was taken by {found[0].holder} at {_when(found[0].taken_at)}")
            self.lost = (f"the lease {uri} of {self.lease.holder} {how}; this run stops, and the tables it finished "
                         "stay in the store for the run that goes on")
            raise LeaseLostError(self.lost)

    def check(self) -> None:
        """Return while the lease is this run's; raise LeaseLostError when it was lost. Past its expiry (renewals
        failed, e.g. the store was unreachable), renew first: a run never writes on an expired lease."""
        if self.lost:
            raise LeaseLostError(self.lost)
        if self.lease.expired(time.time()):
            self.renew()

    def release(self) -> bool:
        """Stop renewing and delete the lease object if it is still this one; returns whether it was deleted. A
        lease another run took is left to it, and one the store cannot delete now expires on its own (each with a
        warning)."""
        self._stop.set()
        if self._renewer.is_alive():
            self._renewer.join()
        uri = self.store.uri(lease_key(self.lease.campaign))
        with self._lock:
            try:
                released = delete_if(self.store, lease_key(self.lease.campaign), self.version)
            except Exception as error:  # the run's own outcome is what to report
                self.logger.warning("could not release the lease %s (%s: %s): it expires at %s", uri,
                                    type(error).__name__, error, _when(self.lease.expires_at))
                return False
        if released:
            self.logger.info("campaign %r: released the lease %s", self.lease.campaign, uri)
        else:
            self.logger.warning("campaign %r: the lease %s is no longer this run's, left as it is: %s",
                                self.lease.campaign, uri, self.lost or "another run changed it")
        return released

    def _renew_every_third_of_ttl(self) -> None:
        while not self._stop.wait(self.ttl_s / 3):
            try:
                self.renew()
            except LeaseLostError as error:
                self.logger.error("LEASE LOST: %s. This run starts no more jobs and will fail.", error)
                return
            except Exception as error:  # an unreachable store heals; the lease holds until its expiry
                self.logger.warning("could not renew the lease of campaign %r (%s: %s); trying again in %.3g s, "
                                    "it expires at %s", self.lease.campaign, type(error).__name__, error,
                                    self.ttl_s / 3, _when(self.lease.expires_at))


def acquire(store: ArtifactStore, campaign: str, holder: Holder, ttl_s: float, wait_s: float = 0.0,
            logger=_log) -> HeldLease:
    """Take the campaign's lease for `holder` and start renewing it every ttl_s/3. Atomic: of two runs that try at
    once, one takes it (create_exclusive) and the other finds it held. An expired lease (its holder died: killed,
    node lost) is taken over, and so is one of the same flow run (a retry of it: an earlier attempt that is still
    alive finds its lease gone at its next renewal and stops), each by compare-and-swap on the version read and
    logged as a warning naming the previous holder. A lease another run holds is waited for, polling every
    POLL_S, up to wait_s seconds; then CampaignHeldError (held_message)."""
    key = lease_key(campaign)
    deadline = time.monotonic() + wait_s
    token = uuid.uuid4().hex
    waited_for: str | None = None
    while True:
        now = time.time()
        mine = Lease(campaign, holder, token, now, now, now + ttl_s)
        version = create_exclusive(store, key, mine.to_bytes())
        if version is not None:
            probe = create_exclusive(store, key, mine.to_bytes())  # the same bytes again: must be refused
            if probe is not None:
                version = probe
                logger.warning("the artifact store %s does not enforce conditional writes (If-None-Match): two runs of "
                               "campaign %r could both take its lease; use an endpoint that does (AWS S3, moto 5)",
                               store.root, campaign)
            return _held(store, mine, version, ttl_s, logger)
        found = read_lease(store, campaign)
        if found is None:  # released between the two looks
            continue
        theirs, their_version = found
        if theirs.token == token:  # this call's own write, whose answer was lost
            return _held(store, theirs, their_version, ttl_s, logger)
        if holder.flow_run_id is not None and theirs.holder.flow_run_id == holder.flow_run_id:
            why = (f"took back the lease of this flow run's earlier attempt ({theirs.holder}, last renewed at "
                   f"{_when(theirs.renewed_at)})")
        elif abandoned := theirs.abandoned(now):
            why = f"took over the lease of {theirs.holder}: {abandoned}"
        else:
            if time.monotonic() >= deadline:
                raise CampaignHeldError(held_message(store, theirs, wait_s))
            if waited_for != theirs.token:
                logger.warning("%s: waiting up to %.0f s for it (orchestration.lease_wait_s)",
                               _holding(store, theirs), deadline - time.monotonic())
                waited_for = theirs.token
            time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))
            continue
        version = replace_if(store, key, mine.to_bytes(), their_version)
        if version is not None:
            return _held(store, mine, version, ttl_s, logger, why)
        # Another run changed it first (renewed, released or took it over): look again.


def _held(store: ArtifactStore, lease: Lease, version: str, ttl_s: float, logger,
          taken_over: str | None = None) -> HeldLease:
    """The lease just taken, its renewals started, and the log line that says so (a warning for a take-over)."""
    held = HeldLease(store, lease, version, ttl_s, logger)
    now_held = (f"lease {store.uri(lease_key(lease.campaign))} held by {lease.holder}, renewed every "
                f"{ttl_s / 3:.3g} s (it expires {ttl_s:g} s after its last renewal)")
    if taken_over:
        logger.warning("campaign %r on %s: %s; %s", lease.campaign, store.root, taken_over, now_held)
    else:
        logger.info("campaign %r on %s: %s", lease.campaign, store.root, now_held)
    held._renewer.start()
    return held


_HELD: dict[tuple[str, str], HeldLease] = {}
"""The leases this process holds, by (artifact root, campaign)."""


@contextmanager
def hold_campaign(store: ArtifactStore, campaign: str, holder: Holder, ttl_s: float, wait_s: float = 0.0,
                  logger=_log) -> Iterator[HeldLease]:
    """Hold the campaign's lease for the block (acquire), released when it ends, however it ends. Re-entrant in a
    process: a flow that runs inside one holding it (an iteration flow inside its campaign flow) runs under that
    lease. A block that ends normally with its lease lost raises LeaseLostError: the run must not look finished."""
    key = (store.root, campaign)
    if key in _HELD:
        yield _HELD[key]
        return
    held = _HELD[key] = acquire(store, campaign, holder, ttl_s, wait_s, logger)
    try:
        yield held
    finally:
        del _HELD[key]
        held.release()
    if held.lost:
        raise LeaseLostError(held.lost)


def ensure_held(store: ArtifactStore, campaign: str) -> None:
    """Raise LeaseLostError if this process held the campaign's lease and lost it (HeldLease.check); nothing when
    it holds none (a shard flow run on a worker, which runs under its iteration flow's lease)."""
    held = _HELD.get((store.root, campaign))
    if held is not None:
        held.check()


def _when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
