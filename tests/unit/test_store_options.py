"""The S3 options of the artifact store: botocore's retry mode and attempts, from the environment or the defaults,
as the client botocore builds reads them (no endpoint is called)."""

from __future__ import annotations

import pytest

from metareward.artifacts.store import S3_MAX_ATTEMPTS, S3_RETRY_MODE, ArtifactStore, StoreError, s3_storage_options


@pytest.fixture(autouse=True)
def environment(monkeypatch):
    # Credentials in the environment: building a client must not look for them elsewhere (instance metadata).
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                        "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_RETRY_MODE", raising=False)
    monkeypatch.delenv("AWS_MAX_ATTEMPTS", raising=False)


def client_retries() -> dict:
    return ArtifactStore("s3://bucket/prefix").fs.s3.meta.config.retries


def test_defaults_reach_botocore_as_all_attempts():
    assert (S3_RETRY_MODE, S3_MAX_ATTEMPTS) == ("standard", 10)
    assert client_retries() == {"mode": "standard", "total_max_attempts": 10}


def test_botocore_variables_keep_their_meaning(monkeypatch):
    monkeypatch.setenv("AWS_RETRY_MODE", "adaptive")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    assert client_retries() == {"mode": "adaptive", "total_max_attempts": 3}  # 3 attempts, not 3 retries


@pytest.mark.parametrize("value", ["0", "ten", "-1"])
def test_attempts_that_are_not_a_whole_number_are_refused_naming_the_variable(monkeypatch, value):
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", value)
    with pytest.raises(StoreError, match=f"AWS_MAX_ATTEMPTS='{value}': give a whole number of attempts"):
        s3_storage_options()
