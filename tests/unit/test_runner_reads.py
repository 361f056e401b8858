"""The whole-iteration runners read only the columns and rows their arithmetic needs (issue 25), and still give the
tables the paper's arithmetic gives on the whole input tables; the store's filtered read checks every shard."""

import hashlib
import itertools

import numpy as np
import polars as pl
import pytest

from metareward.artifacts.store import ArtifactStore, CorruptArtifactError, TableRef
from metareward.artifacts.tables import JUDGMENTS, META_JUDGMENTS, PROMPTS, RESPONSES, content_id
from metareward.config.campaign import InferenceConfig, OrchestrationConfig
from metareward.paper.preferences import (
    build_dpo_dataset,
    rank_judgments,
    score_responses,
    select_actor_pairs,
    select_judge_pairs,
    select_judged_responses,
)
from metareward.pipeline import runners
from metareward.pipeline.context import StageContext

PROVENANCE = {"iteration": 1, "model_id": "m0"}


def iteration_tables(prompts: int = 6, k: int = 3, n: int = 4) -> dict[str, list[pl.DataFrame]]:
    """A small iteration in two shards: prompts, responses, judgments (some scores missing) and the meta-judgments of
    each prompt's highest-variance response (both orders of every pair of its valid judgments, some unparsed)."""
    rng = np.random.default_rng(3)
    prompt_ids = [content_id(f"q{index}") for index in range(prompts)]
    table = {"prompts": pl.DataFrame({"prompt_id": prompt_ids, "prompt": [f"question {i}" for i in range(prompts)],
                                      "source": "t"}, schema=PROMPTS)}
    responses = pl.DataFrame([
        {"prompt_id": prompt, "response_id": content_id(prompt, str(s)), "sample_idx": s,
         "text": f"answer {s} " * int(rng.integers(1, 9)), "n_tokens": 3, "finish_reason": "stop", **PROVENANCE}
        for prompt in prompt_ids for s in range(k)]).with_columns(n_chars=pl.col("text").str.len_chars())
    table["responses"] = responses.select(RESPONSES.names()).cast(dict(RESPONSES))
    judgments = pl.DataFrame([
        {"prompt_id": prompt, "response_id": response, "judgment_id": content_id(response, str(j)), "sample_idx": j,
         "text": f"judgment {j} of {response} " + "x" * int(rng.integers(0, 30)),
         "score": None if rng.random() < 0.15 else float(rng.integers(0, 6)), "verdict_mode": "free",
         "n_tokens": 5, "finish_reason": "stop", **PROVENANCE}
        for prompt, response in responses.select("prompt_id", "response_id").iter_rows() for j in range(n)])
    judgments = judgments.with_columns(n_chars=pl.col("text").str.len_chars())
    table["judgments"] = judgments.select(JUDGMENTS.names()).cast(dict(JUDGMENTS))
    judged = select_judged_responses(score_responses(table["judgments"]), seed=7)
    valid = (table["judgments"].join(judged.select("response_id"), on="response_id")
             .filter(pl.col("score").is_not_null()))
    meta = pl.DataFrame([
        {"prompt_id": first[0], "response_id": first[1], "first_id": first[2], "second_id": second[2],
         "text": "verdict", "winner": rng.choice(["A", "B", None]), "verdict_mode": "free", "n_tokens": 2,
         "finish_reason": "stop", **PROVENANCE}
        for _, group in valid.group_by("response_id", maintain_order=True)
        for first, second in itertools.permutations(group.select("prompt_id", "response_id", "judgment_id").rows(), 2)])
    table["meta_judgments"] = meta.select(META_JUDGMENTS.names()).cast(dict(META_JUDGMENTS))
    half = prompt_ids[: prompts // 2]
    return {name: [frame] if name == "prompts" else [frame.filter(pl.col("prompt_id").is_in(half)),
                                                    frame.filter(~pl.col("prompt_id").is_in(half))]
            for name, frame in table.items()}


def context_of(store: ArtifactStore, stage: str, shards: dict[str, list[pl.DataFrame]]) -> StageContext:
    """A job's context over the given input tables, written to the store shard by shard."""
    inputs = {name: [store.write_table(f"c/iter-1/{name}/shard-{index}.parquet", frame)
                     for index, frame in enumerate(frames)] for name, frames in shards.items()}
    return StageContext(stage, 1, None, None, "m0", inputs, "c/model", store, InferenceConfig(), OrchestrationConfig(),
                        "c/checkpoints")


@pytest.fixture()
def store(tmp_path):
    return ArtifactStore(str(tmp_path))


def test_runners_give_the_tables_of_the_arithmetic_on_whole_tables(store):
    shards = iteration_tables()
    whole = {name: pl.concat(frames) for name, frames in shards.items()}

    actor, _ = runners.actor_pairs(context_of(store, "actor_pairs", shards), rho=0.0, max_chosen_chars=None)
    expected_actor, _ = select_actor_pairs(whole["responses"], score_responses(whole["judgments"]), whole["prompts"],
                                           0.0, None, 1, "m0")
    assert actor.height and actor.equals(expected_actor)

    elo, elo_stats = runners.judgment_elo(context_of(store, "judgment_elo", shards), battle_rule="weighted",
                                          positional_weights=True)
    expected_elo, expected_stats = rank_judgments(whole["meta_judgments"], whole["judgments"], 1, "m0")
    assert elo.height and elo.equals(expected_elo)
    # rank_judgments averages the spreads over an unordered group_by: the last bits of the mean vary from run to run.
    assert elo_stats.counts == pytest.approx(expected_stats.counts, rel=1e-12)

    judge, _ = runners.judge_pairs(context_of(store, "judge_pairs", {**shards, "judgment_elo": [elo]}),
                                   max_chosen_chars=None, seed=7)
    expected_judge, _ = select_judge_pairs(elo, whole["judgments"], whole["responses"], whole["prompts"], None, 7, 1,
                                           "m0")
    assert judge.height and judge.equals(expected_judge)

    dpo, _ = runners.dpo_dataset(context_of(store, "dpo_dataset", {"actor_pairs": [actor], "judge_pairs": [judge]}),
                                 train_judge=True)
    assert dpo.equals(build_dpo_dataset(actor, judge, True)[0])


def test_a_filtered_read_keeps_the_matching_rows_in_order_and_only_the_columns_asked(store):
    refs = [store.write_table(f"t/{index}.parquet", pl.DataFrame({"id": [3 * index, 3 * index + 1, 3 * index + 2],
                                                                   "text": ["a", "b", "c"]})) for index in range(3)]
    rows = store.read_tables_where(refs, pl.col("id") % 2 == 0, ["text"])
    assert rows.columns == ["text"] and rows["text"].to_list() == ["a", "c", "b", "a", "c"]


def test_a_filtered_read_refuses_a_shard_that_is_not_what_its_marker_recorded(store):
    good = store.write_table("t/0.parquet", pl.DataFrame({"id": [1, 2]}))
    replaced = store.write_table("t/1.parquet", pl.DataFrame({"id": [3, 4]}))
    store.write_table("t/1.parquet", pl.DataFrame({"id": [5, 6]}))
    with pytest.raises(CorruptArtifactError, match="t/1.parquet is not the table its marker recorded"):
        store.read_tables_where([good, replaced], pl.col("id") > 0)
    damaged = b"PAR1 not a parquet body PAR1"
    store.write_bytes("t/2.parquet", damaged)
    recorded = TableRef(store.uri("t/2.parquet"), 1, hashlib.blake2b(damaged, digest_size=8).hexdigest())
    with pytest.raises(CorruptArtifactError, match="t/2.parquet is not a readable Parquet table"):
        store.read_tables_where([recorded], pl.col("id") > 0)


def test_shards_that_do_not_line_up_are_refused_rather_than_read_short(store):
    shards = iteration_tables()
    # One judgments table for two meta-judgment shards: shard i of one no longer holds shard i of the other.
    misaligned = {**shards, "judgments": [pl.concat(shards["judgments"])]}
    with pytest.raises(ValueError, match="judgments has 1 shards, its keys come in 2"):
        runners.judgment_elo(context_of(store, "judgment_elo", misaligned), battle_rule="weighted",
                             positional_weights=True)
