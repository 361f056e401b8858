"""The figures MLflow shows: judge scores per iteration (cf. the paper's Fig. 5), the meta-judge's biases over
iterations (cf. Table 5) and the win rate over iterations (cf. Fig. 3), as matplotlib figures (Agg, no display
needed)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import polars as pl

SCORES = tuple(range(6))
BIASES = {"higher_win": "higher score won", "lower_win": "lower score won",
          "position_a_same_score": "position A won (same scores)",
          "position_a_diff_score": "position A won (different scores)"}
"""Table 5's quantities (meta_judge/… metrics) and how the bias figure labels them."""


def score_figure(judgments: Mapping[str, pl.DataFrame], title: str):
    """Per label (an iteration): side-by-side bars of the share of valid judge scores at each score 0…5 (x from
    −0.5 to 5.5, so the end bars are whole), and on a second axis the density of each response's mean score —
    the reward DPO pairs are chosen by — as a line of the same colour. `judgments` has columns response_id and
    score; null and NaN scores are not valid. The legend sits above the plot, off the bars."""
    from matplotlib.figure import Figure
    from scipy.stats import gaussian_kde

    figure = Figure(figsize=(8, 4.6), dpi=110)
    bars = figure.subplots()
    rewards = bars.twinx()
    width = 0.8 / max(len(judgments), 1)
    grid = np.linspace(-0.5, 5.5, 601)
    for index, (label, table) in enumerate(judgments.items()):
        valid = table.filter(pl.col("score").is_not_null() & pl.col("score").is_not_nan())
        color = f"C{index}"
        scores = valid["score"].to_numpy()
        shares = [float(np.mean(scores == value)) if scores.size else 0.0 for value in SCORES]
        offset = (index - (len(judgments) - 1) / 2) * width
        bars.bar(np.asarray(SCORES) + offset, shares, width=width, color=color, alpha=0.85,
                 label=f"{label}: share of scores (mean {scores.mean():.2f})" if scores.size else f"{label}: no score")
        means = valid.group_by("response_id").agg(pl.col("score").mean())["score"].to_numpy()
        if np.unique(means).size > 1:
            rewards.plot(grid, gaussian_kde(means)(grid), color=color, linestyle="--",
                         label=f"{label}: density of response rewards")
    bars.set(xlim=(-0.5, 5.5), xticks=SCORES, xlabel="judge score", ylabel="share of valid judge scores",
             ylim=(0, 1))
    rewards.set(ylabel="density of a response's mean score", ylim=(0, None))
    handles = bars.get_legend_handles_labels()[0] + rewards.get_legend_handles_labels()[0]
    labels = bars.get_legend_handles_labels()[1] + rewards.get_legend_handles_labels()[1]
    figure.suptitle(title)
    figure.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, 0.93), ncol=2, fontsize=8, frameon=False)
    figure.subplots_adjust(top=0.72, bottom=0.12, left=0.09, right=0.9)
    return figure


def bias_figure(history: Mapping[str, Sequence[tuple[int, float]]], title: str, iterations: Sequence[int] = ()):
    """The meta-judge's biases over iterations: one line per quantity of BIASES (keyed by its name, each a list
    of (iteration, share)), shares from 0 to 1 with ½ — no bias — marked. Each of `iterations` without a point (an
    iteration that did not meta-judge) is shaded and labelled "not meta-judged", instead of silently missing."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4.2), dpi=110)
    axes = figure.subplots()
    shown: set[int] = set(iterations)
    with_data: set[int] = set()
    for index, (name, label) in enumerate(BIASES.items()):
        points = sorted(history.get(name, []))
        if points:
            with_data |= {step for step, _ in points}
            axes.plot([step for step, _ in points], [value for _, value in points], marker="o", color=f"C{index}",
                      label=label)
    for missing in sorted(shown - with_data):
        axes.axvspan(missing - 0.4, missing + 0.4, color="grey", alpha=0.15)
        axes.text(missing, 0.5, "not meta-judged", rotation=90, ha="center", va="center", fontsize=8, color="dimgrey")
    axes.axhline(0.5, color="grey", linestyle=":", linewidth=1)
    ticks = sorted(shown | with_data)
    axes.set(xlabel="iteration", ylabel="share of battles", ylim=(0, 1), xticks=ticks)
    if ticks:
        axes.set_xlim(min(ticks) - 0.5, max(ticks) + 0.5)
    figure.suptitle(title)
    figure.legend(loc="upper center", bbox_to_anchor=(0.5, 0.92), ncol=2, fontsize=8, frameon=False)
    figure.subplots_adjust(top=0.75, bottom=0.13)
    return figure


WIN_RATE_SERIES = ("win_rate", "win_rate_ci_low", "win_rate_ci_high", "lc_win_rate", "lc_win_rate_ci_low",
                   "lc_win_rate_ci_high", "identical_answers", "prompts_compared", "first_position_share")
"""The eval/… metrics the win-rate figure reads."""


def win_rate_figure(history: Mapping[str, Mapping[int, float]], title: str):
    """Win rate and length-controlled win rate of M_{t+1} by iteration, each point with its 95% CI as an error
    bar, in percent with 50% — as good as the reference — marked, and under each iteration what explains a rate near
    50% with no interval: how many of the answers were identical to the reference's, and how often the evaluator
    picked the answer shown first. `history` maps each name of WIN_RATE_SERIES to {iteration: value}."""
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4.2), dpi=110)
    axes = figure.subplots()
    iterations: set[int] = set()
    for index, (name, label) in enumerate((("win_rate", "win rate"), ("lc_win_rate", "length-controlled win rate"))):
        steps = sorted(history.get(name, {}))
        if not steps:
            continue
        iterations |= set(steps)
        values = np.array([history[name][step] for step in steps]) * 100
        low = np.array([history.get(f"{name}_ci_low", {}).get(step, np.nan) for step in steps]) * 100
        high = np.array([history.get(f"{name}_ci_high", {}).get(step, np.nan) for step in steps]) * 100
        # Side by side, so that the two error bars of an iteration do not hide each other.
        axes.errorbar(np.array(steps) + (index - 0.5) * 0.08, values, yerr=[values - low, high - values], marker="o",
                      capsize=4, color=f"C{index}", label=f"{label} (95% CI)")
    for step in sorted(iterations):
        identical = history.get("identical_answers", {}).get(step)
        compared = history.get("prompts_compared", {}).get(step)
        first = history.get("first_position_share", {}).get(step)
        notes = ([f"{identical:g} of {compared:g} identical"] if identical is not None and compared else []) + (
            [f"evaluator picked 1st {first:.0%}"] if first is not None and first == first else [])
        if notes:
            axes.text(step, 4, "\n".join(notes), ha="center", va="bottom", fontsize=7, color="dimgrey")
    axes.axhline(50, color="grey", linestyle=":", linewidth=1)
    axes.set(xlabel="iteration (M_t+1 trained in it)", ylabel="win rate against the reference (%)", ylim=(0, 100),
             xticks=sorted(iterations))
    figure.suptitle(title)
    figure.legend(loc="upper center", bbox_to_anchor=(0.5, 0.92), ncol=2, fontsize=8, frameon=False)
    figure.subplots_adjust(top=0.78, bottom=0.13)
    return figure
