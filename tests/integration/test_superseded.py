"""A changed setting leaves each stage's folder with its current tables alone: a glob of it reads every row once,
`metareward tables` lists the same tables, a setting changed back finds its old tables again, `metareward gc`
removes what was superseded."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from metareward.pipeline.superseded import SUPERSEDED_FOLDER
from tests.integration.campaigns import cli_environment, run_cli, write_config


def manifests(root: Path, campaign: str) -> dict[str, dict]:
    """Every stage manifest of the campaign, by "iter-T/stage"."""
    return {str(path.parent.relative_to(root / campaign)): json.loads(path.read_text())
            for path in sorted((root / campaign).glob("iter-*/*/manifest.json"))}


def assert_globs_equal_manifests(root: Path, campaign: str) -> None:
    """For every stage: its folder's Parquet files are exactly the manifest's shards, and a glob reads its rows."""
    for stage, manifest in manifests(root, campaign).items():
        listed = sorted(shard["uri"] for shard in manifest["shards"].values())
        assert sorted(str(path) for path in (root / campaign / stage).glob("*.parquet")) == listed, stage
        assert pl.read_parquet(str(root / campaign / stage / "*.parquet")).height == manifest["rows"], stage


def markers(root: Path, campaign: str) -> dict[str, str]:
    """finished_at of every job marker in the stages' folders, by file name."""
    return {path.name: json.loads(path.read_text())["finished_at"]
            for path in (root / campaign).glob("iter-*/*/*.json") if path.name != "manifest.json"}


def test_a_changed_setting_moves_superseded_tables_out_of_the_glob_and_back(tmp_path, tiny_model):
    root = tmp_path / "artifacts"
    env = cli_environment(tmp_path / "prefect")
    first = run_cli(["run", str(write_config(tmp_path, tiny_model, str(root)))], env)
    assert first.returncode == 0, first.stderr[-3000:]
    original = markers(root, "tiny")
    assert not (root / "tiny" / SUPERSEDED_FOLDER).exists()

    # The judge's temperature changes: judgments and everything downstream of them are computed anew.
    hotter = write_config(tmp_path, tiny_model, str(root), iteration_overrides={"judge_sampling": {
        "max_tokens": 12, "temperature": 1.0}})
    second = run_cli(["run", str(hotter)], env)
    assert second.returncode == 0, second.stderr[-3000:]
    output = second.stdout + second.stderr
    assert "superseded file(s) moved out of the stage's folder" in output
    assert_globs_equal_manifests(root, "tiny")
    away = root / "tiny" / SUPERSEDED_FOLDER / "iter-1"
    recomputed = {path.parent.name for path in away.glob("*/*.parquet")}
    assert recomputed == {"judgments", "actor_pairs", "meta_judgments", "judgment_elo", "judge_pairs", "dpo_dataset",
                          "checkpoint"}
    assert len(list((away / "judgments").glob("*.parquet"))) == 3  # the 3 shards of 2 prompts
    judgments = manifests(root, "tiny")["iter-1/judgments"]
    assert judgments["rows"] == 6 * 3 * 3

    listed = run_cli(["tables", "tiny", "--artifact-root", str(root)], env)
    assert listed.returncode == 0, listed.stderr
    uris = listed.stdout.split()
    assert sorted(uris) == sorted(shard["uri"] for manifest in manifests(root, "tiny").values()
                                  for shard in manifest["shards"].values())
    assert "/iter-1/prompts/" in uris[0] and "/iter-1/checkpoint/" in uris[-1]  # in the registry's order
    only = run_cli(["tables", "tiny", "judgments", "--iteration", "1", "--artifact-root", str(root)], env)
    assert only.stdout.split() == sorted(shard["uri"] for shard in judgments["shards"].values())
    unknown = run_cli(["tables", "tiny", "judgments", "--iteration", "7", "--artifact-root", str(root)], env)
    assert unknown.returncode == 2 and "no judgments iteration 7 of campaign 'tiny'" in unknown.stderr

    from metareward.pipeline.manifests import read_stage
    assert read_stage(str(root), "tiny", "judgments", iteration=1).equals(
        pl.read_parquet(str(root / "tiny/iter-1/judgments/*.parquet")))

    # Back to the first temperature: the superseded jobs move back, none is computed again.
    third = run_cli(["run", str(write_config(tmp_path, tiny_model, str(root)))], env)
    assert third.returncode == 0, third.stderr[-3000:]
    assert markers(root, "tiny") == original
    assert_globs_equal_manifests(root, "tiny")
    hot_model = sorted(path.name for path in (away / "checkpoint").glob("*.json"))
    assert len(hot_model) == 1
    hot_folder = root / "tiny/iter-1/checkpoint" / hot_model[0].removesuffix(".json")
    assert (hot_folder / "model").is_dir()

    superseded_files = len([path for path in away.rglob("*") if path.is_file()])
    dry = run_cli(["gc", "tiny", "--dry-run", "--artifact-root", str(root)], env)
    assert dry.returncode == 0, dry.stderr
    assert "would remove" in dry.stderr and f"{hot_folder}/" in dry.stdout.split()
    assert hot_folder.is_dir() and away.is_dir()
    collected = run_cli(["gc", "tiny", "--artifact-root", str(root)], env)
    assert collected.returncode == 0, collected.stderr
    assert (f"removed {superseded_files} superseded file(s) and 1 superseded model/checkpoint folder(s)"
            in collected.stderr)
    assert not (root / "tiny" / SUPERSEDED_FOLDER).exists() and not hot_folder.exists()
    current = json.loads(next((root / "tiny/iter-1/checkpoint").glob("*.json")).read_text())
    assert (Path(current["stats"]["model_uri"]) / "model_id.txt").is_file()
    assert markers(root, "tiny") == original
