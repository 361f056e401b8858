"""Code fingerprints: an edit recomputes exactly the stages whose runners reach the edited code, and a comment,
a docstring, a type hint, reformatting or any change to tracking, reporting or evaluation code recomputes nothing."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from metareward.pipeline.fingerprints import CodeIndex
from metareward.pipeline.stages import STAGES

PACKAGE = Path(__file__).resolve().parents[2] / "metareward"


def fingerprints(root: Path) -> dict[str, str]:
    index = CodeIndex(root)
    return {entry.name: index.fingerprint([(entry.runner.__module__, entry.runner.__name__)]) for entry in STAGES}


@pytest.fixture(scope="module")
def original() -> dict[str, str]:
    return fingerprints(PACKAGE.parent)


def edited(tmp_path: Path, module: str, old: str, new: str) -> dict[str, str]:
    """Fingerprints of a copy of the package with `old` replaced by `new` (once) in metareward/{module}."""
    shutil.copytree(PACKAGE, tmp_path / "metareward", ignore=shutil.ignore_patterns("__pycache__"))
    path = tmp_path / "metareward" / module
    text = path.read_text()
    assert text.count(old) >= 1, f"{old!r} not in {module}"
    path.write_text(text.replace(old, new, 1))
    return fingerprints(tmp_path)


def changed(original: dict[str, str], after: dict[str, str]) -> set[str]:
    return {name for name in original if original[name] != after[name]}


def test_every_runner_has_its_own_fingerprint(original):
    runners = {entry.runner for entry in STAGES}
    assert len(set(original.values())) == len(runners) > 1
    assert original["eval_answers"] == original["reference_answers"]  # one runner, two models


def test_tracking_code_recomputes_nothing_comment_or_not(tmp_path, original):
    assert changed(original, edited(tmp_path / "a", "tracking/tracker.py", "import hashlib\n",
                                    "import hashlib  # a comment\n")) == set()
    assert changed(original, edited(tmp_path / "b", "tracking/tracker.py", "def _millis() -> int:\n",
                                    "def _seconds() -> float:\n    return 0.0\n\n\ndef _millis() -> int:\n")) == set()


def test_comments_docstrings_type_hints_and_layout_recompute_nothing(tmp_path, original):
    assert changed(original, edited(tmp_path / "a", "inference/roles.py", '    stats = StageStats("generate")\n',
                                    '    # why, not what\n    stats = StageStats("generate")\n')) == set()
    assert changed(original, edited(tmp_path / "b", "inference/roles.py", "counted. Returns the responses table",
                                    "counted; it returns the responses table")) == set()
    assert changed(original, edited(tmp_path / "c", "paper/preferences.py",
                                    "def score_responses(judgments: pl.DataFrame)",
                                    "def score_responses(judgments: 'pl.LazyFrame')")) == set()
    assert changed(original, edited(tmp_path / "d", "paper/elo.py",
                                    "def positional_weights(win_first: int, win_second: int)",
                                    "def positional_weights(\n    win_first: int,\n    win_second: int,\n)")) == set()


def test_a_new_schema_or_report_code_recomputes_nothing(tmp_path, original):
    assert changed(original, edited(tmp_path / "a", "artifacts/tables.py", "DPO_DATASET = pl.Schema(",
                                    'EVAL_WIN_RATE = pl.Schema({"prompt_id": pl.String})\n'
                                    'DPO_DATASET = pl.Schema(')) == set()
    assert changed(original, edited(tmp_path / "b", "paper/report.py", "    report: dict[str, float] = {}\n",
                                    "    report: dict[str, float] = {'x': 1.0}\n")) == set()
    assert changed(original, edited(tmp_path / "c", "pipeline/evaluation.py", "bootstrap: int = 1000, seed: int = 0",
                                    "bootstrap: int = 2000, seed: int = 0")) == set()


def test_code_recomputes_exactly_the_stages_that_reach_it(tmp_path, original):
    assert changed(original, edited(tmp_path / "a", "paper/preferences.py", 'stats = StageStats("judge_pairs")',
                                    'stats = StageStats("judge-pairs")')) == {"judge_pairs"}
    assert changed(original, edited(tmp_path / "b", "paper/selection.py", "def select_actor_pair(",
                                    "def _unused():\n    pass\n\n\ndef select_actor_pair(")) == set()
    assert changed(original, edited(tmp_path / "c", "paper/elo.py", "RIDGE = ", "RIDGE = 2 * ")) == {"judgment_elo"}
    assert changed(original, edited(tmp_path / "d", "training/process.py", "logging_steps=1,", "logging_steps=2,")) == {
        "checkpoint", "sft"}
    assert changed(original, edited(tmp_path / "e", "inference/vllm_backend.py", "def _group_alive(",
                                    "def _group_alive(unused, ")) == {
        "responses", "judgments", "meta_judgments", "eval_answers", "reference_answers", "win_rate"}
    assert changed(original, edited(tmp_path / "f", "host/ports.py", "def free_port() -> int:",
                                    "def free_port(start: int = 0) -> int:")) == {
        "responses", "judgments", "meta_judgments", "eval_answers", "reference_answers", "win_rate", "checkpoint",
        "sft"}


def test_a_template_recomputes_the_stages_that_render_it(tmp_path, original):
    assert changed(original, edited(tmp_path / "a", "paper/prompts.py",
                                    "Briefly justify your total score, up to 100 words.",
                                    "Briefly justify your total score, up to 50 words.")) == {
        "judgments", "judge_pairs", "sft_data"}
    assert changed(original, edited(tmp_path / "b", "paper/prompts.py", "Explain which judgment is more accurate",
                                    "Say which judgment is more accurate")) == {"meta_judgments"}
    assert changed(original, edited(tmp_path / "c", "paper/prompts.py", "- Add 1 point if", "- Add one point if")) == {
        "judgments", "meta_judgments", "judge_pairs", "sft_data"}
    assert changed(original, edited(tmp_path / "d", "paper/prompts.py", "Evaluate the models based on",
                                    "Evaluate the two models based on")) == {"win_rate"}
