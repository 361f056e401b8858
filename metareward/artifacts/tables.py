"""Parquet schemas of every artifact table, stable content ids, table validation and the iterations' prompt blocks."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
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

SFT_EXAMPLES = pl.Schema(
    {"row": pl.Int64, "example_id": pl.String, "prompt": _CHAT, "completion": _CHAT, "score": pl.Float64,
     "prompt_chars": pl.Int32, "completion_chars": pl.Int32, **_PROVENANCE}
)
"""The seed's SFT data: a judge example per row of the user's file (`row` as the user counts it), its prompt the
A.1 judge prompt of (instruction, response), its completion the judgment, `score` the judgment's verdict."""
EVAL_COMPARISONS = pl.Schema(
    {"prompt_id": pl.String, "trained_first": pl.Boolean, "verdict": pl.String, "text": pl.String,
     "preference": pl.Float64, "trained_chars": pl.Int32, "reference_chars": pl.Int32, "identical": pl.Boolean,
     "evaluator_id": pl.String, **_PROVENANCE}
)
"""The win-rate stage's table: one evaluator call per (held-out prompt, order) — the trained model's answer shown
first ("m") or second ("M") — with the verdict ("m"/"M", null unparsed) and the trained model's share of it
(`preference` in 0..1: a forced evaluator's probability of the trained answer's identifier, as AlpacaEval 2's
weighted annotator reads it — AlpacaEval's own preference is 1 + this —; a free evaluator's 1 won, 0 lost; ½
identical answers — no call —; null unparsed); `text` is the free evaluator's answer or the forced one's
probabilities; model_id is the trained model's."""


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


def select_iteration_prompts(table: pl.DataFrame, seed: int, block_sizes: list[int | None]) -> pl.DataFrame:
    """The prompts of iteration t = len(block_sizes): the prompt table in a seeded random order, iteration t
    taking the t-th block of block_sizes[t-1] prompts (None: all) after the blocks of the earlier iterations —
    disjoint across iterations while the table lasts, then wrapping around — in table order within the block."""
    sizes = [size or table.height for size in block_sizes]
    order = np.random.default_rng(seed).permutation(table.height)
    picked = np.sort(order[(sum(sizes[:-1]) + np.arange(min(sizes[-1], table.height))) % table.height])
    return table[picked]
