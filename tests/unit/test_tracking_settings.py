"""Tracking settings without a server: where the local store goes, params without credentials."""


from metareward.config import CampaignConfig
from metareward.lineage import flatten_params
from metareward.tracking import config_digest, tracking_target


def config(tmp_path, **overrides) -> CampaignConfig:
    return CampaignConfig.from_dict({"name": "c", "model": {"path": "m"}, "prompts": {"path": "p.jsonl"},
                                     "artifact_root": str(tmp_path / "art"), "iterations": [{}], **overrides})


def test_default_store_is_sqlite_beside_local_artifacts_with_explicit_artifact_location(tmp_path):
    uri, location = tracking_target(config(tmp_path))
    assert uri == f"sqlite:///{tmp_path / 'art' / '_mlflow' / 'mlflow.db'}"
    assert location == (tmp_path / "art" / "_mlflow" / "artifacts").as_uri()


def test_server_uri_from_environment_keeps_the_servers_artifact_location(tmp_path):
    settings = config(tmp_path).with_environment({"MLFLOW_TRACKING_URI": "http://mlflow:5000"})
    assert tracking_target(settings) == ("http://mlflow:5000", None)


def test_params_are_flat_and_carry_no_credentials(tmp_path):
    params = flatten_params({"inference": {"base_url": "http://user:s3cret@host:8000/v1", "api_key_env": "KEY"},
                             "iterations": [{"rho": 0.0}, {"rho": 0.32}], "hf_token": "hf_abc",
                             "vllm_args": ["--max-num-seqs", "8"]})
    assert params == {"inference.base_url": "http://***@host:8000/v1", "inference.api_key_env": "KEY",
                      "iterations.0.rho": "0.0", "iterations.1.rho": "0.32",
                      "vllm_args": '["--max-num-seqs", "8"]'}


def test_campaign_run_identity_ignores_tracking_settings(tmp_path):
    base = config(tmp_path)
    assert config_digest(base) == config_digest(config(tmp_path, tracking={"uri": "http://elsewhere"}))
    assert config_digest(base) != config_digest(config(tmp_path, seed=1))
