"""Table 5 biases, score distribution, the per-iteration report, its figure and the health checks, computed by hand."""

import math

import polars as pl
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

from metareward.artifacts.stats import combine
from metareward.artifacts.tables import PROMPTS, RESPONSES
from metareward.config.campaign import HealthConfig, SamplingConfig
from metareward.inference.roles import judge_responses
from metareward.paper.report import health_problems, iteration_report, meta_judge_bias, score_distribution
from metareward.tracking.figures import bias_figure, score_figure
from tests.support import ScriptedBackend

JUDGMENTS = pl.DataFrame({"judgment_id": ["a", "b", "c", "d"], "score": [5.0, 3.0, 3.0, None]})


def meta(rows):
    return pl.DataFrame(rows, schema={"first_id": pl.String, "second_id": pl.String, "winner": pl.String}, orient="row")


def test_table_5_statistics_by_hand():
    battles = meta([
        ("a", "b", "A"),  # different scores, higher (5) won in position A
        ("b", "a", "B"),  # different scores, higher won in position B
        ("b", "c", "A"),  # same score, A won
        ("c", "b", "A"),  # same score, A won
        ("a", "c", "B"),  # different scores, lower (3) won in position B
        ("c", "a", None),  # unparsed: left out
    ])
    bias = meta_judge_bias(battles, JUDGMENTS)
    assert bias["battles"] == 5
    # Different-score battles: 3, of which the higher score won 2.
    assert bias["higher_win"] == pytest.approx(2 / 3) and bias["lower_win"] == pytest.approx(1 / 3)
    assert bias["position_a_same_score"] == 1.0
    assert bias["position_a_diff_score"] == pytest.approx(1 / 3)
    assert bias["position_a_all"] == pytest.approx(3 / 5)


def test_no_same_score_battle_gives_nan():
    assert math.isnan(meta_judge_bias(meta([("a", "b", "A")]), JUDGMENTS)["position_a_same_score"])


def test_judge_that_always_says_5_fails_the_health_check():
    prompts = pl.DataFrame({"prompt_id": ["p"], "prompt": ["Q"], "source": ["t"]}, schema=PROMPTS)
    responses = pl.DataFrame([("p", f"r{i}", i, f"answer {i}", 8, 2, "stop", 1, "m") for i in range(3)],
                             schema=RESPONSES, orient="row")
    always_five = ScriptedBackend(lambda prompt, n, seed: ["Perfect. Score: 5"] * n)
    judgments, stats = judge_responses(responses, prompts, always_five, 4, SamplingConfig(), 0, "free", 1, "m")
    assert score_distribution(judgments)["share_5"] == 1.0
    problems = health_problems(HealthConfig(), {"judgments": combine("judgments", [stats.as_dict()])})
    assert problems == ["top-score share 100.0% of valid judge scores is 5, threshold 90.0% "
                        "(health.max_top_score_share)"]
    assert health_problems(HealthConfig(max_top_score_share=None),
                           {"judgments": combine("judgments", [stats.as_dict()])}) == []


def test_position_bias_and_parse_rate_checks():
    stages = {"judgments": {"rows": 10, "valid_scores": 1, "top_scores": 0},
              "meta_judgments": {"winner_a": 9, "winner_b": 1}}
    problems = health_problems(HealthConfig(), stages)
    assert any("judge parse rate 10.0% is below 20.0%" in p for p in problems)
    assert any("position-A share 90.0%, threshold 90.0%" in p for p in problems)


def test_iteration_report_by_hand():
    judgments = JUDGMENTS.with_columns(pl.Series("n_chars", [10, 20, 30, 40], dtype=pl.Int32))
    responses = pl.DataFrame({"response_id": ["r1", "r2"], "n_chars": [100, 300], "n_tokens": [20, 60]})
    elo = pl.DataFrame({"response_id": ["r1", "r1", "r2", "r2"], "elo": [1000.0, 1100.0, 950.0, 1250.0]})
    report = iteration_report({
        "responses": responses, "judgments": judgments, "meta_judgments": meta([("a", "b", "A"), ("b", "c", None)]),
        "judgment_elo": elo, "actor_pairs": pl.DataFrame({"prompt_id": ["p"]}),
    })
    assert report["actor/response_mean_chars"] == 200 and report["actor/response_mean_tokens"] == 40
    assert report["judge/parse_failure_rate"] == 0.25 and report["judge/score_mean"] == pytest.approx(11 / 3)
    assert report["judge/score_share_5"] == pytest.approx(1 / 3)
    assert report["judge/score_share_3"] == pytest.approx(2 / 3)
    assert report["judge/judgment_mean_chars"] == 25
    assert report["meta_judge/parse_failure_rate"] == 0.5 and report["meta_judge/higher_win"] == 1.0
    assert report["meta_judge/elo_spread_mean"] == 200  # (100 + 300) / 2
    assert report["pairs/actor"] == 1 and "pairs/judge" not in report


def test_score_figure_groups_whole_bars_and_draws_the_reward_density(tmp_path):
    first = pl.DataFrame({"response_id": ["a", "a", "b", "b", "c"], "score": [5.0, 3.0, 0.0, 1.0, float("nan")]})
    second = pl.DataFrame({"response_id": ["a", "b"], "score": [5.0, None]})
    figure = score_figure({"iteration 1": first, "iteration 2": second}, "scores")
    bars, rewards = figure.axes
    assert bars.get_xlim() == (-0.5, 5.5)  # the bars at 0 and 5 are whole
    patches = bars.patches
    assert len(patches) == 12  # 6 scores x 2 iterations, side by side
    heights = {(round(p.get_x() + p.get_width() / 2, 2)): p.get_height() for p in patches}
    assert heights[-0.2] == 0.25 and heights[4.8] == 0.25 and heights[5.2] == 1.0  # NaN and null are not valid
    assert all(abs(p.get_width() - 0.4) < 1e-9 for p in patches)
    [density] = rewards.get_lines()  # iteration 2 has one scored response: no spread, no density
    assert density.get_label() == "iteration 1: density of response rewards"
    [legend] = figure.legends
    renderer = FigureCanvasAgg(figure).get_renderer()
    assert legend.get_window_extent(renderer).y0 > bars.get_window_extent(renderer).y1  # above the bars
    figure.savefig(tmp_path / "scores.png")
    assert (tmp_path / "scores.png").read_bytes()[:4] == b"\x89PNG"


def test_bias_figure_plots_table_5_over_iterations():
    figure = bias_figure({"higher_win": [(2, 0.7), (1, 0.6)], "position_a_all": [(1, 0.9)]}, "biases")
    [axes] = figure.axes
    [line] = axes.get_lines()[:1]
    assert list(line.get_xdata()) == [1, 2] and list(line.get_ydata()) == [0.6, 0.7]
    assert axes.get_ylim() == (0, 1) and "higher score won" in [t.get_text() for t in figure.legends[0].get_texts()]


def test_nan_scores_are_missing_like_nulls():
    nan_judgments = JUDGMENTS.with_columns(pl.Series("score", [5.0, 3.0, 3.0, float("nan")]))
    battles = meta([("a", "d", "A"), ("d", "b", "B"), ("b", "c", "A")])
    assert meta_judge_bias(battles, nan_judgments) == pytest.approx(meta_judge_bias(battles, JUDGMENTS), nan_ok=True)
    # Only b-c compares two scores (the same): no different-score battle.
    assert math.isnan(meta_judge_bias(battles, nan_judgments)["higher_win"])
    nan_scores = score_distribution(nan_judgments)
    assert nan_scores == score_distribution(JUDGMENTS) and nan_scores["valid"] == 3.0
    assert nan_scores["mean"] == pytest.approx(11 / 3)


def test_bias_figure_marks_the_iterations_that_did_not_meta_judge():
    # The paper's iterations 3-4 train the actor only: their absence is drawn, not left as a silently shorter line.
    figure = bias_figure({"higher_win": [(1, 0.6), (2, 0.7)]}, "biases", iterations=range(1, 5))
    [axes] = figure.axes
    assert [text.get_text() for text in axes.texts] == ["not meta-judged", "not meta-judged"]
    assert [text.get_position()[0] for text in axes.texts] == [3, 4]
    assert list(axes.get_xticks()) == [1, 2, 3, 4]


def test_win_rate_figure_says_under_each_iteration_what_explains_a_rate_near_half():
    from metareward.tracking.figures import win_rate_figure

    figure = win_rate_figure({"win_rate": {1: 0.5, 2: 0.55}, "win_rate_ci_low": {1: 0.5, 2: 0.5},
                              "win_rate_ci_high": {1: 0.5, 2: 0.6}, "identical_answers": {1: 18.0, 2: 3.0},
                              "prompts_compared": {1: 20.0, 2: 20.0}, "first_position_share": {1: 1.0, 2: 0.55}},
                             "win rate")
    [axes] = figure.axes
    assert [text.get_text() for text in axes.texts] == ["18 of 20 identical\nevaluator picked 1st 100%",
                                                        "3 of 20 identical\nevaluator picked 1st 55%"]
