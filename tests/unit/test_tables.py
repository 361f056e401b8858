"""Prompt-file loading (JSONL, Parquet, CSV) with clear errors, schemas and stable ids."""

import json
from pathlib import Path

import polars as pl
import pytest

from metareward.artifacts.tables import PROMPTS, TableSchemaError, content_id, select_iteration_prompts, validate_table
from metareward.pipeline.input_files import PromptFileError, load_prompts

REPO = Path(__file__).resolve().parents[2]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def test_shipped_prompt_set_loads():
    prompt_set = load_prompts(REPO / "deployments/prompts/assistant-100.jsonl")
    assert prompt_set.table.height == 100
    assert prompt_set.table.schema == PROMPTS
    assert prompt_set.empty_rows == [] and prompt_set.duplicate_rows == []
    assert prompt_set.table["prompt_id"].n_unique() == 100


def test_jsonl_empty_and_duplicate_rows_are_counted(tmp_path):
    path = write_jsonl(
        tmp_path / "p.jsonl",
        [{"prompt": "Hi"}, {"prompt": "  "}, {"prompt": "Hi"}, {"prompt": "Bye", "source": "s"}, {"prompt": None}],
    )
    prompt_set = load_prompts(path)
    assert prompt_set.table["prompt"].to_list() == ["Hi", "Bye"]
    assert prompt_set.table["source"].to_list() == ["p.jsonl", "s"]
    assert prompt_set.empty_rows == [2, 5]
    assert prompt_set.duplicate_rows == [3]
    assert prompt_set.table["prompt_id"][0] == content_id("Hi")
    assert "2 empty skipped (rows 2, 5)" in prompt_set.summary()


def test_csv_and_parquet_with_custom_column(tmp_path):
    csv_path = tmp_path / "p.csv"
    csv_path.write_text('instruction,other\n"Say ""hi"", please",1\n"multi\nline",2\n', encoding="utf-8")
    assert load_prompts(csv_path, column="instruction").table["prompt"].to_list() == ['Say "hi", please', "multi\nline"]
    parquet_path = tmp_path / "p.parquet"
    pl.DataFrame({"prompt": ["a", "b", "a"]}).write_parquet(parquet_path)
    prompt_set = load_prompts(parquet_path)
    assert prompt_set.table["prompt"].to_list() == ["a", "b"]
    assert prompt_set.duplicate_rows == [3]


def test_errors_name_file_and_row(tmp_path):
    with pytest.raises(PromptFileError, match="missing.jsonl: no such prompt file"):
        load_prompts(tmp_path / "missing.jsonl")
    wrong_column = write_jsonl(tmp_path / "w.jsonl", [{"prompt": "a"}, {"text": "b"}])
    with pytest.raises(PromptFileError, match=r"w.jsonl: row 2 has no 'prompt' field.*set prompts.column"):
        load_prompts(wrong_column)
    not_text = write_jsonl(tmp_path / "n.jsonl", [{"prompt": "a"}, {"prompt": 5}])
    with pytest.raises(PromptFileError, match="n.jsonl: row 2: 'prompt' must be text"):
        load_prompts(not_text)
    bad_json = tmp_path / "j.jsonl"
    bad_json.write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(PromptFileError, match="j.jsonl: row 2: not valid JSON"):
        load_prompts(bad_json)
    latin = tmp_path / "l.csv"
    latin.write_bytes("prompt\nfine\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(PromptFileError, match="l.csv: line 3: bytes that are not UTF-8"):
        load_prompts(latin)
    csv_path = tmp_path / "c.csv"
    csv_path.write_text("text\nhello\n")
    with pytest.raises(PromptFileError, match=r"c.csv: no 'prompt' column \(columns: \['text'\]\)"):
        load_prompts(csv_path)
    empty = write_jsonl(tmp_path / "e.jsonl", [{"prompt": ""}, {"prompt": " "}])
    with pytest.raises(PromptFileError, match="no non-empty prompt"):
        load_prompts(empty)
    with pytest.raises(PromptFileError, match="unknown prompt file type '.txt'"):
        (tmp_path / "p.txt").write_text("x")
        load_prompts(tmp_path / "p.txt")
    numbers = tmp_path / "num.parquet"
    pl.DataFrame({"prompt": [1, 2]}).write_parquet(numbers)
    with pytest.raises(PromptFileError, match="num.parquet: row 1: 'prompt' must be text"):
        load_prompts(numbers)
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"not parquet")
    with pytest.raises(PromptFileError, match="corrupt.parquet: not a readable Parquet file"):
        load_prompts(corrupt)


def test_content_id_is_stable_and_unambiguous():
    assert content_id("ab", "c") != content_id("a", "bc")
    assert content_id("x") == content_id("x")
    assert len(content_id("x")) == 16


def test_validate_table_names_the_problem():
    table = pl.DataFrame({"prompt_id": ["a"], "prompt": [1]})
    with pytest.raises(TableSchemaError,
                       match="prompts table: missing column 'source'.*'prompt' is Int64, expected String"):
        validate_table(table, PROMPTS, "prompts")


def test_iteration_prompt_blocks_are_disjoint_then_wrap_around():
    table = pl.DataFrame({"prompt_id": [str(i) for i in range(10)], "prompt": [f"p{i}" for i in range(10)],
                          "source": "s"}, schema=PROMPTS)
    first = select_iteration_prompts(table, 3, [4])
    second = select_iteration_prompts(table, 3, [4, 4])
    third = select_iteration_prompts(table, 3, [4, 4, 4])
    assert first.height == second.height == third.height == 4
    assert not set(first["prompt_id"]) & set(second["prompt_id"])
    # The third block takes the last 2 of the order and wraps around to the first block's first 2.
    assert len(set(third["prompt_id"]) & set(first["prompt_id"])) == 2
    assert first["prompt_id"].to_list() == sorted(first["prompt_id"].to_list(), key=int)  # file order kept
    assert select_iteration_prompts(table, 3, [None])["prompt_id"].to_list() == table["prompt_id"].to_list()
    # Iteration 2's block moves when iteration 1's size changes.
    assert not select_iteration_prompts(table, 3, [3, 4]).equals(second)
