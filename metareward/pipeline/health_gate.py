"""The health gate of an iteration (no Prefect): the decision taken when its checks fail — continue, drop the judge
pairs, keep M_t, or stop — kept in the store beside the iteration's tables, so that a re-run of the campaign goes
on with the decision already given for the same data instead of asking again, and what each decision does to the
stages after it."""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import asdict, dataclass, field
from typing import get_args

from metareward.artifacts.store import ArtifactStore
from metareward.config.sections import HealthChoice
from metareward.paper.report import HealthCheck

CHOICES: tuple[str, ...] = get_args(HealthChoice)
"""What a person (or health.on_timeout) may decide when an iteration's health checks fail, in the order offered."""

CHECKS_PASSED = "the health checks (all passed)"
"""Who decided `continue` when no check failed."""

CHOICE_MEANING: dict[str, str] = {
    "continue": "train on the DPO set as it is",
    "drop_judge_pairs": "train on the actor pairs only (the judge pairs are left out of the DPO set)",
    "keep_model": "skip this iteration's training: M_{t+1} = M_t",
    "stop": "stop the campaign before training",
}


@dataclass(frozen=True)
class Decision:
    """What was decided for iteration `iteration`, on the data whose table digests are `data`: `choice` (one of
    CHOICES), a person's `note`, who decided (`decided_by`: "the Prefect UI", "the terminal", "health.on_timeout
    after 3600 s", "health.action warn", …), the failed checks it answered and when."""

    iteration: int
    choice: str
    decided_by: str
    data: dict[str, list[str]]
    note: str = ""
    checks: list[dict] = field(default_factory=list)
    at: str = ""

    def __post_init__(self):
        if self.choice not in CHOICES:
            raise ValueError(f"health decision {self.choice!r} is not one of {list(CHOICES)}")

    @property
    def drops_judge_pairs(self) -> bool:
        """The DPO set is built from the actor pairs alone."""
        return self.choice == "drop_judge_pairs"

    @property
    def keeps_model(self) -> bool:
        """The iteration does not train: M_{t+1} is M_t."""
        return self.choice == "keep_model"

    def brief(self) -> dict[str, str]:
        """The choice, who took it and the note: what an iteration's outcome carries (outcome["health_decision"])."""
        return {"choice": self.choice, "decided_by": self.decided_by, "note": self.note}

    def summary(self) -> str:
        """One line: the decision, what it does, who took it, and the note."""
        note = f'; note: "{self.note}"' if self.note else ""
        return f"{self.choice} ({CHOICE_MEANING[self.choice]}), decided by {self.decided_by}{note}"


def decision_key(campaign: str, iteration: int) -> str:
    """Where iteration t's decision is kept: beside its stages' folders."""
    return f"{campaign}/iter-{iteration}/health/decision.json"


def checks_record(checks: list[HealthCheck]) -> list[dict]:
    """The failed checks as the decision keeps them: metric, value, threshold, setting."""
    return [{"metric": check.metric, "value": check.value, "threshold": check.threshold, "setting": check.setting}
            for check in checks if check.failed]


def decided(choice: str, iteration: int, decided_by: str, data: dict[str, list[str]], checks: list[HealthCheck],
            note: str = "") -> Decision:
    """A decision taken now on `data` for the failed ones of `checks`."""
    return Decision(iteration, choice, decided_by, data, note.strip(), checks_record(checks),
                    dt.datetime.now(dt.UTC).isoformat(timespec="seconds"))


def record_decision(store: ArtifactStore, campaign: str, decision: Decision) -> str:
    """Keep the decision in the store (atomically, replacing an earlier one); returns its URI."""
    key = decision_key(campaign, decision.iteration)
    store.write_json(key, asdict(decision))
    return store.uri(key)


def recorded_decision(store: ArtifactStore, campaign: str, iteration: int,
                      data: dict[str, list[str]] | None = None) -> Decision | None:
    """Iteration t's decision from the store, or None when there is none — or, when `data` is given, when the one
    there was taken on other data (tables computed again since: the decision does not carry over to them)."""
    key = decision_key(campaign, iteration)
    if not store.exists(key):
        return None
    decision = Decision(**store.read_json(key))
    if data is not None and decision.data != data:
        return None
    return decision


def gated_data(**tables: list) -> dict[str, list[str]]:
    """The digests of the tables a decision is taken on, by stage (JobResults of the pairs stages; None for a stage
    that did not run): a decision holds for these tables and no others."""
    return {name: [result.table.digest for result in results] for name, results in sorted(tables.items()) if results}


def parse_choice(answer: str) -> tuple[str, str] | None:
    """A typed answer — a choice, its number in CHOICES (1-based) or a unique prefix, then an optional note after
    a space — as (choice, note); None when it names no single choice."""
    word, _, note = answer.strip().partition(" ")
    word = word.lower()
    if word.isdigit() and 1 <= int(word) <= len(CHOICES):
        return CHOICES[int(word) - 1], note.strip()
    matches = [choice for choice in CHOICES if choice.startswith(word)] if word else []
    return (matches[0], note.strip()) if len(matches) == 1 else None


def decision_json(decision: Decision) -> str:
    """The decision as indented JSON (the MLflow artifact and the summary's source)."""
    return json.dumps(asdict(decision), indent=2)


def decisions_markdown(store: ArtifactStore, campaign: str, iterations: int) -> str:
    """A markdown table of the health decisions kept for iterations 1..`iterations` of the campaign (those without
    one — every check passed, or not run yet — are left out)."""
    lines = [f"# {campaign}: health decisions", "", "| iteration | decision | decided by | note | failed checks |",
             "|---|---|---|---|---|"]
    for iteration in range(1, iterations + 1):
        decision = recorded_decision(store, campaign, iteration)
        if decision is not None:
            failed = "; ".join(f"{check['metric']} {check['value']:.1%} (threshold {check['threshold']:.1%})"
                               for check in decision.checks)
            lines.append(f"| {iteration} | {decision.choice} | {decision.decided_by} | {decision.note} | {failed} |")
    return "\n".join(lines) + "\n"
