"""Stage names outside the registry are checked against it: a misspelt stage name would silently drop a metric, a
summary row or a figure (`tables.get("judgements")` is simply None). Every string in the library, the tasks, the
flows and the CLI that is close to a stage name (within a quarter of its length, at least one letter) must be a
stage of the registry, or a known word of another kind (a table column, a model role, a training kind) listed
below."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

from metareward.artifacts import tables
from metareward.pipeline.stages import MODEL_ROLES, STAGE
from metareward.tracking.metrics import STATISTICS
from metareward.tracking.record import LINKED_PAIRS

REPO = Path(__file__).resolve().parents[2]
REGISTRY = REPO / "metareward" / "pipeline" / "stages.py"


def distance(a: str, b: str) -> int:
    """Levenshtein distance."""
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def column_names() -> set[str]:
    return {column for value in vars(tables).values() if hasattr(value, "names") and callable(value.names)
            for column in value.names()}


NOT_STAGES = column_names() | set(MODEL_ROLES) | {
    "dpo",  # a training kind (trainer.py), like "sft"
    "prompt",  # the chat-message column of the pair tables
    "judgment", "response",  # singular nouns in messages
    "n_judgments",  # a column: judgments per response (preferences.py)
    "judgment_a", "judgment_b",  # the meta-judge prompt's placeholders (prompts.py)
    "checkpoints",  # the demo model's cache folder (models.py)
}
"""Words near a stage name that are not meant as one."""


def strings(path: Path) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            found.append((node.lineno, node.value))
    return found


def near_misses() -> list[str]:
    problems = []
    for folder in ("metareward", "tasks", "flows", "cli"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if path == REGISTRY:
                continue
            for line, text in strings(path):
                for word in {text, *text.split("/")}:
                    if not word.isidentifier() or word in STAGE or word in NOT_STAGES:
                        continue
                    close = [name for name in STAGE if distance(word, name) <= max(1, len(name) // 4)]
                    if close:
                        problems.append(f"{path.relative_to(REPO)}:{line}: {word!r} is not a stage (did you mean "
                                        f"{close[0]!r}?)")
    return problems


def test_every_string_near_a_stage_name_is_one():
    assert not near_misses()


def test_a_misspelt_stage_name_is_caught(tmp_path, monkeypatch):
    misspelt = tmp_path / "metareward" / "report.py"
    misspelt.parent.mkdir()
    misspelt.write_text('def share(tables):\n    return tables.get("judgements")\n')
    for folder in ("tasks", "flows", "cli"):
        (tmp_path / folder).mkdir()
    monkeypatch.setattr(sys.modules[__name__], "REPO", tmp_path)
    assert near_misses() == ["metareward/report.py:2: 'judgements' is not a stage (did you mean 'judgments'?)"]


def test_the_stage_keyed_tables_of_tracking_name_registered_stages():
    assert {stage for stage, _ in STATISTICS} <= set(STAGE)
    assert set(LINKED_PAIRS.values()) <= set(STAGE)
