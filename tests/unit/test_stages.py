"""The stage functions end to end on a scripted backend: exact expected tables, computed by hand."""

import numpy as np
import polars as pl
import pytest

from metareward.artifacts.tables import PROMPTS, content_id
from metareward.config.campaign import SamplingConfig
from metareward.inference.roles import generate_responses, judge_responses, meta_judge
from metareward.paper.elo import elo_scores
from metareward.paper.preferences import (
    build_dpo_dataset,
    meta_judged_judgments,
    rank_judgments,
    score_responses,
    select_actor_pairs,
    select_judge_pairs,
    select_judged_responses,
)
from metareward.paper.prompts import render_judge_prompt
from tests.support import ScriptedBackend, judged_response, meta_judged_pair

SAMPLING = SamplingConfig()
ACTOR = {
    "Q1": ["good short", "okay answer that is quite long indeed", "good short", "bad"],
    "Q2": ["same A", "same B", "same A", "same B"],
}
JUDGE = {
    "good short": ["Looks great. Score: 5", "Fine. Score: 4", "I cannot decide."],
    "okay answer that is quite long indeed": ["Score: 3", "Meh. Score: 3", "Score: 3/5"],
    "bad": ["Poor. Score: 1", "Weak. Score: 2", "Useless. Score: 0"],
    "same A": ["Score: 4", "Good. Score: 4", "Fine. Score: 4"],
    "same B": ["Score: 4", "Nice. Score: 4", "Solid. Score: 4"],
}


def script(prompt, n, seed):
    if prompt in ACTOR:
        return ACTOR[prompt][:n]
    if prompt.startswith("Review the user's question and the corresponding response using"):
        return JUDGE[judged_response(prompt)][:n]
    first, second = meta_judged_pair(prompt)
    # The scripted meta-judge prefers a judgment that says 0; otherwise it picks position A.
    if "Score: 0" in second:
        return ["Judgment B is right.\nWinner: Judgement B"]
    return ["Winner: Judgement A"]


@pytest.fixture()
def prompts():
    return pl.DataFrame({"prompt_id": [content_id("Q1"), content_id("Q2")], "prompt": ["Q1", "Q2"], "source": "t"},
                        schema=PROMPTS)


def run_pipeline(prompts, backend, rho=0.0, verdict_mode="free"):
    responses, generate_stats = generate_responses(prompts, backend, 4, SAMPLING, seed=7, iteration=1, model_id="m0")
    judgments, judge_stats = judge_responses(responses, prompts, backend, 3, SAMPLING, 7, verdict_mode, 1, "m0")
    scores = score_responses(judgments)
    actor_pairs, actor_stats = select_actor_pairs(responses, scores, prompts, rho, None, 1, "m0")
    judged = select_judged_responses(scores, seed=7)
    meta, meta_stats = meta_judge(judged, judgments, responses, prompts, backend, SAMPLING, 7, verdict_mode, 1, "m0")
    elo, rank_stats = rank_judgments(meta, judgments, 1, "m0")
    judge_pairs, judge_pair_stats = select_judge_pairs(elo, judgments, responses, prompts, None, 7, 1, "m0")
    return locals()


def test_actor_stage_drops_identical_responses(prompts):
    out = run_pipeline(prompts, ScriptedBackend(script))
    responses = out["responses"]
    assert out["generate_stats"].dropped_duplicates == 3  # one in Q1, two in Q2
    q1 = responses.filter(pl.col("prompt_id") == content_id("Q1"))
    assert q1["text"].to_list() == ["good short", "okay answer that is quite long indeed", "bad"]
    assert q1["sample_idx"].to_list() == [0, 1, 3]
    assert q1["response_id"].to_list()[0] == content_id(content_id("Q1"), "good short")
    assert set(responses["model_id"]) == {"m0"} and set(responses["iteration"]) == {1}


def test_judge_stage_parses_and_counts_failures(prompts):
    out = run_pipeline(prompts, ScriptedBackend(script))
    judgments, stats = out["judgments"], out["judge_stats"]
    assert judgments.height == 5 * 3
    assert stats.parse_failures == 1 and stats.parse_failure_rate == pytest.approx(1 / 15)
    assert judgments.filter(pl.col("text") == "I cannot decide.")["score"].to_list() == [None]
    assert set(judgments["verdict_mode"]) == {"free"}


def test_rewards_and_actor_pairs_by_hand(prompts):
    out = run_pipeline(prompts, ScriptedBackend(script))
    scores = {row["response_id"]: row for row in out["scores"].iter_rows(named=True)}
    good = scores[content_id(content_id("Q1"), "good short")]
    assert (good["score"], good["score_var"], good["n_valid"], good["n_judgments"]) == (4.5, 0.25, 2, 3)
    bad = scores[content_id(content_id("Q1"), "bad")]
    assert bad["score"] == 1.0 and bad["score_var"] == pytest.approx(2 / 3)
    pairs = out["actor_pairs"]
    # Q1: chosen "good short" (4.5), rejected "bad" (1.0); Q2: all 4.0 → no pair.
    assert pairs.height == 1
    row = pairs.row(0, named=True)
    assert row["chosen"] == [{"role": "assistant", "content": "good short"}]
    assert row["rejected"] == [{"role": "assistant", "content": "bad"}]
    assert row["prompt"] == [{"role": "user", "content": "Q1"}]
    assert (row["chosen_score"], row["rejected_score"]) == (4.5, 1.0)
    assert out["actor_stats"].counts["no_pair"] == 1


def test_actor_chosen_length_filter(prompts):
    out = run_pipeline(prompts, ScriptedBackend(script))
    pairs, stats = select_actor_pairs(out["responses"], out["scores"], prompts, 0.0, 5, 1, "m0")
    assert pairs.height == 0 and stats.counts["chosen_too_long"] == 1


def test_meta_judge_elo_and_judge_pairs_by_hand(prompts):
    backend = ScriptedBackend(script)
    out = run_pipeline(prompts, backend)
    judged = out["judged"]
    # Q1: "bad" has the highest variance (2/3); Q2 ties at 0 and is broken by the seeded generator.
    assert (judged.filter(pl.col("prompt_id") == content_id("Q1"))["response_id"].item()
            == content_id(content_id("Q1"), "bad"))
    meta = out["meta"]
    assert meta.height == 12  # 3 valid judgments → 6 ordered pairs, for each of the two judged responses
    # Requests are grouped by response so the shared prefix stays cached.
    meta_requests = [r for r in backend.requests if "two judgments" in r.messages[0]["content"]]
    responses_in_order = [judged_response_of(r) for r in meta_requests]
    assert responses_in_order == sorted(responses_in_order, key=responses_in_order.index)
    assert len(set(responses_in_order[:6])) == 1
    # Winners: 10 in position A, 2 in position B → ω1 = 2/12, ω2 = 10/12.
    counts = out["rank_stats"].counts
    assert (counts["win_first"], counts["win_second"]) == (10, 2)
    assert counts["w1"] == pytest.approx(1 / 6) and counts["w2"] == pytest.approx(5 / 6)
    elo = out["elo"].filter(pl.col("prompt_id") == content_id("Q1")).join(
        out["judgments"].select("judgment_id", "text"), on="judgment_id"
    )
    by_text = dict(zip(elo["text"], elo["elo"], strict=True))
    # "Score: 0" never loses; the other two battle symmetrically (1/6 each way) → equal Elo.
    assert by_text["Useless. Score: 0"] > by_text["Poor. Score: 1"] + 1
    assert by_text["Poor. Score: 1"] == pytest.approx(by_text["Weak. Score: 2"], abs=1e-6)
    wins = dict(zip(elo["text"], zip(elo["wins_first"], elo["wins_second"], strict=True), strict=True))
    assert wins["Useless. Score: 0"] == (2, 2) and wins["Poor. Score: 1"] == (1, 0)
    # Judge pairs: Q1 → chosen "Score: 0" judgment; Q2 all equal Elo → no pair.
    pairs = out["judge_pairs"]
    assert pairs.height == 1
    row = pairs.row(0, named=True)
    assert row["chosen"][0]["content"] == "Useless. Score: 0"
    assert row["rejected"][0]["content"] in {"Poor. Score: 1", "Weak. Score: 2"}
    assert row["prompt"][0]["content"] == render_judge_prompt("Q1", "bad")
    assert out["judge_pair_stats"].counts["no_pair"] == 1


def judged_response_of(request):
    content = request.messages[0]["content"]
    return content.split("Response: ", 1)[1].split("\n\nJudgment A:", 1)[0]


def test_dpo_dataset_follows_schedule(prompts):
    out = run_pipeline(prompts, ScriptedBackend(script))
    both, stats = build_dpo_dataset(out["actor_pairs"], out["judge_pairs"], train_judge=True)
    assert both["kind"].to_list() == ["actor", "judge"] and stats.counts == {"actor_pairs": 1, "judge_pairs": 1}
    actor_only, _ = build_dpo_dataset(out["actor_pairs"], out["judge_pairs"], train_judge=False)
    assert actor_only["kind"].to_list() == ["actor"]


def test_forced_verdicts_always_parse(prompts):
    def no_verdicts(prompt, n, seed):
        texts = script(prompt, n, seed)
        return [t.split("Score:")[0].split("Winner:")[0] for t in texts]

    backend = ScriptedBackend(no_verdicts, choose=lambda prefix, choices: len(choices) - 1)
    out = run_pipeline(prompts, backend, verdict_mode="forced")
    judgments = out["judgments"]
    assert judgments["score"].null_count() == 0 and set(judgments["score"]) == {5.0}
    assert set(judgments["verdict_mode"]) == {"forced"}
    assert all(text.endswith("Score: 5") for text in judgments["text"])
    assert set(out["meta"]["winner"]) == {"B"}
    # Forced mode stops the free text at the verdict line.
    assert all(r.stop in {("Score:",), ("Winner:",)} for r in backend.requests if "Review" in r.messages[0]["content"])


def test_same_seed_same_tables(prompts):
    first = run_pipeline(prompts, ScriptedBackend(script))
    second = run_pipeline(prompts, ScriptedBackend(script))
    for name in ("responses", "judgments", "meta", "elo", "actor_pairs", "judge_pairs"):
        assert first[name].equals(second[name]), name


# Ablation switches (defaults = the paper), each checked by hand on the scripted campaign above. In Q1 the judged
# response is "bad", its valid judgments P "Poor. Score: 1", W "Weak. Score: 2", Z "Useless. Score: 0" (sample order):
# Z wins both orders against P and against W; P and W each win once, in position A.
def q1_elo(out):
    table = out["elo"].filter(pl.col("prompt_id") == content_id("Q1")).join(
        out["judgments"].select("judgment_id", "sample_idx"), on="judgment_id").sort("sample_idx")
    return table["elo"].to_numpy()


SECOND_WINS = {("Weak. Score: 2", "Poor. Score: 1"), ("Weak. Score: 2", "Useless. Score: 0"),
               ("Useless. Score: 0", "Weak. Score: 2")}


def positional_script(prompt, n, seed):
    """A meta-judge under which, among Q1's judged response's judgments P, W, Z ("Poor", "Weak", "Useless"), P beats
    W in both orders, P and Z win once each in position A (a split), Z and W once each in position B (a split);
    every other battle goes to position A."""
    if prompt.startswith("Review the user's question and the corresponding response using"):
        return JUDGE[judged_response(prompt)][:n]
    if prompt in ACTOR:
        return ACTOR[prompt][:n]
    return ["Winner: Judgement B" if meta_judged_pair(prompt) in SECOND_WINS else "Winner: Judgement A"]


def test_positional_weights_off_weighs_every_win_a_half(prompts):
    out = run_pipeline(prompts, ScriptedBackend(positional_script))
    assert (out["rank_stats"].counts["win_first"], out["rank_stats"].counts["win_second"]) == (9, 3)
    w1, w2 = out["rank_stats"].counts["w1"], out["rank_stats"].counts["w2"]
    assert (w1, w2) == pytest.approx((1 / 4, 3 / 4))
    flat, stats = rank_judgments(out["meta"], out["judgments"], 1, "m0", positional=False)
    assert (stats.counts["w1"], stats.counts["w2"]) == (0.5, 0.5)
    # The battle matrices by hand, rows and columns P, W, Z.
    def matrix(first, second):
        return np.array([[0, first + second, first], [0, 0, second], [first, second, 0]])

    np.testing.assert_allclose(q1_elo(out), elo_scores(matrix(w1, w2)), atol=1e-6)
    np.testing.assert_allclose(q1_elo({**out, "elo": flat}), elo_scores(matrix(0.5, 0.5)), atol=1e-6)
    assert np.abs(elo_scores(matrix(w1, w2)) - elo_scores(matrix(0.5, 0.5))).max() > 0.1


def test_both_orders_agree_counts_only_unanimous_battles(prompts):
    out = run_pipeline(prompts, ScriptedBackend(script))
    agreed, stats = rank_judgments(out["meta"], out["judgments"], 1, "m0", battle_rule="both_orders_agree")
    # Q1: Z-P and Z-W agree, P-W splits; Q2 (3 judgments, the meta-judge always says A): 3 split pairs.
    assert (stats.counts["agreed_battles"], stats.counts["split_battles"], stats.counts["undecided_battles"]) == (
        2, 4, 0)
    assert "w1" not in stats.counts and "w2" not in stats.counts  # no positional weight applies
    np.testing.assert_allclose(q1_elo({**out, "elo": agreed}), elo_scores(np.array([[0, 0, 0], [0, 0, 0], [1, 1, 0]])),
                               atol=1e-6)
    q2 = agreed.filter(pl.col("prompt_id") == content_id("Q2"))["elo"].to_numpy()
    np.testing.assert_allclose(q2, 0.0, atol=1e-9)
    with pytest.raises(ValueError, match="battle_rule"):
        rank_judgments(out["meta"], out["judgments"], 1, "m0", battle_rule="majority")


def test_nemo_aligners_rule_counts_a_split_as_a_tie(prompts):
    out = run_pipeline(prompts, ScriptedBackend(positional_script))
    tied, stats = rank_judgments(out["meta"], out["judgments"], 1, "m0", battle_rule="both_orders_or_tie")
    strict, strict_stats = rank_judgments(out["meta"], out["judgments"], 1, "m0", battle_rule="both_orders_agree")
    # Q1: P-W agree, P-Z and Z-W split; Q2: the meta-judge always says A, 3 splits.
    assert (stats.counts["agreed_battles"], stats.counts["split_battles"]) == (1, 5)
    assert {key: strict_stats.counts[key] for key in ("agreed_battles", "split_battles", "undecided_battles")} == {
        key: stats.counts[key] for key in ("agreed_battles", "split_battles", "undecided_battles")}
    # Rows and columns P, W, Z: a split is a tie, one win each way; the strict rule keeps only P's win over W.
    np.testing.assert_allclose(q1_elo({**out, "elo": tied}), elo_scores(np.array([[0, 1, 1], [0, 0, 1], [1, 1, 0]])),
                               atol=1e-6)
    np.testing.assert_allclose(q1_elo({**out, "elo": strict}),
                               elo_scores(np.array([[0, 1, 0], [0, 0, 0], [0, 0, 0]])), atol=1e-6)
    assert np.abs(q1_elo({**out, "elo": tied}) - q1_elo({**out, "elo": strict})).max() > 1
    q2 = tied.filter(pl.col("prompt_id") == content_id("Q2"))["elo"].to_numpy()
    np.testing.assert_allclose(q2, 0.0, atol=1e-9)  # three ties: no judgment above another


def test_identical_judgments_are_not_meta_judged_and_never_make_a_judge_pair(prompts):
    repeated = {**JUDGE, "bad": ["Poor. Score: 2", "Poor. Score: 2", "Useless. Score: 0"]}

    def repeating_script(prompt, n, seed):
        if prompt.startswith("Review the user's question and the corresponding response using"):
            return repeated[judged_response(prompt)][:n]
        return script(prompt, n, seed)

    out = run_pipeline(prompts, ScriptedBackend(repeating_script))
    bad = content_id(content_id("Q1"), "bad")
    assert set(out["judged"]["response_id"]) >= {bad}
    texts = dict(zip(out["judgments"]["judgment_id"], out["judgments"]["text"], strict=True))
    shown = [(texts[first], texts[second]) for first, second in out["meta"].select("first_id", "second_id").iter_rows()]
    assert ("Poor. Score: 2", "Poor. Score: 2") in shown  # every pair, as the paper words it

    compared, left_out = meta_judged_judgments(out["judgments"], out["judged"])
    assert left_out == 1
    assert compared.filter(pl.col("response_id") == bad)["text"].to_list() == ["Poor. Score: 2", "Useless. Score: 0"]
    meta, _ = meta_judge(out["judged"], compared, out["responses"], prompts, ScriptedBackend(repeating_script),
                         SAMPLING, 7, "free", 1, "m0")
    assert all(texts[first] != texts[second] for first, second in meta.select("first_id", "second_id").iter_rows())
    assert meta.height == out["meta"].height - 4  # Q1's response: one pair, both orders, instead of three pairs

    # Ranked anyway (a table of the pairs above), the two identical judgments first and last by Elo: no judge pair.
    ids = out["judgments"].filter(pl.col("response_id") == bad).sort("sample_idx")["judgment_id"].to_list()
    forced = out["elo"].with_columns(pl.when(pl.col("judgment_id") == ids[0]).then(1.0)
                                     .when(pl.col("judgment_id") == ids[1]).then(-1.0)
                                     .when(pl.col("judgment_id") == ids[2]).then(0.0)
                                     .otherwise(pl.col("elo")).alias("elo"))
    pairs, stats = select_judge_pairs(forced, out["judgments"], out["responses"], prompts, None, 7, 1, "m0")
    assert stats.counts["identical_texts"] == 1 and bad not in pairs["response_id"].to_list()


def test_meta_judge_without_scores_sees_no_score_line(prompts):
    backend = ScriptedBackend(script)
    out = run_pipeline(prompts, backend)
    blind, _ = meta_judge(out["judged"], out["judgments"], out["responses"], prompts, backend, SAMPLING, 7, "free", 1,
                          "m0", sees_scores=False)
    blind_requests = backend.requests[-blind.height:]
    shown = [meta_judged_pair(r.messages[0]["content"]) for r in blind_requests]
    assert all("Score:" not in first + second for first, second in shown)
    # "Good. Score: 4" is shown as "Good.", a judgment that is only its score line as nothing.
    assert ("Good.", "Fine.") in shown and any(first == "" for first, _ in shown)
    # Same battles, and the scripted meta-judge can no longer spot "Score: 0": position A wins every battle.
    assert blind.select("first_id", "second_id").equals(out["meta"].select("first_id", "second_id"))
    assert set(blind["winner"]) == {"A"}


def test_all_judged_responses_meta_judges_every_response_with_two_valid_judgments(prompts):
    out = run_pipeline(prompts, ScriptedBackend(script))
    scores = out["scores"]
    every = select_judged_responses(scores, seed=7, which="all")
    eligible = scores.filter(pl.col("n_valid") >= 2)
    assert sorted(every["response_id"]) == sorted(eligible["response_id"]) and every.height > out["judged"].height
    meta, _ = meta_judge(every, out["judgments"], out["responses"], prompts, ScriptedBackend(script), SAMPLING, 7,
                         "free", 1, "m0")
    assert meta.height == sum(v * (v - 1) for v in eligible["n_valid"])
    with pytest.raises(ValueError, match="which"):
        select_judged_responses(scores, seed=7, which="lowest_variance")
