"""Arena-Hard's question files read and checked, its answer lines written, and turns answered in order, by hand."""

import json

import pytest

from metareward.config.campaign import SamplingConfig
from metareward.inference.base import Completion, GenerationResult
from metareward.pipeline.arena_hard import (
    ArenaHardQuestion,
    answer_questions,
    arena_hard_answer,
    export_arena_hard,
    load_arena_hard_questions,
    markdown_counts,
)
from metareward.pipeline.evaluation import EvaluationInputError
from tests.support import ScriptedBackend


def _write(path, *rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return path


def test_uid_questions_as_arena_hard_v2_writes_them(tmp_path):
    # data/arena-hard-v2.0/question.jsonl at arena-hard-auto 196f6b8 (v0.1's file there has the same fields).
    path = _write(tmp_path / "question.jsonl",
                  {"uid": "2edbb5f36f5b42be", "category": "hard_prompt", "subcategory": "coding", "prompt": "Zig?"},
                  "",
                  {"uid": "ec71c09662a64365", "category": "creative_writing", "prompt": "A poem."})
    questions = load_arena_hard_questions(path)
    assert questions.layout == "uid"
    assert questions.questions == (ArenaHardQuestion("2edbb5f36f5b42be", ("Zig?",), 1),
                                   ArenaHardQuestion("ec71c09662a64365", ("A poem.",), 3))


def test_question_id_questions_keep_their_turns_and_id_type(tmp_path):
    # data/arena-hard-v0.1/question.jsonl at arena-hard-auto 3071ef9 (v0.1 release), and MT-Bench-style integer ids.
    path = _write(tmp_path / "question.jsonl",
                  {"question_id": "328c149ed45a41c0b9d6f14659e63599", "category": "arena-hard-v0.1",
                   "cluster": "ABC Sequence Puzzles & Groups", "turns": [{"content": "Write a melody."}]},
                  {"question_id": 81, "category": "writing", "turns": [{"content": "First"}, {"content": "Second"}]})
    questions = load_arena_hard_questions(path)
    assert questions.layout == "question_id"
    assert [(q.question_id, q.turns) for q in questions.questions] == [
        ("328c149ed45a41c0b9d6f14659e63599", ("Write a melody.",)), (81, ("First", "Second"))]


UID = {"uid": "a", "prompt": "p"}


@pytest.mark.parametrize("rows,expected", [
    ([UID, {"id": "b", "prompt": "q"}], "line 2: no 'uid' or 'question_id' field (fields: ['id', 'prompt'])"),
    ([{"uid": "a", "turns": [{"content": "p"}]}], "line 1 has no 'prompt' field"),
    ([{"uid": "a", "prompt": ["p"]}], "line 1: 'prompt' must be text, got list"),
    ([{"question_id": 1, "turns": [{"content": "p"}, {"text": "q"}]}], "line 1: 'turns'[1]['content'] must be text"),
    ([{"question_id": 1, "turns": []}], "line 1: 'turns' must be a non-empty list"),
    ([UID, {"question_id": "b", "turns": [{"content": "q"}]}],
     "line 2: a question keyed by 'question_id' in a file whose first question is keyed by 'uid'"),
    ([UID, {"uid": "b", "prompt": "q"}, UID], "line 3: 'uid' 'a' is also line 1's"),
    ([UID, "{not json"], "line 2: not valid JSON"),
    ([UID, '["a", "p"]'], "line 2: expected a JSON object, got list"),
    ([{"uid": True, "prompt": "p"}], "line 1: 'uid' must be text or a whole number, got True"),
    ([""], "no question"),
])
def test_bad_question_files_name_the_file_line_and_field(tmp_path, rows, expected):
    path = _write(tmp_path / "bad.jsonl", *rows)
    with pytest.raises(EvaluationInputError) as raised:
        load_arena_hard_questions(path)
    assert str(raised.value).startswith(f"{path}: ") and expected in str(raised.value)


def test_question_file_not_utf8_or_missing(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"uid": "a", "prompt": "p"}\n{"uid": "b", "prompt": "caf\xe9"}\n')
    with pytest.raises(EvaluationInputError, match=r"latin1.jsonl: line 2: bytes that are not UTF-8"):
        load_arena_hard_questions(path)
    with pytest.raises(EvaluationInputError, match=r"nope.jsonl: no such Arena-Hard question file"):
        load_arena_hard_questions(tmp_path / "nope.jsonl")


def test_markdown_counts_as_arena_hard_counts_them():
    text = ("# Title\n## Part\nSome **bold** and __also__ and **unclosed\n1. one\n2. two\n- a\n  * b\n+ c\n"
            "```\n# not a header\n- not a list\n```\n###### six\n#no-space\n")
    assert markdown_counts(text) == {
        "header_count": {"h1": 1, "h2": 1, "h3": 0, "h4": 0, "h5": 0, "h6": 1},
        "list_count": {"ordered": 2, "unordered": 3},
        "bold_count": {"**": 1, "__": 1},
    }


def test_a_uid_answer_line_is_what_arena_hard_v2_reads():
    question = ArenaHardQuestion("u1", ("Q?",), 1)
    line = arena_hard_answer(question, [Completion("# A\n- x", 4, "stop")], "m", "uid", "id1", 12.5)
    assert line == {
        "uid": "u1", "ans_id": "id1", "model": "m",
        "messages": [{"role": "user", "content": "Q?"}, {"role": "assistant", "content": {"answer": "# A\n- x"}}],
        "tstamp": 12.5,
        "metadata": {"token_len": 4, "header_count": {"h1": 1, "h2": 0, "h3": 0, "h4": 0, "h5": 0, "h6": 0},
                     "list_count": {"ordered": 0, "unordered": 1}, "bold_count": {"**": 0, "__": 0}},
    }
    # show_result.py (196f6b8) turns the metadata into style features in this order: length first.
    features = [v if isinstance(v, int) else sum(v.values()) for k, v in line["metadata"].items()]
    assert features == [4, 1, 1, 0]
    with pytest.raises(ValueError, match="has 1 turns but 2 answers"):
        arena_hard_answer(question, [Completion("a", 1, "stop")] * 2, "m", "uid", "id1", 0.0)


def test_a_question_id_answer_line_has_every_turn_with_its_tokens():
    question = ArenaHardQuestion(81, ("First", "Second"), 1)
    answers = [Completion("**one**", 3, "stop"), Completion("1. two", 2, "length")]
    line = arena_hard_answer(question, answers, "m", "question_id", "id2", 1.0)
    assert {k: line[k] for k in ("question_id", "answer_id", "model_id", "tstamp")} == {
        "question_id": 81, "answer_id": "id2", "model_id": "m", "tstamp": 1.0}
    assert line["choices"] == [{"index": 0, "turns": [{"content": "**one**", "token_len": 3},
                                                      {"content": "1. two", "token_len": 2}]}]
    assert line["conv_metadata"]["token_len"] == 5
    assert line["conv_metadata"]["bold_count"] == {"**": 1, "__": 0}
    assert line["conv_metadata"]["list_count"] == {"ordered": 1, "unordered": 0}


def test_turns_are_answered_in_order_with_the_conversation_so_far():
    backend = ScriptedBackend(lambda prompt, n, seed: [f"re: {prompt}"])
    questions = [ArenaHardQuestion("a", ("A1", "A2"), 1), ArenaHardQuestion("b", ("B1",), 2)]
    answers = answer_questions(questions, backend, SamplingConfig(temperature=0.5, max_tokens=7), seed=3)
    assert [[c.text for c in turns] for turns in answers] == [["re: A1", "re: A2"], ["re: B1"]]
    assert [c.n_tokens for c in answers[0]] == [2, 2]
    first, second, third = backend.requests
    assert [m["content"] for m in first.messages] == ["A1"] and [m["content"] for m in second.messages] == ["B1"]
    assert list(third.messages) == [{"role": "user", "content": "A1"}, {"role": "assistant", "content": "re: A1"},
                                    {"role": "user", "content": "A2"}]
    assert {(r.n, r.temperature, r.max_tokens) for r in backend.requests} == {(1, 0.5, 7)}
    assert len({r.seed for r in backend.requests}) == 3


def test_a_turn_too_long_for_the_context_gets_an_empty_answer():
    class TooLong(ScriptedBackend):
        def generate(self, requests):
            return [GenerationResult((), prompt_tokens=9, skipped="prompt_too_long") for _ in requests]

    [[answer]] = answer_questions([ArenaHardQuestion("a", ("Q",), 1)], TooLong(lambda *_: []), SamplingConfig(), 0)
    assert answer == Completion("", 0, "prompt_too_long")


def test_export_refuses_a_bad_question_file_before_loading_a_model(tmp_path):
    path = _write(tmp_path / "bad.jsonl", {"uid": "a"})
    # The config is never read: the question file is checked first.
    with pytest.raises(EvaluationInputError, match=r"bad.jsonl: line 1 has no 'prompt' field"):
        export_arena_hard(None, path, tmp_path / "out.jsonl")
