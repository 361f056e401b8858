"""One seed for both methods: the demo's Meta-Rewarding campaign and its Self-Rewarding baseline on one artifact
root start from the same M_1, trained once by the first and reused by the second; a campaign that trained its M_1
in its own folder, before seeds were shared, resumes with it. The seed stages run as the seed flow runs them
(run_job on the tiny model), without Prefect."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

import metareward.pipeline.jobs as jobs
from metareward.artifacts.store import open_store
from metareward.config.campaign import CampaignConfig
from metareward.pipeline.context import ModelRef
from metareward.pipeline.jobs import SEED_FOLDER, JobResult, plan_job, run_job
from metareward.pipeline.manifests import write_manifest
from metareward.pipeline.model_roles import starting_model
from metareward.pipeline.summary import job_line
from metareward.training.models import model_id_of
from tests.conftest import REPO

pytestmark = pytest.mark.slow


def shipped(config_file: str, tiny_model: Path, root: Path) -> CampaignConfig:
    """A shipped demo config with the tiny model as its base model, on `root`, with a one-epoch seed SFT on the
    shipped example file (the evaluation left out: only the seed runs here)."""
    raw = yaml.safe_load((REPO / "deployments" / "configs" / config_file).read_text())
    raw["model"]["path"] = str(tiny_model)
    raw["prompts"]["path"] = str(REPO / raw["prompts"]["path"])
    raw["artifact_root"] = str(root)
    raw.pop("evaluation")
    raw["sft"] = {"path": str(REPO / "deployments/sft/eft-example.jsonl"), "num_epochs": 1, "checkpoint_epoch": 1,
                  "global_batch_size": 8, "per_device_batch_size": 4, "learning_rate": 1e-3}
    return CampaignConfig.from_dict(raw)


def run_seed(config: CampaignConfig) -> JobResult:
    """The seed stages as the seed flow runs them — sft_data, then sft on the base model, each stage's manifest
    written under the campaign — returning the sft job's result."""
    store = open_store(config.artifact_root)
    examples = run_job(config, plan_job(config, "sft_data", 0, {}))
    base = ModelRef(config.model.path, model_id_of(config.model.path))
    seed = run_job(config, plan_job(config, "sft", 0, {"sft_data": [examples]}, base))
    for result in (examples, seed):
        write_manifest(store, config.name, [result.job], [result])
    return seed


def test_meta_rewarding_and_its_baseline_start_from_one_m1_trained_once(tmp_path, tiny_model):
    root = tmp_path / "artifacts"
    meta_rewarding = shipped("demo.yaml", tiny_model, root)
    baseline = shipped("self-rewarding-demo.yaml", tiny_model, root)
    assert (meta_rewarding.name, baseline.name) == ("demo", "demo-self-rewarding")

    trained = run_seed(meta_rewarding)
    assert not trained.cached and trained.job.key.startswith(f"{SEED_FOLDER}/sft/")
    marker = root / f"{trained.job.key}.json"
    finished_at = json.loads(marker.read_text())["finished_at"]

    reused = run_seed(baseline)
    # Found in the store, not trained again: the same job, table and model, and the marker the first one wrote.
    assert reused.cached and reused.computed_by == "demo" and reused.job.campaign == "demo-self-rewarding"
    assert (reused.job.key, reused.table.digest) == (trained.job.key, trained.table.digest)
    assert json.loads(marker.read_text())["finished_at"] == finished_at
    assert len(list((root / SEED_FOLDER / "sft").glob("*.json"))) == 1
    assert not list(root.glob("*/iter-0/*/*.parquet"))  # no campaign keeps a seed table of its own
    # Both campaigns' iteration 1 starts from M_1 with the same digest: the comparison starts from one model.
    m1 = trained.stats["model_uri"]
    assert starting_model(meta_rewarding, 1) == starting_model(baseline, 1) == m1
    assert model_id_of(m1) == trained.stats["model_id"] == reused.stats["model_id"] != model_id_of(str(tiny_model))
    # The run's log says it was reused, from whom and where.
    line = job_line(reused)
    assert "reused from campaign demo" in line and m1 in line and str(root / SEED_FOLDER / "sft") in line
    assert "reused" not in job_line(run_seed(meta_rewarding))  # its own campaign finds it as its own


def test_a_campaign_that_trained_its_m1_in_its_own_folder_resumes_with_it(tmp_path, tiny_model, monkeypatch):
    root = tmp_path / "artifacts"
    config = shipped("demo.yaml", tiny_model, root)
    with monkeypatch.context() as before_sharing:
        before_sharing.setattr(jobs, "SEED_STAGES", ())  # the seed stages planned as they were: in the campaign
        trained = run_seed(config)
    assert not trained.cached and trained.job.key.startswith("demo/iter-0/sft/")

    resumed = run_seed(config)
    assert resumed.cached and resumed.job.key == trained.job.key  # found where it was, not trained again
    assert not (root / SEED_FOLDER).exists()
    assert starting_model(config, 1) == trained.stats["model_uri"]
