"""Arena-Hard (lmarena/arena-hard-auto): its question files read and checked, and a model's answers to them written
in the answer format its loader reads.

Arena-Hard has had two file layouts, named here by the field that keys a question:

- "uid": the code since the v2.0 release (read at commit 196f6b8, 2025-06-20). Both question files,
  data/arena-hard-v0.1 and data/arena-hard-v2.0/question.jsonl, hold {uid, category, prompt, …}, one turn;
  gen_answer.py writes {uid, ans_id, model, messages: [user, assistant {answer}], tstamp, metadata}.
- "question_id": the code of the v0.1 release (read at commit 3071ef9, 2025-03-19, the last before v2.0).
  Questions are {question_id, category, cluster, turns: [{content}, …]}; gen_answer.py writes {question_id,
  answer_id, model_id, choices: [{index, turns: [{content, token_len}, …]}], tstamp, conv_metadata}.

Either loader (utils load_model_answers) keys a file's answers by that field and names the model by the file's
name: the answers of model NAME belong at data/BENCH/model_answer/NAME.jsonl.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from metareward.artifacts.tables import content_id, content_seed
from metareward.inference.base import Completion, GenerationRequest
from metareward.pipeline.evaluation import EvaluationInputError, EvaluationResult, default_model_name, evaluated_model
from metareward.pipeline.input_files import decode_text

LAYOUTS = ("uid", "question_id")
"""Arena-Hard's file layouts, by the field that keys a question (see the module's doc)."""

_TEXT_FIELD = {"uid": "prompt", "question_id": "turns"}
_CODE_BLOCK = re.compile("```([^`]*)```")


@dataclass(frozen=True)
class ArenaHardQuestion:
    """One question: its id exactly as the file gives it (text or a whole number; Arena-Hard matches answers to
    questions by it, so it is written back unchanged), its user turns in order, and its line in the file."""

    question_id: str | int
    turns: tuple[str, ...]
    line: int


@dataclass(frozen=True)
class ArenaHardQuestions:
    """A question file's questions, in file order, and its layout ("uid" or "question_id")."""

    path: Path
    layout: str
    questions: tuple[ArenaHardQuestion, ...]


def load_arena_hard_questions(path: str | Path) -> ArenaHardQuestions:
    """The questions of an Arena-Hard question file (JSONL, one question a line; blank lines skipped), its layout
    found from the first question's fields: {uid, prompt} or {question_id, turns: [{content}, …]}.

    Raises EvaluationInputError naming the file and the line for: a missing file, bytes that are not UTF-8, a line
    that is not a JSON object, a question with neither layout's key, one of the other layout than the first, an id
    that is not text or a whole number, a missing or non-text prompt or turn content (naming the field, e.g.
    'turns'[1]['content']), empty turns, an id given twice (one answer would be lost), and a file without
    questions."""
    path = Path(path)
    if not path.is_file():
        raise EvaluationInputError(f"{path}: no such Arena-Hard question file")
    layout, questions, lines_by_id = None, [], {}
    for number, line in enumerate(decode_text(path, EvaluationInputError).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as failure:
            raise EvaluationInputError(f"{path}: line {number}: not valid JSON ({failure.msg})") from None
        if not isinstance(row, dict):
            raise EvaluationInputError(f"{path}: line {number}: expected a JSON object, got {type(row).__name__}")
        key = next((name for name in LAYOUTS if name in row), None)
        if key is None:
            raise EvaluationInputError(
                f"{path}: line {number}: no 'uid' or 'question_id' field (fields: {sorted(row)}): an Arena-Hard "
                "question is {uid, prompt} (arena-hard-auto v2.0 and later) or {question_id, turns: [{content}]} "
                "(its v0.1 release)")
        if layout is None:
            layout = key
        elif key != layout:
            raise EvaluationInputError(
                f"{path}: line {number}: a question keyed by {key!r} in a file whose first question is keyed by "
                f"{layout!r}: Arena-Hard reads one layout per file")
        question = _question(path, number, row, layout)
        if question.question_id in lines_by_id:
            raise EvaluationInputError(
                f"{path}: line {number}: {layout!r} {question.question_id!r} is also line "
                f"{lines_by_id[question.question_id]}'s: Arena-Hard keys answers by it, so one would be lost")
        lines_by_id[question.question_id] = number
        questions.append(question)
    if not questions:
        raise EvaluationInputError(f"{path}: no question (an Arena-Hard question file has one JSON object a line)")
    return ArenaHardQuestions(path, layout, tuple(questions))


def _question(path: Path, number: int, row: dict, layout: str) -> ArenaHardQuestion:
    where = f"{path}: line {number}"
    question_id = row[layout]
    if isinstance(question_id, bool) or not isinstance(question_id, str | int):
        raise EvaluationInputError(f"{where}: {layout!r} must be text or a whole number, got {question_id!r}")
    field = _TEXT_FIELD[layout]
    if field not in row:
        raise EvaluationInputError(f"{where} has no {field!r} field (fields: {sorted(row)}): a question keyed by "
                                   f"{layout!r} holds its text in {field!r}")
    if layout == "uid":
        if not isinstance(row["prompt"], str):
            raise EvaluationInputError(f"{where}: 'prompt' must be text, got {type(row['prompt']).__name__}")
        return ArenaHardQuestion(question_id, (row["prompt"],), number)
    turns = row["turns"]
    if not isinstance(turns, list) or not turns:
        raise EvaluationInputError(f"{where}: 'turns' must be a non-empty list of {{\"content\": text}}, got {turns!r}")
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("content"), str):
            raise EvaluationInputError(f"{where}: 'turns'[{index}]['content'] must be text, got {turn!r}")
    return ArenaHardQuestion(question_id, tuple(turn["content"] for turn in turns), number)


def answer_questions(questions: Sequence[ArenaHardQuestion], backend, sampling, seed: int) -> list[list[Completion]]:
    """The model's answer to every turn of every question, in order: turn k is asked with the conversation so far
    (the question's turns before it and the model's answers to them), all questions' k-th turns in one batch. A
    turn too long for the context gets an empty answer of 0 tokens whose finish_reason says why. `sampling`
    (temperature, top_p, max_tokens) applies to every turn; each request's seed derives from `seed`, the
    question's id and the turn."""
    answers: list[list[Completion]] = [[] for _ in questions]
    for turn in range(max((len(question.turns) for question in questions), default=0)):
        asked = [index for index, question in enumerate(questions) if turn < len(question.turns)]
        requests = [GenerationRequest(
            messages=_conversation(questions[index], answers[index]), n=1, temperature=sampling.temperature,
            top_p=sampling.top_p, max_tokens=sampling.max_tokens,
            seed=content_seed(seed, "arena-hard", questions[index].question_id, turn)) for index in asked]
        for index, result in zip(asked, backend.generate(requests), strict=True):
            answers[index].append(result.completions[0] if result.completions
                                  else Completion("", 0, result.skipped or "no_completion"))
    return answers


def _conversation(question: ArenaHardQuestion, answers: Sequence[Completion]) -> tuple[dict[str, str], ...]:
    messages = []
    for asked, answer in zip(question.turns, answers, strict=False):
        messages.append({"role": "user", "content": asked})
        messages.append({"role": "assistant", "content": answer.text})
    messages.append({"role": "user", "content": question.turns[len(answers)]})
    return tuple(messages)


def markdown_counts(text: str) -> dict[str, dict[str, int]]:
    """Arena-Hard's style features of an answer, as utils/add_markdown_info.py's count_markdown_elements counts
    them after remove_pattern takes out the insides of ``` code blocks: headers by level, ordered and unordered
    list items, bold spans (** and __)."""
    for block in _CODE_BLOCK.findall(text):
        text = text.replace(block, "")
    return {
        "header_count": {f"h{level}": len(re.findall(rf"^#{{{level}}}\s", text, re.MULTILINE))
                         for level in range(1, 7)},
        "list_count": {"ordered": len(re.findall(r"^\s*\d+\.\s", text, re.MULTILINE)),
                       "unordered": len(re.findall(r"^\s*[-*+]\s", text, re.MULTILINE))},
        "bold_count": {"**": len(re.findall(r"\*\*[^*\n]+\*\*", text)),
                       "__": len(re.findall(r"__[^_\n]+__", text))},
    }


def arena_hard_answer(question: ArenaHardQuestion, answers: Sequence[Completion], model_id: str, layout: str,
                      answer_id: str, timestamp: float) -> dict:
    """One line of an Arena-Hard answer file: the model's answers (one per turn, each with its token count) to
    `question` in `layout`'s format (see the module's doc), with the style metadata Arena-Hard's style control
    reads — token_len (the model's own tokens; summed over turns) and markdown_counts (summed over turns).
    ValueError when the answers do not match the question's turns, or a "uid" question has more than one."""
    if len(answers) != len(question.turns):
        raise ValueError(f"question {question.question_id!r} has {len(question.turns)} turns but {len(answers)} "
                         "answers")
    counts = [markdown_counts(answer.text) for answer in answers]
    # Style control reads the features in this order, token_len first.
    metadata = {"token_len": sum(answer.n_tokens for answer in answers),
                **{name: {key: sum(count[name][key] for count in counts) for key in features}
                   for name, features in counts[0].items()}}
    if layout == "uid":
        if len(answers) != 1:
            raise ValueError(f"a question keyed by 'uid' has one turn, {question.question_id!r} has {len(answers)}")
        return {"uid": question.question_id, "ans_id": answer_id, "model": model_id,
                "messages": [{"role": "user", "content": question.turns[0]},
                             {"role": "assistant", "content": {"answer": answers[0].text}}],
                "tstamp": timestamp, "metadata": metadata}
    if layout == "question_id":
        turns = [{"content": answer.text, "token_len": answer.n_tokens} for answer in answers]
        return {"question_id": question.question_id, "answer_id": answer_id, "model_id": model_id,
                "choices": [{"index": 0, "turns": turns}], "tstamp": timestamp, "conv_metadata": metadata}
    raise ValueError(f"unknown Arena-Hard layout {layout!r}: one of {LAYOUTS}")


def export_arena_hard(config, questions_path: str | Path, output_path: str | Path, model_path: str | None = None,
                      model_id: str | None = None) -> EvaluationResult:
    """Answers of model_path (default: the seed model) to an Arena-Hard question file, written to output_path as
    Arena-Hard's answer JSONL in the question file's layout, one line per question in file order, its model named
    model_id (default CAMPAIGN-DIGEST); sampling is the last iteration's actor sampling. Raises
    EvaluationInputError for a question file load_arena_hard_questions refuses, before any model is loaded.
    Returns the evaluation to log: metrics export/answers (lines written), export/answer_turns,
    export/mean_tokens (per answer turn) and export/empty_answers (empty answer turns); its rows one per turn."""
    questions = load_arena_hard_questions(questions_path)
    with evaluated_model(config, model_path) as (model, digest, backend):
        answers = answer_questions(questions.questions, backend, config.iterations[-1].actor_sampling, config.seed)
    model_id = model_id or default_model_name(config.name, digest)
    records = [arena_hard_answer(question, turns, model_id, questions.layout,
                                 content_id(model_id, str(question.question_id), *(a.text for a in turns)), time.time())
               for question, turns in zip(questions.questions, answers, strict=True)]
    Path(output_path).write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records),
                                 encoding="utf-8")
    rows = pl.DataFrame(
        [(str(question.question_id), turn, asked, answer.text, answer.n_tokens, answer.finish_reason, model_id)
         for question, turns in zip(questions.questions, answers, strict=True)
         for turn, (asked, answer) in enumerate(zip(question.turns, turns, strict=True))],
        schema={"question_id": pl.String, "turn": pl.Int32, "question": pl.String, "answer": pl.String,
                "token_len": pl.Int64, "finish_reason": pl.String, "model_id": pl.String}, orient="row")
    metrics = {"export/answers": float(len(records)), "export/answer_turns": float(rows.height),
               "export/mean_tokens": float(np.mean(rows["token_len"].to_numpy())) if rows.height else 0.0,
               "export/empty_answers": float((rows["answer"] == "").sum())}
    return EvaluationResult("arena-hard-export", model, digest, metrics, str(questions_path), rows)
