"""The pipeline against a real S3 endpoint over HTTP (moto's server on 127.0.0.1, as s3fs tests itself):
a campaign whose every table is read back with polars (a glob of each stage finding its manifest's tables alone
after a recompute), an outage mid-stage, a burst of throttled writes, a missing
bucket, no endpoint."""

from __future__ import annotations

import hashlib
import io
import json
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import boto3
import httpx
import polars as pl
import pytest
from moto.server import ThreadedMotoServer

from metareward.artifacts.store import ArtifactStore
from metareward.host.ports import free_port
from tests.integration.campaigns import cli_environment, run_cli, start_cli, wait_for, write_config

pytestmark = pytest.mark.slow
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture()
def s3(monkeypatch):
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    environment = {**CREDENTIALS, "AWS_ENDPOINT_URL_S3": endpoint}
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    client = boto3.client("s3", endpoint_url=endpoint, **{"aws_access_key_id": "testing",
                                                           "aws_secret_access_key": "testing",
                                                           "region_name": "us-east-1"})
    client.create_bucket(Bucket="campaigns")
    state = {"server": server, "port": port, "endpoint": endpoint, "env": environment, "client": client}
    yield state
    # moto keeps buckets in this process across servers: forget them for the next test.
    httpx.post(f"{endpoint}/moto-api/reset")
    state["server"].stop()


def all_keys(client, bucket="campaigns") -> list[str]:
    keys, token = [], None
    while True:
        page = client.list_objects_v2(Bucket=bucket, **({"ContinuationToken": token} if token else {}))
        keys += [item["Key"] for item in page.get("Contents", [])]
        if not page.get("IsTruncated"):
            return keys
        token = page["NextContinuationToken"]


def parquet_versions(client, bucket="campaigns") -> dict[str, str]:
    """Every Parquet object with its ETag and last-modified time: equal before and after = nothing rewritten."""
    return {key: (head["ETag"], head["LastModified"]) for key in all_keys(client, bucket) if key.endswith(".parquet")
            for head in [client.head_object(Bucket=bucket, Key=key)]}


def polars_options(s3) -> dict[str, str]:
    return {"aws_endpoint_url": s3["endpoint"], "aws_allow_http": "true", "aws_access_key_id": "testing",
            "aws_secret_access_key": "testing", "aws_region": "us-east-1"}


def test_campaign_on_s3_two_iterations(tmp_path, tiny_model, s3):
    config = write_config(tmp_path, tiny_model, "s3://campaigns/runs", iterations=2)
    result = run_cli(["run", str(config)], cli_environment(tmp_path / "prefect", **s3["env"]))
    assert result.returncode == 0, result.stderr[-4000:]
    keys = all_keys(s3["client"])
    tables = [key for key in keys if key.endswith(".parquet")]
    stages = {key.split("/")[3] for key in tables}
    assert {"prompts", "responses", "judgments", "meta_judgments", "judgment_elo", "actor_pairs", "judge_pairs",
            "dpo_dataset", "checkpoint"} <= stages
    for key in tables:
        table = pl.read_parquet(f"s3://campaigns/{key}", storage_options=polars_options(s3))
        assert table.width > 0
    # Iteration 2 ran on M_2, downloaded from its checkpoint on S3 (model_id.txt written last).
    checkpoints = [key for key in keys if key.endswith("/model/model_id.txt")]
    assert len(checkpoints) == 2
    model_2 = s3["client"].get_object(Bucket="campaigns", Key=sorted(checkpoints)[0])["Body"].read().decode().strip()
    responses_2 = [key for key in tables if "/iter-2/responses/" in key]
    table = pl.read_parquet(f"s3://campaigns/{responses_2[0]}", storage_options=polars_options(s3))
    assert table["model_id"][0] == model_2
    assert any(key.startswith("runs/tiny/_prefect-results/") for key in keys)
    assert not any(key.endswith(".tmp") for key in keys)

    written = parquet_versions(s3["client"])
    # An object replaced by other bytes of the same size has another ETag: computed again, and the log says so.
    replaced = next(key for key in written if "/iter-1/judgments/shard-0001-" in key)
    body = bytearray(s3["client"].get_object(Bucket="campaigns", Key=replaced)["Body"].read())
    body[len(body) // 2] ^= 0xFF
    s3["client"].put_object(Bucket="campaigns", Key=replaced, Body=bytes(body))
    # A re-run on a machine that never saw the checkpoints downloads none: M_2's digest is read from its
    # model_id.txt, and every other stage is found finished in the store (the recomputed shard comes back the
    # same, so nothing downstream of it runs again).
    cache = tmp_path / "fresh-model-cache"
    again = run_cli(["run", str(config)], cli_environment(tmp_path / "prefect", METAREWARD_MODEL_CACHE=str(cache),
                                                          **s3["env"]))
    assert again.returncode == 0, again.stderr[-4000:]
    assert f"its table s3://campaigns/{replaced} was replaced" in again.stdout + again.stderr
    assert not (cache / "checkpoints").exists()
    after = parquet_versions(s3["client"])
    assert {key for key in after if after[key] != written[key]} == {replaced}

    # A changed setting (ρ) recomputes the actor pairs of both iterations: the superseded tables leave the stage's
    # prefix, so that a glob of every stage reads exactly what its manifest lists.
    lengthier = write_config(tmp_path, tiny_model, "s3://campaigns/runs", iterations=2,
                             iteration_overrides={"rho": 0.01})
    third = run_cli(["run", str(lengthier)], cli_environment(tmp_path / "prefect", **s3["env"]))
    assert third.returncode == 0, third.stderr[-4000:]
    assert "superseded file(s) moved out of the stage's folder" in third.stdout + third.stderr
    keys = all_keys(s3["client"])
    manifests = [key for key in keys if key.endswith("/manifest.json") and "/iter-" in key]
    assert len(manifests) >= 2 * 9
    for key in manifests:
        manifest = json.loads(s3["client"].get_object(Bucket="campaigns", Key=key)["Body"].read())
        folder = key.rsplit("/", 1)[0]
        in_folder = sorted(f"s3://campaigns/{other}" for other in keys if other.rsplit("/", 1)[0] == folder
                           and other.endswith(".parquet"))
        assert in_folder == sorted(shard["uri"] for shard in manifest["shards"].values()), folder
        glob = pl.read_parquet(f"s3://campaigns/{folder}/*.parquet", storage_options=polars_options(s3))
        assert glob.height == manifest["rows"], folder
    for iteration in (1, 2):
        assert any(key.startswith(f"runs/tiny/_superseded/iter-{iteration}/actor_pairs/") and key.endswith(".parquet")
                   for key in keys)


def test_s3_outage_mid_stage_is_retried_with_nothing_lost(tmp_path, tiny_model, s3):
    # The fault is in place when the step that meets it runs: judgments' shard-0001 is held as it starts, the
    # endpoint is stopped, and only then is the job let go, so its reads meet the outage (no timer decides it).
    # The endpoint comes back once the run says the job will be retried: 30 s before that retry starts.
    config = write_config(tmp_path, tiny_model, "s3://campaigns/outage", orchestration={"retry_backoff_s": 30})
    release = tmp_path / "release"
    environment = cli_environment(tmp_path / "prefect", **s3["env"],
                                  METAREWARD_INJECT_FAULT=f"judgments:shard-0001:hold={release}")
    process = start_cli(["run", str(config)], environment, log := tmp_path / "run.log")
    wait_for(lambda: release.with_name("release.started").exists(), process, log, "the judging job to be held")
    s3["server"].stop()
    release.touch()
    wait_for(lambda: held_job_retried(log.read_text()), process, log, "the held job to fail on the outage")
    # moto keeps its buckets in the process: a new server on the same port serves the same objects.
    restarted = ThreadedMotoServer(ip_address="127.0.0.1", port=s3["port"])
    restarted.start()
    s3["server"] = restarted
    assert process.wait(timeout=600) == 0, log.read_text()[-4000:]
    text = log.read_text()
    assert held_job_retried(text) and "Retries are exhausted" not in text
    # Nothing lost or duplicated: one table and one marker per job, every table readable, the manifests whole.
    keys = all_keys(s3["client"])
    for stage in ("responses", "judgments", "meta_judgments"):
        tables = [k for k in keys if f"/iter-1/{stage}/shard-" in k and k.endswith(".parquet")]
        markers = [k for k in keys if f"/iter-1/{stage}/shard-" in k and k.endswith(".json")]
        assert len(tables) == len(markers) == 3, stage
        manifest = json.loads(s3["client"].get_object(
            Bucket="campaigns", Key=f"outage/tiny/iter-1/{stage}/manifest.json")["Body"].read())
        assert sorted(shard["uri"].removeprefix("s3://campaigns/") for shard in manifest["shards"].values()) == sorted(
            tables)
    for key in keys:
        if key.endswith(".parquet"):
            pl.read_parquet(f"s3://campaigns/{key}", storage_options=polars_options(s3))
    assert not any(key.endswith(".tmp") for key in keys)
    assert "Flow run 'tiny' - Finished in state Completed" in text


def held_job_retried(log: str) -> bool:
    """Whether the run's log says the held judging job failed and will be retried."""
    return any("judgments iter-1 shard-0001" in line and "Retry 1/" in line for line in log.splitlines())


def test_missing_bucket_and_unreachable_endpoint_fail_fast(tmp_path, tiny_model, s3):
    config = write_config(tmp_path, tiny_model, "s3://no-such-bucket/x")
    started = time.monotonic()
    result = run_cli(["run", str(config)], cli_environment(tmp_path / "prefect", **s3["env"]))
    assert result.returncode == 2 and "s3://no-such-bucket/x: bucket or folder does not exist" in result.stderr
    unreachable = {**s3["env"], "AWS_ENDPOINT_URL_S3": f"http://127.0.0.1:{free_port()}"}
    config = write_config(tmp_path, tiny_model, "s3://campaigns/x")
    result = run_cli(["run", str(config)], cli_environment(tmp_path / "prefect", **unreachable))
    assert result.returncode == 2 and "s3://campaigns/x: unreachable" in result.stderr, result.stderr[-2000:]
    assert "Beginning flow run" not in result.stderr
    assert time.monotonic() - started < 90


def test_store_writes_are_atomic_on_s3(s3):
    store = ArtifactStore("s3://campaigns/atomic")
    ref = store.write_table("t.parquet", pl.DataFrame({"a": [1, 2, 3]}))
    assert ref.rows == 3 and store.read_table(ref.uri)["a"].to_list() == [1, 2, 3]

    class Boom(Exception):
        pass

    def failing_frames():
        raise Boom

    with pytest.raises(Boom):
        store.write_table("half.parquet", pl.DataFrame({"a": failing_frames()}))
    assert not store.exists("half.parquet")
    assert store.list("") == ["t.parquet"]


THROTTLES = ((503, "SlowDown"), (429, "TooManyRequestsException"))
"""What the proxy answers to each object's first PUTs: S3's throttling answer, then a 429 with a code botocore's
standard and adaptive modes know as throttling (they retry a 429 by its code, not its status)."""


class ThrottlingProxy:
    """A real HTTP endpoint in front of moto's server that answers the first PUTs of every object as a throttling
    store does — `throttles` in turn, (status, error code) — and forwards everything else; it counts the throttled
    answers and, per object key, the PUTs it let through to moto."""

    def __init__(self, upstream: str, throttles: tuple[tuple[int, str], ...] = THROTTLES):
        self.upstream, self.throttles = upstream, throttles
        self.throttled = 0
        self.attempts: Counter[str] = Counter()
        self.stored: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._client = httpx.Client(timeout=30)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # answers botocore's "Expect: 100-continue" before it sends a body

            def log_message(self, *_):
                pass

            def _forward(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                key = self.path.split("?")[0]
                if self.command == "PUT":
                    with proxy._lock:
                        attempt = proxy.attempts[key]
                        proxy.attempts[key] += 1
                        throttle = attempt < len(proxy.throttles)
                        proxy.throttled += throttle
                    if throttle:
                        status, code = proxy.throttles[attempt]
                        # A message s3fs does not recognise: its own retry loop must not be what heals the write.
                        self._answer(status, {"Content-Type": "application/xml"},
                                     f"<Error><Code>{code}</Code><Message>Throttled.</Message></Error>".encode())
                        return
                headers = {name: value for name, value in self.headers.items()
                           if name.lower() not in ("host", "expect")}
                reply = proxy._client.request(self.command, proxy.upstream + self.path, headers=headers, content=body)
                if self.command == "PUT" and reply.status_code == 200:
                    with proxy._lock:
                        proxy.stored[key] += 1
                self._answer(reply.status_code, {name: value for name, value in reply.headers.items() if name.lower()
                                                 not in ("content-length", "transfer-encoding", "connection",
                                                         "content-encoding")}, reply.content)

            def _answer(self, status: int, headers: dict[str, str], payload: bytes):
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(payload)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        # Bound and listening before the constructor returns: a client can connect from then on.
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def __enter__(self) -> ThrottlingProxy:
        return self

    def __exit__(self, *_) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._client.close()


BURST_SECONDS = 20
"""How long a burst of 8 shard writes, each throttled twice, may take with the store's default retry mode (standard:
at most 1 + 2 s of backoff per write; measured 2.2–3.0 s on a loaded 2-core machine, ~20 s in adaptive mode)."""


def test_a_burst_of_throttled_shard_writes_is_retried_by_botocore_and_nothing_is_written_twice(s3, monkeypatch,
                                                                                               caplog):
    tables = {f"iter-1/judgments/shard-{shard:04d}.parquet": pl.DataFrame({"shard": [shard] * 100, "row": range(100)})
              for shard in range(8)}
    monkeypatch.delenv("AWS_RETRY_MODE", raising=False)  # the store's defaults
    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)
    with ThrottlingProxy(s3["endpoint"]) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.endpoint)
        store = ArtifactStore("s3://campaigns/throttled")
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=len(tables)) as pool:  # one burst, as a stage's shard jobs write
            refs = dict(zip(tables, pool.map(store.write_table, tables, tables.values()), strict=True))
        elapsed = time.monotonic() - started
    assert proxy.throttled == len(THROTTLES) * len(tables)  # every shard's PUT met a 503 SlowDown, then a 429
    assert elapsed < BURST_SECONDS
    # Each shard stored exactly once, with the bytes its reference records (read from moto, not through the store).
    assert proxy.stored == Counter({f"/campaigns/throttled/{key}": 1 for key in tables})
    assert sorted(all_keys(s3["client"])) == sorted(f"throttled/{key}" for key in tables)
    for key, table in tables.items():
        body = s3["client"].get_object(Bucket="campaigns", Key=f"throttled/{key}")["Body"].read()
        assert (hashlib.blake2b(body, digest_size=8).hexdigest(), len(body)) == (refs[key].digest, refs[key].size)
        assert pl.read_parquet(io.BytesIO(body)).equals(table)
    # botocore healed each write within one call (its RetryAttempts), and the run's log says which were throttled.
    retried = sorted(r.getMessage() for r in caplog.records if r.name == "metareward.artifacts.store")
    assert [line.split(" answered ")[0] for line in retried] == [f"S3 PutObject {proxy.endpoint}/campaigns/throttled/"
                                                                  f"{key}" for key in sorted(tables)]
    assert all(f" answered 200 after {len(THROTTLES)} retries " in line for line in retried)

    # It is the configured botocore that heals a 429 (s3fs's loop retries SlowDown only): one attempt, and it fails.
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with ThrottlingProxy(s3["endpoint"], throttles=THROTTLES[1:]) as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", proxy.endpoint)
        with pytest.raises(OSError, match="TooManyRequestsException"):
            ArtifactStore("s3://campaigns/one-attempt").write_table("t.parquet", tables[next(iter(tables))])
    assert proxy.throttled == 1 and proxy.stored == Counter()
