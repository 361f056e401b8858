"""The paper's per-iteration schedule (A.3), and the settings a config leaves at a default that departs from it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

PAPER_EPOCHS = 10
"""Epochs every DPO training's schedule spans (paper A.3); the kept epoch below is one of these."""

PAPER_SCHEDULE: dict[str, tuple[dict[str, Any], ...]] = {
    # A.3, Meta-Rewarding: judge pairs in iterations 1–2; ρ 0 → 0.32 → 0.32 → 0.4; chosen response ≤ 2500 chars in
    # iteration 1; chosen judgment ≤ 1100 then 1000 chars; epochs 6, 4, 2, 2 kept.
    "meta_rewarding": (
        {"train_judge": True, "rho": 0.0, "max_chosen_response_chars": 2500, "max_chosen_judgment_chars": 1100,
         "checkpoint_epoch": 6},
        {"train_judge": True, "rho": 0.32, "max_chosen_response_chars": None, "max_chosen_judgment_chars": 1000,
         "checkpoint_epoch": 4},
        {"train_judge": False, "rho": 0.32, "max_chosen_response_chars": None, "checkpoint_epoch": 2},
        {"train_judge": False, "rho": 0.4, "max_chosen_response_chars": None, "checkpoint_epoch": 2},
    ),
    # A.3, Self-Rewarding (the baseline, which never trains the judge): ρ 0, 0, 0, 0.1; chosen response ≤ 2500
    # chars in iteration 1; epochs 5, 1, 2, 2 kept.
    "self_rewarding": (
        {"rho": 0.0, "max_chosen_response_chars": 2500, "checkpoint_epoch": 5},
        {"rho": 0.0, "max_chosen_response_chars": None, "checkpoint_epoch": 1},
        {"rho": 0.0, "max_chosen_response_chars": None, "checkpoint_epoch": 2},
        {"rho": 0.1, "max_chosen_response_chars": None, "checkpoint_epoch": 2},
    ),
}
"""What the paper sets in each of its 4 iterations, by mode: train_judge, ρ, the length filters and the DPO epoch kept
(of PAPER_EPOCHS). None is "no filter"; a setting an iteration does not list (the judge filter of an iteration that
trains no judge) has no value in the paper."""


class PaperScheduleWarning(UserWarning):
    """A config leaves a setting of the paper's schedule at a default that is not the paper's value there."""


def schedule_departures(mode: str, iterations: Sequence[Any]) -> list[str]:
    """One line per setting of iterations 1–4 (the config's IterationConfig objects, typed loosely: campaign.py,
    which defines them, imports this module) that the config does not set and whose default is not what the paper
    uses in that iteration (PAPER_SCHEDULE), e.g. "iterations[2].train_judge: true (the default in mode
    meta_rewarding); the paper: false". Settings the config sets are its own choice and never listed; the kept
    epoch is listed only where the schedule spans the paper's 10 epochs, and the judge-length filter only where
    the iteration trains the judge. train_judge counts as unset while it is None (before the mode fills it in)."""
    lines = []
    for index, (iteration, paper) in enumerate(zip(iterations, PAPER_SCHEDULE[mode], strict=False)):
        where = f"iterations[{index}]"
        trains_judge = iteration.train_judge if iteration.train_judge is not None else mode == "meta_rewarding"
        if iteration.train_judge is None and "train_judge" in paper and trains_judge != paper["train_judge"]:
            lines.append(f"{where}.train_judge: {_shown(trains_judge)} (the default in mode {mode}); "
                         f"the paper: {_shown(paper['train_judge'])}")
        for name in ("rho", "max_chosen_response_chars", "max_chosen_judgment_chars"):
            applies = name in paper and (name != "max_chosen_judgment_chars" or trains_judge)
            default = getattr(iteration, name)
            if applies and name not in iteration.model_fields_set and default != paper[name]:
                lines.append(f"{where}.{name}: {_shown(default)} (the default); the paper: {_shown(paper[name])}")
        dpo = iteration.dpo
        if "checkpoint_epoch" not in dpo.model_fields_set and dpo.num_epochs == PAPER_EPOCHS and (
                dpo.kept_epoch != paper["checkpoint_epoch"]):
            lines.append(f"{where}.dpo.checkpoint_epoch: {_shown(dpo.checkpoint_epoch)} (the default: epoch "
                         f"{dpo.kept_epoch} of {dpo.num_epochs} kept); the paper: {paper['checkpoint_epoch']}")
    return lines


def _shown(value: Any) -> str:
    if value is None:
        return "none"
    return str(value).lower() if isinstance(value, bool) else str(value)
