"""The files users bring — prompts, the seed's SFT judge examples, reference outputs — read and checked, every error
naming the file, the row as the user counts it and the column."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from metareward.artifacts.tables import PROMPTS, content_id, validate_table
from metareward.paper.parsing import parse_score
from metareward.paper.prompts import render_judge_prompt

ROW = "__row__"
"""The column read_rows numbers rows in, from 1 as a user sees them."""


class InputFileError(ValueError):
    """A user's file that cannot be used; the message names the file and, where it applies, the row and column."""


class PromptFileError(InputFileError):
    """A prompt file that cannot be used."""


def read_rows(path: str | Path, columns: Sequence[str], what: str, error: type[InputFileError] = InputFileError,
              hint: str = "", optional: Sequence[str] = (), numbers: Sequence[str] = ()) -> pl.DataFrame:
    """The rows of a JSONL file (.jsonl, or .json with one object a line), a JSON array of objects (.json, as
    AlpacaEval writes model outputs), CSV or Parquet, with `columns` (and `optional` columns when present) as
    text or null and `numbers` as Float64, numbered in column ROW from 1 as a user sees them (JSONL lines, array
    items, CSV data rows, Parquet rows). `what` names the file in errors ("prompt file"), `hint` says how to fix a
    missing column. Raises `error` for a missing file, an unknown extension, bytes that are not UTF-8, a row that
    is not a JSON object, a missing column, a value that is not text, or one of `numbers` that is not a number."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: no such {what}")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".json", ".csv", ".parquet"):
        raise error(f"{path}: unknown {what} type {path.suffix!r}: use .jsonl, .json, .parquet or .csv")
    hint = f"; {hint}" if hint else ""
    if suffix in (".jsonl", ".json"):
        return _json_rows(path, list(columns), list(optional), list(numbers), error, hint)
    if suffix == ".csv":
        text = decode_text(path, error)
        if not text.strip():
            raise error(f"{path}: empty CSV file (no header row)")
        try:
            table = pl.read_csv(io.StringIO(text), infer_schema=False)
        except pl.exceptions.PolarsError as failure:
            raise error(f"{path}: not a readable CSV file ({failure})") from None
    else:
        try:
            table = pl.read_parquet(path)
        except Exception as failure:  # polars raises several exception types for a corrupt file
            raise error(f"{path}: not a readable Parquet file ({failure})") from None
    table = table.with_row_index(ROW, offset=1)
    for column in [*columns, *numbers]:
        if column not in table.columns:
            raise error(f"{path}: no {column!r} column (columns: {[c for c in table.columns if c != ROW]}){hint}")
    for column in [*columns, *(name for name in optional if name in table.columns)]:
        if table.schema[column] not in (pl.String, pl.Null):
            first = table.row(0, named=True)
            raise error(f"{path}: row {first[ROW]}: {column!r} must be text, got {table.schema[column]} "
                        f"{first[column]!r}")
    for column in numbers:
        bad = table.filter(pl.col(column).cast(pl.Float64, strict=False).is_null())
        if bad.height:
            raise error(f"{path}: row {bad[ROW][0]}: {column!r} must be a number, got {bad[column][0]!r}")
    kept = [*columns, *(name for name in optional if name in table.columns)]
    return table.select(pl.col(ROW).cast(pl.Int64), *(pl.col(name).cast(pl.String) for name in kept),
                        *(pl.col(name).cast(pl.Float64) for name in numbers))


def decode_text(path: Path, error: type[InputFileError] = InputFileError) -> str:
    """The file's text as UTF-8; raises `error` naming the file, the line and the byte offset of the first bytes that
    are not UTF-8, and saying to re-encode the file."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as failure:
        line = data.count(b"\n", 0, failure.start) + 1
        raise error(f"{path}: line {line}: bytes that are not UTF-8 at byte offset {failure.start}; "
                    "re-encode the file as UTF-8") from None


def _json_rows(path: Path, columns: list[str], optional: list[str], numbers: list[str], error: type[InputFileError],
               hint: str) -> pl.DataFrame:
    text = decode_text(path, error)
    if path.suffix.lower() == ".json" and text.lstrip().startswith("["):
        try:
            items = list(enumerate(json.loads(text), start=1))
        except json.JSONDecodeError as failure:
            raise error(f"{path}: line {failure.lineno}: not valid JSON ({failure.msg})") from None
    else:
        items = []
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                items.append((number, json.loads(line)))
            except json.JSONDecodeError as failure:
                raise error(f"{path}: row {number}: not valid JSON ({failure.msg})") from None
    rows = []
    for number, row in items:
        if not isinstance(row, dict):
            raise error(f"{path}: row {number}: expected a JSON object, got {type(row).__name__}")
        for column in columns:
            if column not in row:
                raise error(f"{path}: row {number} has no {column!r} field (fields: {sorted(row)}){hint}")
            if row[column] is not None and not isinstance(row[column], str):
                raise error(f"{path}: row {number}: {column!r} must be text, got {type(row[column]).__name__} "
                            f"{row[column]!r}")
        for column in numbers:
            if column not in row:
                raise error(f"{path}: row {number} has no {column!r} field (fields: {sorted(row)}){hint}")
            if _number(row[column]) is None:
                raise error(f"{path}: row {number}: {column!r} must be a number, got {row[column]!r}")
        rows.append({ROW: number, **{name: row[name] for name in columns},
                     **{name: _number(row[name]) for name in numbers},
                     **{name: row.get(name) if isinstance(row.get(name), str) else None for name in optional}})
    return pl.DataFrame(rows, schema={ROW: pl.Int64, **{name: pl.String for name in [*columns, *optional]},
                                      **{name: pl.Float64 for name in numbers}})


def _number(value) -> float | None:
    """A JSON value as a number: a number, or text that reads as one ("1"); None for anything else (null, true)."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _rows_label(rows: Sequence[int]) -> str:
    return ", ".join(map(str, rows[:10])) + (", …" if len(rows) > 10 else "")


@dataclass(frozen=True)
class PromptSet:
    """A validated prompt table and what loading it skipped."""

    table: pl.DataFrame
    empty_rows: list[int] = field(default_factory=list)
    duplicate_rows: list[int] = field(default_factory=list)

    def summary(self) -> str:
        """One line: prompts kept, empty rows skipped, duplicates dropped (with their first row numbers)."""
        line = f"{self.table.height} prompts"
        for label, rows in (("empty skipped", self.empty_rows), ("duplicates dropped", self.duplicate_rows)):
            if rows:
                shown = ", ".join(map(str, rows[:5])) + (", …" if len(rows) > 5 else "")
                line += f"; {len(rows)} {label} (rows {shown})"
        return line


def load_prompts(path: str | Path, column: str = "prompt", column_setting: str = "prompts.column") -> PromptSet:
    """Read a JSONL, Parquet or CSV prompt file into the prompts table.

    Rows are numbered from 1 as a user sees them (read_rows). Empty or whitespace-only prompts are skipped and
    counted — one blank line should not stop a campaign of thousands, yet the user sees them in the summary.
    Exact duplicates are dropped by content hash, the first kept. An optional `source` column is kept;
    otherwise the source is the file's name. Raises PromptFileError as read_rows does (a missing column names
    `column_setting`, the setting that picks it), and for a file with no prompt left.
    """
    path = Path(path)
    rows = read_rows(path, [column], "prompt file", PromptFileError, hint=f"rename the field or set {column_setting}",
                     optional=["source"] if column != "source" else [])
    rows = rows.with_columns(pl.col(column).fill_null(""))
    is_empty = pl.col(column).str.strip_chars() == ""
    empty_rows = rows.filter(is_empty)[ROW].to_list()
    rows = rows.filter(~is_empty)
    is_duplicate = pl.col(column).is_duplicated() & ~pl.col(column).is_first_distinct()
    duplicate_rows = rows.filter(is_duplicate)[ROW].to_list()
    rows = rows.filter(~is_duplicate)
    if rows.is_empty():
        raise PromptFileError(f"{path}: no non-empty prompt in column {column!r}")
    source = pl.col("source") if "source" in rows.columns else pl.lit(None, pl.String)
    table = rows.select(
        pl.col(column).map_elements(content_id, return_dtype=pl.String).alias("prompt_id"),
        pl.col(column).alias("prompt"),
        pl.when(source.fill_null("") == "").then(pl.lit(path.name)).otherwise(source).alias("source"),
    )
    return PromptSet(table=validate_table(table, PROMPTS, "prompts"), empty_rows=empty_rows,
                     duplicate_rows=duplicate_rows)


SFT_COLUMNS = ("instruction", "response", "judgment")
"""The columns of an SFT file: the judge prompt is rendered from instruction and response, the judgment is the
target."""


def load_sft_examples(path: str | Path) -> pl.DataFrame:
    """The seed's SFT examples from a JSONL, Parquet or CSV file with columns instruction, response and judgment:
    per row its `row` number, `example_id`, `prompt` (the A.1 judge prompt of instruction and response, as a user
    message), `completion` (the judgment, as the assistant's), `score` (the judgment's verdict) and lengths.
    Raises InputFileError as read_rows does, listing the rows with an empty field, and the rows whose judgment
    does not end in a line "Score: X" with X in 0–5 (the verdict the judge is to learn)."""
    path = Path(path)
    rows = read_rows(path, SFT_COLUMNS, "SFT file", hint="an SFT file has columns instruction, response, judgment")
    if rows.is_empty():
        raise InputFileError(f"{path}: no SFT example")
    for column in SFT_COLUMNS:
        empty = rows.filter(pl.col(column).fill_null("").str.strip_chars() == "")[ROW].to_list()
        if empty:
            raise InputFileError(f"{path}: {len(empty)} row(s) with an empty {column!r} (rows {_rows_label(empty)})")
    scores = [_final_verdict(judgment) for judgment in rows["judgment"]]
    unparsed = [row for row, score in zip(rows[ROW], scores, strict=True) if score is None]
    if unparsed:
        raise InputFileError(
            f"{path}: {len(unparsed)} judgment(s) do not end in a line \"Score: X\" with X in 0–5 (rows "
            f"{_rows_label(unparsed)}): the target must carry the verdict the judge learns to give (paper A.1)")
    prompts = [render_judge_prompt(i, r) for i, r in zip(rows["instruction"], rows["response"], strict=True)]
    return pl.DataFrame({
        "row": rows[ROW],
        "example_id": [content_id(p, j) for p, j in zip(prompts, rows["judgment"], strict=True)],
        "prompt": [[{"role": "user", "content": p}] for p in prompts],
        "completion": [[{"role": "assistant", "content": j}] for j in rows["judgment"]],
        "score": scores,
        "prompt_chars": [len(p) for p in prompts],
        "completion_chars": [len(j) for j in rows["judgment"]],
    }, schema_overrides={"prompt_chars": pl.Int32, "completion_chars": pl.Int32, "score": pl.Float64})


def _final_verdict(judgment: str) -> float | None:
    lines = [line for line in judgment.strip().splitlines() if line.strip()]
    return parse_score(lines[-1]) if lines else None


def load_reference_outputs(path: str | Path) -> dict[str, str]:
    """Reference answers by prompt_id from a file with columns instruction and output — AlpacaEval's model
    outputs JSON (an array of {"instruction", "output", …}), or JSONL, Parquet or CSV. Raises InputFileError as
    read_rows does, and naming the rows of an instruction given twice with different outputs."""
    path = Path(path)
    rows = read_rows(path, ("instruction", "output"), "reference outputs file",
                     hint="reference outputs have columns instruction and output (AlpacaEval's format)")
    rows = rows.with_columns(pl.col("output").fill_null(""))
    conflicting = rows.filter(pl.col("output").n_unique().over("instruction") > 1)[ROW].to_list()
    if conflicting:
        raise InputFileError(f"{path}: instructions given twice with different outputs (rows "
                             f"{_rows_label(conflicting)}): keep one reference answer per instruction")
    return {content_id(instruction): output
            for instruction, output in zip(rows["instruction"], rows["output"], strict=True)
            if instruction is not None}


def held_out_prompts(path: str | Path, column: str, training_path: str | Path, training_column: str) -> PromptSet:
    """The evaluation's prompt file (load_prompts), checked to share no prompt with the training prompt file:
    InputFileError naming how many are shared and the first of them otherwise (a win rate on training prompts
    measures memory, not improvement)."""
    held_out = load_prompts(path, column, "evaluation.prompts.column")
    training = set(load_prompts(training_path, training_column).table["prompt_id"])
    shared = held_out.table.filter(pl.col("prompt_id").is_in(list(training)))["prompt"].to_list()
    if shared:
        raise InputFileError(
            f"{path}: {len(shared)} of its prompts are also training prompts in {training_path} (e.g. "
            f"{shared[0][:80]!r}): evaluate on held-out prompts only")
    return held_out
