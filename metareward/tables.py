"""Parquet schemas of every artifact table, stable content ids, and validation of user-supplied prompt files."""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl

_PROVENANCE = {"iteration": pl.Int32, "model_id": pl.String}
_CHAT = pl.List(pl.Struct({"role": pl.String, "content": pl.String}))

PROMPTS = pl.Schema({"prompt_id": pl.String, "prompt": pl.String, "source": pl.String})
RESPONSES = pl.Schema(
    {
        "prompt_id": pl.String,
        "response_id": pl.String,
        "sample_idx": pl.Int32,
        "text": pl.String,
        "n_chars": pl.Int32,
        "n_tokens": pl.Int32,
        "finish_reason": pl.String,
        **_PROVENANCE,
    }
)
JUDGMENTS = pl.Schema(
    {
        "prompt_id": pl.String,
        "response_id": pl.String,
        "judgment_id": pl.String,
        "sample_idx": pl.Int32,
        "text": pl.String,
        "score": pl.Float64,
        "verdict_mode": pl.String,
        "n_chars": pl.Int32,
        "n_tokens": pl.Int32,
        "finish_reason": pl.String,
        **_PROVENANCE,
    }
)
META_JUDGMENTS = pl.Schema(
    {
        "prompt_id": pl.String,
        "response_id": pl.String,
        "first_id": pl.String,
        "second_id": pl.String,
        "text": pl.String,
        "winner": pl.String,
        "verdict_mode": pl.String,
        "n_tokens": pl.Int32,
        "finish_reason": pl.String,
        **_PROVENANCE,
    }
)
JUDGMENT_ELO = pl.Schema(
    {
        "prompt_id": pl.String,
        "response_id": pl.String,
        "judgment_id": pl.String,
        "score": pl.Float64,
        "elo": pl.Float64,
        "wins_first": pl.Int32,
        "wins_second": pl.Int32,
        **_PROVENANCE,
    }
)
ACTOR_PAIRS = pl.Schema(
    {
        "prompt_id": pl.String,
        "prompt": _CHAT,
        "chosen": _CHAT,
        "rejected": _CHAT,
        "chosen_id": pl.String,
        "rejected_id": pl.String,
        "chosen_score": pl.Float64,
        "rejected_score": pl.Float64,
        "chosen_chars": pl.Int32,
        "rejected_chars": pl.Int32,
        **_PROVENANCE,
    }
)
JUDGE_PAIRS = pl.Schema(
    {
        "prompt_id": pl.String,
        "response_id": pl.String,
        "prompt": _CHAT,
        "chosen": _CHAT,
        "rejected": _CHAT,
        "chosen_id": pl.String,
        "rejected_id": pl.String,
        "chosen_elo": pl.Float64,
        "rejected_elo": pl.Float64,
        "chosen_chars": pl.Int32,
        "rejected_chars": pl.Int32,
        **_PROVENANCE,
    }
)
DPO_DATASET = pl.Schema(
    {"prompt_id": pl.String, "prompt": _CHAT, "chosen": _CHAT, "rejected": _CHAT, "kind": pl.String, **_PROVENANCE}
)


@dataclass(frozen=True)
class ContentFile:
    """A file a stage reads, identified in its key by the digest of its bytes (not by where it lies)."""

    path: str
    digest: str

    @classmethod
    def of(cls, path: str | Path) -> ContentFile:
        """The file at `path` with its blake2b digest."""
        return cls(str(path), file_digest(path))


def file_digest(path: str | Path) -> str:
    """blake2b digest of a file's bytes."""
    digest = hashlib.blake2b(digest_size=8)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class TableSchemaError(ValueError):
    """A table whose columns or types differ from its schema."""


class PromptFileError(ValueError):
    """A prompt file that cannot be used; the message names the file and, where it applies, the row."""


def content_id(*parts: str) -> str:
    """A stable 16-hex-digit blake2b id of the given strings (unambiguous: parts are length-prefixed)."""
    digest = hashlib.blake2b(digest_size=8)
    for part in parts:
        encoded = part.encode("utf-8")
        digest.update(len(encoded).to_bytes(8, "little"))
        digest.update(encoded)
    return digest.hexdigest()


def content_seed(*parts: object) -> int:
    """A 31-bit seed derived from the given values (e.g. campaign seed, role, prompt id): a request's
    randomness depends on what it is, not on which shard or batch it runs in."""
    return int(content_id(*map(str, parts)), 16) % (2**31 - 1)


def validate_table(table: pl.DataFrame, expected: pl.Schema, name: str) -> pl.DataFrame:
    """Return table unchanged if its columns and dtypes equal `expected`; raise TableSchemaError naming the
    table, and the missing, extra or mistyped columns otherwise."""
    actual = table.schema
    problems = [f"missing column {column!r}" for column in expected if column not in actual]
    problems += [f"unexpected column {column!r}" for column in actual if column not in expected]
    problems += [
        f"column {column!r} is {actual[column]}, expected {dtype}"
        for column, dtype in expected.items()
        if column in actual and actual[column] != dtype
    ]
    if problems:
        raise TableSchemaError(f"{name} table: " + "; ".join(problems))
    return table


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


def load_prompts(path: str | Path, column: str = "prompt") -> PromptSet:
    """Read a JSONL, Parquet or CSV prompt file into the prompts table.

    Rows are numbered from 1 as a user sees them (JSONL lines, CSV data rows after the header, Parquet
    rows). Empty or whitespace-only prompts are skipped and counted — one blank line should not stop a
    campaign of thousands, yet the user sees them in the summary. Exact duplicates are dropped by content
    hash, the first kept. An optional `source` column is kept; otherwise the source is the file's name.
    Raises PromptFileError for a missing file, an unknown extension, a missing column, bytes that are not
    UTF-8, a row that is not a JSON object or whose prompt is not a string, or a file with no prompt left.
    """
    path = Path(path)
    if not path.is_file():
        raise PromptFileError(f"{path}: no such prompt file")
    readers = {".jsonl": _read_jsonl, ".json": _read_jsonl, ".csv": _read_csv, ".parquet": _read_parquet}
    reader = readers.get(path.suffix.lower())
    if reader is None:
        raise PromptFileError(f"{path}: unknown prompt file type {path.suffix!r}: use .jsonl, .parquet or .csv")
    rows = reader(path, column)
    if column not in rows.columns:
        raise PromptFileError(
            f"{path}: no {column!r} column (columns: {[c for c in rows.columns if c != _ROW]}); "
            "rename the column or set prompts.column"
        )
    if rows.schema[column] not in (pl.String, pl.Null):
        first = rows.row(0, named=True)
        raise PromptFileError(
            f"{path}: row {first[_ROW]}: {column!r} must be text, got {rows.schema[column]} {first[column]!r}"
        )
    rows = rows.with_columns(pl.col(column).cast(pl.String).fill_null(""))
    is_empty = pl.col(column).str.strip_chars() == ""
    empty_rows = rows.filter(is_empty)[_ROW].to_list()
    rows = rows.filter(~is_empty)
    is_duplicate = pl.col(column).is_duplicated() & ~pl.col(column).is_first_distinct()
    duplicate_rows = rows.filter(is_duplicate)[_ROW].to_list()
    rows = rows.filter(~is_duplicate)
    if rows.is_empty():
        raise PromptFileError(f"{path}: no non-empty prompt in column {column!r}")
    source = pl.col("source").cast(pl.String) if "source" in rows.columns else pl.lit(None, pl.String)
    table = rows.select(
        pl.col(column).map_elements(content_id, return_dtype=pl.String).alias("prompt_id"),
        pl.col(column).alias("prompt"),
        pl.when(source.fill_null("") == "").then(pl.lit(path.name)).otherwise(source).alias("source"),
    )
    return PromptSet(table=validate_table(table, PROMPTS, "prompts"), empty_rows=empty_rows, duplicate_rows=duplicate_rows)


def select_iteration_prompts(table: pl.DataFrame, seed: int, block_sizes: list[int | None]) -> pl.DataFrame:
    """The prompts of iteration t = len(block_sizes): the prompt table in a seeded random order, iteration t
    taking the t-th block of block_sizes[t-1] prompts (None: all) after the blocks of the earlier iterations —
    disjoint across iterations while the table lasts, then wrapping around — in table order within the block."""
    sizes = [size or table.height for size in block_sizes]
    order = np.random.default_rng(seed).permutation(table.height)
    picked = np.sort(order[(sum(sizes[:-1]) + np.arange(min(sizes[-1], table.height))) % table.height])
    return table[picked]


_ROW = "__row__"


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = data.count(b"\n", 0, error.start) + 1
        raise PromptFileError(
            f"{path}: line {line}: bytes that are not UTF-8 at byte offset {error.start}; "
            "re-encode the file as UTF-8"
        ) from None


def _read_jsonl(path: Path, column: str) -> pl.DataFrame:
    row_numbers, prompts, sources = [], [], []
    for line_number, line in enumerate(_decode(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise PromptFileError(f"{path}: row {line_number}: not valid JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise PromptFileError(f"{path}: row {line_number}: expected a JSON object, got {type(row).__name__}")
        if column not in row:
            raise PromptFileError(
                f"{path}: row {line_number} has no {column!r} field (fields: {sorted(row)}); "
                "rename the field or set prompts.column"
            )
        if row[column] is not None and not isinstance(row[column], str):
            raise PromptFileError(
                f"{path}: row {line_number}: {column!r} must be text, got {type(row[column]).__name__} "
                f"{row[column]!r}"
            )
        row_numbers.append(line_number)
        prompts.append(row[column])
        sources.append(row.get("source") if isinstance(row.get("source"), str) else None)
    return pl.DataFrame(
        {_ROW: row_numbers, column: prompts, "source": sources},
        schema={_ROW: pl.Int64, column: pl.String, "source": pl.String},
    )


def _read_csv(path: Path, column: str) -> pl.DataFrame:
    text = _decode(path)
    if not text.strip():
        raise PromptFileError(f"{path}: empty CSV file (no header row)")
    try:
        table = pl.read_csv(io.StringIO(text), infer_schema=False)
    except pl.exceptions.PolarsError as error:
        raise PromptFileError(f"{path}: not a readable CSV file ({error})") from None
    return table.with_row_index(_ROW, offset=1)


def _read_parquet(path: Path, column: str) -> pl.DataFrame:
    try:
        table = pl.read_parquet(path)
    except Exception as error:  # polars raises several exception types for a corrupt file
        raise PromptFileError(f"{path}: not a readable Parquet file ({error})") from None
    return table.with_row_index(_ROW, offset=1)
