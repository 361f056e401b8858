"""The user's SFT, reference-output and held-out prompt files: what loads, and errors that name the file and rows."""

import json
from pathlib import Path

import polars as pl
import pytest

from metareward.artifacts.tables import SFT_EXAMPLES, content_id, validate_table
from metareward.paper.prompts import render_judge_prompt
from metareward.pipeline.input_files import InputFileError, held_out_prompts, load_reference_outputs, load_sft_examples

REPO = Path(__file__).resolve().parents[2]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def test_shipped_sft_example_loads_as_judge_examples():
    examples = load_sft_examples(REPO / "deployments" / "sft" / "eft-example.jsonl")
    assert examples.height >= 12 and examples["example_id"].n_unique() == examples.height
    assert examples["row"].to_list() == list(range(1, examples.height + 1))
    assert set(examples["score"]) <= {0.0, 1.0, 2.0, 3.0, 4.0, 5.0} and examples["score"].n_unique() >= 3
    first = examples.row(0, named=True)
    assert first["prompt"][0]["role"] == "user" and first["completion"][0]["role"] == "assistant"
    assert first["prompt"][0]["content"].startswith("Review the user's question and the corresponding response")
    with_provenance = examples.with_columns(pl.lit(0, pl.Int32).alias("iteration"),
                                            pl.lit("m", pl.String).alias("model_id"))
    validate_table(with_provenance, SFT_EXAMPLES, "sft_data")


@pytest.mark.parametrize("suffix", ["jsonl", "csv", "parquet"])
def test_sft_file_in_every_format(tmp_path, suffix):
    rows = {"instruction": ["What is 2+2?", "Say hi."], "response": ["4", "Hello!"],
            "judgment": ["Correct and direct.\nScore: 5", "Friendly, complete.\n**Score:** 4"]}
    path = tmp_path / f"sft.{suffix}"
    frame = pl.DataFrame(rows)
    {"jsonl": frame.write_ndjson, "csv": frame.write_csv, "parquet": frame.write_parquet}[suffix](path)
    examples = load_sft_examples(path)
    assert examples["score"].to_list() == [5.0, 4.0]
    assert examples["prompt"][0][0]["content"] == render_judge_prompt("What is 2+2?", "4")
    assert examples["completion"][1][0]["content"] == "Friendly, complete.\n**Score:** 4"


def test_sft_rows_whose_target_does_not_end_in_a_score_are_named(tmp_path):
    good = {"instruction": "Q", "response": "A", "judgment": "Fine.\nScore: 3"}
    path = write_jsonl(tmp_path / "sft.jsonl", [
        good,
        {**good, "judgment": "Score: 4\nBut I changed my mind."},   # the verdict is not the last line
        good,
        {**good, "judgment": "Score: 9"},                          # outside 0–5
        {**good, "judgment": "Great answer."},
    ])
    with pytest.raises(InputFileError) as error:
        load_sft_examples(path)
    message = str(error.value)
    assert str(path) in message and "3 judgment(s)" in message and "rows 2, 4, 5" in message


def test_sft_rows_with_an_empty_field_or_missing_column_are_named(tmp_path):
    path = write_jsonl(tmp_path / "sft.jsonl", [
        {"instruction": "Q", "response": "A", "judgment": "Score: 3"},
        {"instruction": "Q", "response": "  ", "judgment": "Score: 3"},
    ])
    with pytest.raises(InputFileError, match=r"sft.jsonl: 1 row\(s\) with an empty 'response' \(rows 2\)"):
        load_sft_examples(path)
    missing = write_jsonl(tmp_path / "nojudgment.jsonl", [{"instruction": "Q", "response": "A"}])
    with pytest.raises(InputFileError, match="nojudgment.jsonl.*judgment"):
        load_sft_examples(missing)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(InputFileError, match="empty.jsonl"):
        load_sft_examples(empty)


def test_reference_outputs_as_alpaca_eval_writes_them(tmp_path):
    path = tmp_path / "outputs.json"
    path.write_text(json.dumps([
        {"instruction": "Name a color.", "output": "Blue.", "generator": "gpt4_turbo", "dataset": "helpful_base"},
        {"instruction": "Say hi.", "output": "Hello!", "generator": "gpt4_turbo", "dataset": "oasst"},
    ]))
    assert load_reference_outputs(path) == {content_id("Name a color."): "Blue.", content_id("Say hi."): "Hello!"}


def test_reference_outputs_given_twice_differently_are_named(tmp_path):
    path = write_jsonl(tmp_path / "outputs.jsonl", [
        {"instruction": "Q", "output": "A"}, {"instruction": "R", "output": "B"}, {"instruction": "Q", "output": "C"},
    ])
    with pytest.raises(InputFileError, match=r"outputs.jsonl: instructions given twice.*rows 1, 3"):
        load_reference_outputs(path)
    bad = tmp_path / "outputs.json"
    bad.write_text('[{"instruction": "Q", "output": 3}]')
    with pytest.raises(InputFileError, match="outputs.json"):
        load_reference_outputs(bad)


def test_held_out_prompts_must_not_be_training_prompts(tmp_path):
    training = write_jsonl(tmp_path / "train.jsonl", [{"prompt": "alpha"}, {"prompt": "beta"}])
    held_out = write_jsonl(tmp_path / "heldout.jsonl", [{"question": "gamma"}, {"question": "delta"}])
    assert held_out_prompts(held_out, "question", training, "prompt").table["prompt"].to_list() == ["gamma", "delta"]
    leaky = write_jsonl(tmp_path / "leaky.jsonl", [{"question": "gamma"}, {"question": "beta"}])
    with pytest.raises(InputFileError, match=r"leaky.jsonl: 1 of its prompts are also training prompts in .*train"
                                             r".jsonl \(e.g. 'beta'\)"):
        held_out_prompts(leaky, "question", training, "prompt")
    # A held-out file without its column names the setting that picks it.
    with pytest.raises(InputFileError, match=r"heldout.jsonl: .*'prompt'.*set evaluation\.prompts\.column"):
        held_out_prompts(held_out, "prompt", training, "prompt")


def test_shipped_held_out_prompts_are_disjoint_from_the_shipped_training_prompts():
    prompts = REPO / "deployments" / "prompts"
    held_out = held_out_prompts(prompts / "heldout-20.jsonl", "prompt", prompts / "assistant-100.jsonl", "prompt")
    assert held_out.table.height == 20
