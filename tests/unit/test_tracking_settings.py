"""Tracking settings without a server: where the local store goes, params without credentials."""


from metareward.config.campaign import CampaignConfig
from metareward.tracking.lineage import flatten_params
from metareward.tracking.tracker import config_digest, tracking_target


def config(tmp_path, **overrides) -> CampaignConfig:
    return CampaignConfig.from_dict({"name": "c", "model": {"path": "m"}, "prompts": {"path": "p.jsonl"},
                                     "artifact_root": str(tmp_path / "art"), "iterations": [{}], **overrides})


def test_default_store_is_sqlite_beside_local_artifacts_with_explicit_artifact_location(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    uri, location = tracking_target(config(tmp_path))
    assert uri == f"sqlite:///{tmp_path / 'art' / '_mlflow' / 'mlflow.db'}"
    assert location == (tmp_path / "art" / "_mlflow" / "artifacts").as_uri()


def test_server_uri_from_environment_keeps_the_servers_artifact_location(tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://user:s3cret@mlflow:5000")
    settings = config(tmp_path).with_environment()
    assert tracking_target(settings) == ("http://user:s3cret@mlflow:5000", None)
    # Read where it is used, never copied into the config (which Prefect and MLflow store).
    assert settings.tracking.uri is None and "s3cret" not in settings.to_yaml()


def test_credentials_in_a_config_are_refused_with_the_way_to_give_them(tmp_path):
    from metareward.config.campaign import ConfigError

    for overrides, field, fix in (
        ({"tracking": {"uri": "http://user:s3cret@mlflow:5000"}}, "tracking.uri", "MLFLOW_TRACKING_PASSWORD"),
        ({"artifact_root": "s3://key:s3cret@bucket/x"}, "artifact_root", "AWS_SECRET_ACCESS_KEY"),
        ({"inference": {"backend": "openai", "base_url": "http://u:s3cret@host:8000"}}, "inference.base_url",
         "api_key_env"),
    ):
        try:
            config(tmp_path, **overrides)
        except ConfigError as error:
            assert field in str(error) and "password" in str(error) and fix in str(error)
            assert "s3cret" not in str(error)
        else:
            raise AssertionError(f"{field} with a password was accepted")
    # METAREWARD_ARTIFACT_ROOT is validated like the config's own root.
    try:
        config(tmp_path).with_environment({"METAREWARD_ARTIFACT_ROOT": "s3://key:s3cret@bucket"})
    except ConfigError as error:
        assert "METAREWARD_ARTIFACT_ROOT" in str(error)
    else:
        raise AssertionError("METAREWARD_ARTIFACT_ROOT with a password was accepted")


def test_openai_base_url_is_normalised(tmp_path):
    settings = config(tmp_path, inference={"backend": "openai", "base_url": "http://host:8000/v1/"})
    assert settings.inference.base_url == "http://host:8000"


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
