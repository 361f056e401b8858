"""The `metareward` console script's config and prompt checks."""

import subprocess
import sys
from pathlib import Path

from cli import main

REPO = Path(__file__).resolve().parents[2]


def test_config_show_prints_every_default(capsys):
    assert main(["config", "show", str(REPO / "deployments/configs/paper-llama3-8b.yaml")]) == 0
    out = capsys.readouterr().out
    assert "temperature: 0.8" in out and "beta: 0.1" in out


def test_config_error_exits_2_with_field(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("name: c\nmodel: {path: m}\nprompts: {path: p}\niterations: [{rho: 0.7}]\n")
    assert main(["config", "show", str(path)]) == 2
    assert "iterations[0].rho" in capsys.readouterr().err


def test_console_script_checks_prompts():
    result = subprocess.run(
        [sys.executable, "-m", "cli", "prompts", "check", str(REPO / "deployments/prompts/assistant-100.jsonl")],
        capture_output=True, text=True, check=True,
    )
    assert "100 prompts" in result.stdout


def test_stages_command_prints_the_registry_and_a_configs_settings(capsys):
    assert main(["stages", str(REPO / "deployments/configs/demo.yaml"), "--iteration", "2"]) == 0
    out = capsys.readouterr().out
    assert "judgments  <- prompts, responses  (per shard, runs M_t)  code v1-" in out
    assert 'verdict_mode="forced"' in out and "rho=0.32" in out and "train_judge=false" in out
    assert "block_sizes=[6, 6]" in out
