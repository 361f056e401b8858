"""The judge audit of an iteration: a seeded sample of its prompts with their responses, every judgment's score and
reasoning, and — for the meta-judged response — the meta-judge's verdicts in both orders and the Elo ranking, as a
page a person reads (markdown for Prefect, HTML for MLflow) and a label template to mark the judgments with."""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from metareward.artifacts.store import ArtifactStore, TableRef

LABEL_TEMPLATE_COLUMNS = ("judgment_id", "prompt_id", "response_id", "judge_score", "label")
"""The label template's columns: a person fills `label` with right / wrong, or the 0–5 score the judgment should
have given (`metareward audit label`)."""

EXCERPT_CHARS = 500
"""How much of a prompt, response or judgment the Prefect page shows (the MLflow page shows all of it)."""


@dataclass
class AuditedPrompt:
    """One sampled prompt: its responses (with their judgments), and the response the meta-judge compared the
    judgments of (None in an iteration without meta-judging) with its verdicts and Elo."""

    prompt_id: str
    prompt: str
    responses: pl.DataFrame
    judgments: pl.DataFrame
    judged_response_id: str | None = None
    verdicts: pl.DataFrame = field(default_factory=pl.DataFrame)
    elo: pl.DataFrame = field(default_factory=pl.DataFrame)

    @property
    def elo_by_judgment(self) -> dict[str, tuple[float, int, int]]:
        """(Elo, wins shown first, wins shown second) of each judgment of the meta-judged response."""
        return {row[0]: row[1:] for row in self.elo.select("judgment_id", "elo", "wins_first", "wins_second")
                .iter_rows()} if self.elo.height else {}


@dataclass
class JudgeAudit:
    """What the audit of iteration t shows: the sampled prompts (in the iteration's order), how many prompts the
    iteration has, and every judgment's score (response_id, score), which the histograms count."""

    campaign: str
    iteration: int
    model_id: str
    seed: int
    prompts: list[AuditedPrompt]
    total_prompts: int
    scores: pl.DataFrame

    @property
    def score_counts(self) -> dict[float | None, int]:
        """How many judgments gave each score over the whole iteration (None: invalid)."""
        scores = self.scores["score"].fill_nan(None)
        return {value: count for value, count in scores.value_counts(sort=False).iter_rows()}

    def label_template(self) -> pl.DataFrame:
        """The audited judgments, one row each, with an empty `label` column to fill."""
        rows = [prompt.judgments.select(
            "judgment_id", "prompt_id", "response_id", pl.col("score").alias("judge_score"),
            pl.lit("", pl.String).alias("label")) for prompt in self.prompts]
        return pl.concat(rows) if rows else pl.DataFrame(schema=dict.fromkeys(LABEL_TEMPLATE_COLUMNS, pl.String))


def judge_audit(store: ArtifactStore, campaign: str, iteration: int, model_id: str,
                tables: dict[str, list[TableRef]], samples: int, seed: int) -> JudgeAudit:
    """The audit of iteration t from its tables by stage (prompts, responses, judgments; meta_judgments and
    judgment_elo when it meta-judged): `samples` prompts drawn with numpy's generator seeded by (seed, t) among those
    with responses. Only the sampled prompts' rows are read (and every judgment's score, for the histogram)."""
    prompts = store.read_tables(tables["prompts"], ["prompt_id", "prompt"])
    answered = store.read_tables(tables["responses"], ["prompt_id"]).unique(maintain_order=True)["prompt_id"]
    candidates = prompts.filter(pl.col("prompt_id").is_in(answered.implode()))
    rng = np.random.default_rng([seed, iteration])
    picked = np.sort(rng.choice(candidates.height, size=min(samples, candidates.height), replace=False))
    sample = candidates[picked.tolist()] if picked.size else candidates.clear()
    wanted = pl.col("prompt_id").is_in(sample["prompt_id"].implode())
    responses = store.read_tables_where(tables["responses"], wanted, ["prompt_id", "response_id", "sample_idx",
                                                                      "text", "n_chars"])
    judgments = store.read_tables_where(tables["judgments"], wanted, ["prompt_id", "response_id", "judgment_id",
                                                                      "sample_idx", "text", "score", "n_chars"])
    verdicts = (store.read_tables_where(tables["meta_judgments"], wanted, ["prompt_id", "response_id", "first_id",
                                                                          "second_id", "winner"])
                if tables.get("meta_judgments") else None)
    elo = (store.read_tables_where(tables["judgment_elo"], wanted, ["prompt_id", "response_id", "judgment_id", "elo",
                                                                   "wins_first", "wins_second"])
           if tables.get("judgment_elo") else None)
    audited = []
    for prompt_id, text in sample.iter_rows():
        own = verdicts.filter(pl.col("prompt_id") == prompt_id) if verdicts is not None else pl.DataFrame()
        judged = own["response_id"][0] if own.height else None
        audited.append(AuditedPrompt(
            prompt_id, text, responses.filter(pl.col("prompt_id") == prompt_id).sort("sample_idx"),
            judgments.filter(pl.col("prompt_id") == prompt_id).sort("response_id", "sample_idx"), judged, own,
            elo.filter(pl.col("response_id") == judged).sort("elo", descending=True)
            if elo is not None and judged else pl.DataFrame()))
    scores = store.read_tables(tables["judgments"], ["response_id", "score"])
    return JudgeAudit(campaign, iteration, model_id, seed, audited, prompts.height, scores)


def _score_line(judgments: pl.DataFrame, response_id: str) -> str:
    scores = judgments.filter(pl.col("response_id") == response_id)["score"].fill_nan(None)
    shown = ", ".join(map(_score_text, scores))
    valid = scores.drop_nulls()
    return f"scores {shown or 'none'}" + (f" (mean {valid.mean():.2f})" if valid.len() else "")


def _score_text(score: float | None) -> str:
    return "—" if score is None or score != score else f"{score:g}"


def _excerpt(text: str, limit: int = EXCERPT_CHARS) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit] + f"… ({len(text)} chars)"


def _short(identifier: str) -> str:
    return identifier[:8]


def _histogram_rows(counts: dict[float | None, int]) -> list[tuple[str, int, float]]:
    total = sum(counts.values()) or 1
    labels = sorted(value for value in counts if value is not None)
    return ([(f"{value:g}", counts[value], counts[value] / total) for value in labels]
            + ([("invalid", counts[None], counts[None] / total)] if None in counts else []))


def _verdict_matrix(prompt: AuditedPrompt) -> tuple[list[str], list[list[str]]]:
    """Judgment ids in Elo order, and cell [m][k]: the winner (A: m, B: k) when m was shown first and k second."""
    order = prompt.elo["judgment_id"].to_list() if prompt.elo.height else sorted(
        set(prompt.verdicts["first_id"]) | set(prompt.verdicts["second_id"]))
    winner = {(first, second): win or "?" for first, second, win in
              prompt.verdicts.select("first_id", "second_id", "winner").iter_rows()}
    return order, [["·" if m == k else winner.get((m, k), "") for k in order] for m in order]


def audit_markdown(audit: JudgeAudit, label_command: str, template_uri: str) -> str:
    """The audit as markdown for the iteration's Prefect artifact: the score histogram, then each sampled prompt
    with its responses and their scores, the judgments of the meta-judged response with their reasoning (excerpts),
    Elo and wins, and its verdict matrix."""
    lines = [f"# {audit.campaign} — iteration {audit.iteration}: judge audit", "",
             f"{len(audit.prompts)} of {audit.total_prompts} prompts (seeded sample, seed {audit.seed}), judged by "
             f"M_{audit.iteration} `{audit.model_id}`. Mark the judgments in `{template_uri}`, then: "
             f"`{label_command}`.", "", "## Judge scores (every judgment of the iteration)", "",
             "| score | judgments | share | |", "|---|---|---|---|"]
    lines += [f"| {label} | {count} | {share:.1%} | {'█' * round(share * 40)} |"
              for label, count, share in _histogram_rows(audit.score_counts)]
    for number, prompt in enumerate(audit.prompts, 1):
        lines += ["", f"## Prompt {number} of {len(audit.prompts)} (`{_short(prompt.prompt_id)}`)", "",
                  f"> {_excerpt(prompt.prompt)}", ""]
        for response_id, sample_idx, text, chars in prompt.responses.select(
                "response_id", "sample_idx", "text", "n_chars").iter_rows():
            marker = " — **meta-judged**" if response_id == prompt.judged_response_id else ""
            lines += [f"**Response {sample_idx}** (`{_short(response_id)}`, {chars} chars), "
                      f"{_score_line(prompt.judgments, response_id)}{marker}", "", f"> {_excerpt(text)}", ""]
        shown = prompt.judged_response_id or (prompt.responses["response_id"][0] if prompt.responses.height
                                              else None)
        if shown is None:
            continue
        judged = prompt.judgments.filter(pl.col("response_id") == shown)
        elo = prompt.elo_by_judgment
        title = "meta-judged response" if prompt.judged_response_id else f"response `{_short(shown)}` (not meta-judged)"
        lines += [f"Judgments of the {title}:", "", "| judgment | score | Elo | wins 1st / 2nd | reasoning |",
                  "|---|---|---|---|---|"]
        for judgment_id, score, text in judged.select("judgment_id", "score", "text").iter_rows():
            rating, first, second = elo.get(judgment_id, (None, None, None))
            lines.append(f"| `{_short(judgment_id)}` | {_score_text(score)} | "
                         f"{'' if rating is None else f'{rating:+.2f}'} | "
                         f"{'' if first is None else f'{first} / {second}'} | "
                         f"{_excerpt(text, 300).replace('|', '/')} |")
        if prompt.verdicts.height:
            order, cells = _verdict_matrix(prompt)
            lines += ["", "Verdicts (row shown first as A, column second as B; the cell is the winner):", "",
                      "| first \\ second | " + " | ".join(f"`{_short(k)}`" for k in order) + " |",
                      "|---|" + "---|" * len(order)]
            lines += [f"| `{_short(m)}` | " + " | ".join(row) + " |" for m, row in zip(order, cells, strict=True)]
    return "\n".join(lines) + "\n"


def audit_html(audit: JudgeAudit, histogram_png: bytes | None) -> str:
    """The audit as one HTML page for MLflow's artifact viewer: the same content as audit_markdown with every text
    in full, and the score histogram as an image."""
    esc = html.escape
    parts = [f"<h1>{esc(audit.campaign)} — iteration {audit.iteration}: judge audit</h1>",
             f"<p>{len(audit.prompts)} of {audit.total_prompts} prompts (seeded sample, seed {audit.seed}), judged by "
             f"M_{audit.iteration} <code>{esc(audit.model_id)}</code>.</p>"]
    if histogram_png:
        parts.append(f'<img alt="judge scores" style="max-width:100%" '
                     f'src="data:image/png;base64,{base64.b64encode(histogram_png).decode()}">')
    parts.append("<table><tr><th>score</th><th>judgments</th><th>share</th></tr>" + "".join(
        f"<tr><td>{label}</td><td>{count}</td><td>{share:.1%}</td></tr>"
        for label, count, share in _histogram_rows(audit.score_counts)) + "</table>")
    for number, prompt in enumerate(audit.prompts, 1):
        parts.append(f"<h2>Prompt {number} of {len(audit.prompts)} <code>{esc(prompt.prompt_id)}</code></h2>"
                     f"<blockquote style='white-space:pre-wrap'>{esc(prompt.prompt)}</blockquote>")
        elo = prompt.elo_by_judgment
        for response_id, sample_idx, text, chars in prompt.responses.select(
                "response_id", "sample_idx", "text", "n_chars").iter_rows():
            marker = " — <b>meta-judged</b>" if response_id == prompt.judged_response_id else ""
            rows = "".join(
                f"<tr><td><code>{esc(judgment_id)}</code></td><td>{_score_text(score)}"
                f"</td><td>{'' if judgment_id not in elo else f'{elo[judgment_id][0]:+.2f}'}</td>"
                f"<td style='white-space:pre-wrap'>{esc(judgment)}</td></tr>"
                for judgment_id, score, judgment in prompt.judgments.filter(pl.col("response_id") == response_id)
                .select("judgment_id", "score", "text").iter_rows())
            parts.append(f"<h3>Response {sample_idx} <code>{esc(response_id)}</code> ({chars} chars), "
                         f"{esc(_score_line(prompt.judgments, response_id))}{marker}</h3>"
                         f"<blockquote style='white-space:pre-wrap'>{esc(text)}</blockquote>"
                         f"<details><summary>its judgments</summary><table><tr><th>judgment</th><th>score</th>"
                         f"<th>Elo</th><th>reasoning</th></tr>{rows}</table></details>")
        if prompt.verdicts.height:
            order, cells = _verdict_matrix(prompt)
            header = "".join(f"<th><code>{esc(_short(k))}</code></th>" for k in order)
            body = "".join(f"<tr><th><code>{esc(_short(m))}</code></th>" + "".join(f"<td>{cell}</td>" for cell in row)
                           + "</tr>" for m, row in zip(order, cells, strict=True))
            parts.append("<p>Verdicts (row shown first as A, column second as B; the cell is the winner):</p>"
                         f"<table><tr><th>first \\ second</th>{header}</tr>{body}</table>")
    style = ("<style>body{font-family:sans-serif;max-width:70em;margin:auto}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:2px 6px;vertical-align:top}</style>")
    return f"<!doctype html><html><head><meta charset='utf-8'>{style}</head><body>{''.join(parts)}</body></html>"


def audit_keys(campaign: str, iteration: int) -> dict[str, str]:
    """Where iteration t's audit pages, its label template, a person's labels and the agreement with them are kept,
    beside its stages' folders."""
    folder = f"{campaign}/iter-{iteration}/audit"
    return {"markdown": f"{folder}/audit.md", "html": f"{folder}/audit.html",
            "template": f"{folder}/labels-template.csv", "labels": f"{folder}/labels.csv",
            "agreement": f"{folder}/agreement.json"}
