"""The paper's tables from a campaign's stored stages: Table 1 (win rates and lengths by model), Table 5 (the
meta-judge's biases) and Fig. 5 (the judge's score shares) by iteration, as markdown."""

from __future__ import annotations

import math

from metareward.artifacts.store import ArtifactStore
from metareward.paper.report import meta_judge_bias, score_distribution
from metareward.pipeline.manifests import read_stage_table, stage_manifests

BIAS_COLUMNS = (("higher_win", "higher score wins"), ("lower_win", "lower score wins"),
                ("position_a_same_score", "A wins, same score"), ("position_a_diff_score", "A wins, different score"),
                ("position_a_all", "A wins, all"))
"""Table 5's columns: the keys of report.meta_judge_bias and their headers."""


def paper_tables(store: ArtifactStore, campaign: str) -> str:
    """Markdown of the paper's Table 1, Table 5 and Fig. 5 for `campaign`, from what its stages stored (nothing
    recomputed by a model): one Table 1 row per model M_{t+1} whose win rate was measured in iteration t (AlpacaEval
    2's win rate and LC win rate with our bootstrap 95% CIs, the mean length of its held-out answers), and M_1's
    length when iteration 1 compared with it; one row per iteration for Table 5 (battles with a parsed winner) and
    Fig. 5 (shares of the valid judge scores), saying where an iteration did not meta-judge or judge."""
    iterations = {t: stages for t, stages in stage_manifests(store, campaign).items() if t > 0}
    lines = [f"# {campaign}: the paper's tables", "", "## Table 1: win rate against the reference, by model", "",
             "| model | win rate (95% CI) | LC win rate (95% CI) | mean length (chars) | annotations |",
             "|---|---|---|---|---|"]
    first = iterations.get(1, {}).get("win_rate", {})
    if "reference_mean_chars" in first.get("stats", {}) and "reference_answers" in iterations[1]:
        length = first["stats"]["reference_mean_chars"]
        lines.append(f"| M_1 (the reference of iteration 1) | — | — | {length:.0f} | — |")
    for t, stages in iterations.items():
        stats = stages.get("win_rate", {}).get("stats", {})
        if "win_rate" in stats:
            length, annotations = stats.get("trained_mean_chars", math.nan), stats.get("annotations", math.nan)
            lines.append(f"| M_{t + 1} | {_rate(stats, 'win_rate')} | {_rate(stats, 'lc_win_rate')} | {length:.0f} | "
                         f"{annotations:.0f} |")
    lines += ["", "## Table 5: meta-judge biases, by iteration (shares of battles)", "",
              "| iteration | battles | " + " | ".join(header for _, header in BIAS_COLUMNS) + " |",
              "|---|---|" + "---|" * len(BIAS_COLUMNS)]
    for t, stages in iterations.items():
        if "meta_judgments" not in stages or "judgments" not in stages:
            lines.append(f"| {t} | not meta-judged in this iteration |" + " |" * len(BIAS_COLUMNS))
            continue
        bias = meta_judge_bias(read_stage_table(store, stages["meta_judgments"], ["first_id", "second_id", "winner"]),
                               read_stage_table(store, stages["judgments"], ["judgment_id", "score"]))
        lines.append(f"| {t} | {bias['battles']:.0f} | " + " | ".join(_share(bias[key]) for key, _ in BIAS_COLUMNS)
                     + " |")
    lines += ["", "## Fig. 5: the judge's scores, by iteration (shares of valid scores)", "",
              "| iteration | valid scores | mean | " + " | ".join(str(score) for score in range(6)) + " | other |",
              "|---|---|---|" + "---|" * 7]
    for t, stages in iterations.items():
        if "judgments" not in stages:
            lines.append(f"| {t} | not judged in this iteration |" + " |" * 8)
            continue
        shares = score_distribution(read_stage_table(store, stages["judgments"], ["score"]))
        lines.append(f"| {t} | {shares['valid']:.0f} | {shares['mean']:.2f} | "
                     + " | ".join(_share(shares[f"share_{score}"]) for score in range(6))
                     + f" | {_share(shares['share_other'])} |")
    return "\n".join(lines) + "\n"


def _rate(stats: dict, name: str) -> str:
    if name not in stats:
        return f"undefined: {stats.get(f'{name}_undefined', 'not computed')}"
    low, high = stats.get(f"{name}_ci_low", math.nan), stats.get(f"{name}_ci_high", math.nan)
    return f"{stats[name]:.1%} ({low:.1%}–{high:.1%})"


def _share(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:.1%}"
