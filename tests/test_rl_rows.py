"""The released Ring-lite RL row form (no "domain"; code rows with mid, dataset, difficulty,
groundtruth, code_language, code_test_cases; math rows with an answer or groundtruth) read into
the prompt rows the verifiers score; bad rows named by file:line and key."""

import json

import pytest

from megatron_ring.data.code_tests import code_tests
from megatron_ring.data.jsonl_rows import DataError, RowReport
from megatron_ring.data.rl_prompts import parse_prompt_row, read_prompts
from megatron_ring.rewards.code_reward import CodeRewardSettings
from megatron_ring.rewards.reward_pool import score_one

CASES = [{"input": "2 3\n", "output": "5\n"}, {"input": "10 -4\n", "output": "6\n"}]
CODE = {"mid": "cc-0017", "dataset": "code_contests", "difficulty": 3, "code_language": "python",
        "question": "Read two integers and print their sum.",
        "groundtruth": "a, b = map(int, input().split())\nprint(a + b)", "code_test_cases": CASES}
MATH = {"mid": "m-0001", "dataset": "aime", "question": "What is 6*7?", "groundtruth": "42"}


def write_rows(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_released_code_row():
    row = parse_prompt_row(CODE, "rl.jsonl:1")
    assert (row.domain, row.prompt, row.answer, row.source) == ("code", CODE["question"], None, "rl.jsonl:1")
    assert {k: row.row[k] for k in ("mid", "dataset", "difficulty", "groundtruth")} == \
        {k: CODE[k] for k in ("mid", "dataset", "difficulty", "groundtruth")}
    tests = code_tests(row.row)  # what the sandbox runs: stdin text, expected stdout
    assert (tests.test_type, tests.cases, tests.expected) == ("stdio", ["2 3\n", "10 -4\n"], ["5\n", "6\n"])
    as_text = parse_prompt_row({**CODE, "code_test_cases": json.dumps(CASES)})  # parquet exports may hold JSON text
    assert as_text.row["code_test_cases"] == CASES and code_tests(as_text.row) == tests
    assert parse_prompt_row({**CODE, "domain": "code"}).row == row.row  # an explicit domain reads the same


def test_released_math_row_is_scored_by_its_groundtruth():
    row = parse_prompt_row(MATH)
    assert (row.domain, row.prompt, row.answer, row.row["answer"]) == ("math", "What is 6*7?", "42", "42")
    settings = CodeRewardSettings()
    assert score_one(row.domain, "6*7 = \\boxed{42}", row.row, settings).reward == 1.0
    assert score_one(row.domain, "\\boxed{41}", row.row, settings).reward == 0.0
    assert parse_prompt_row({"prompt": "p", "answer": ["\\frac{1}{2}"]}).answer == "\\frac{1}{2}"
    assert parse_prompt_row({"problem": "p", "answer": 7, "groundtruth": "x"}).answer == "7"  # answer first
    science = parse_prompt_row({"domain": "science", "question": "Which? A) x B) y", "groundtruth": "B"})
    assert (science.domain, science.answer) == ("science", "B")


def test_demo_row_form_still_reads():
    row = parse_prompt_row({"domain": "math", "prompt": "1+1?", "answer": 2})
    assert (row.domain, row.prompt, row.answer) == ("math", "1+1?", "2")


@pytest.mark.parametrize("bad, error", [
    ({**CODE, "code_language": "cpp"}, "'code_language' 'cpp' is not supported"),
    ({**CODE, "code_test_cases": "[{\"input\": 1"}, "'code_test_cases' is text but not JSON"),
    ({**CODE, "code_test_cases": [{"input": "1"}]}, "'code_test_cases' must be a non-empty list of {input, output}"),
    ({"mid": "x", "question": "q"}, "missing 'domain' (math|science|code), and no 'code_test_cases'"),
    ({**MATH, "groundtruth": " "}, "missing or empty 'answer' (or 'groundtruth')"),
    ({"mid": "x", "groundtruth": "1"}, "missing or empty 'prompt' (or 'question', 'problem')"),
    ({**MATH, "domain": "poetry"}, "'domain' must be one of"),
])
def test_bad_released_rows_name_file_line_and_key(tmp_path, bad, error):
    f = write_rows(tmp_path / "rl.jsonl", [CODE, bad, MATH])
    report = RowReport()
    rows = read_prompts([str(f)], on_bad="skip", report=report)
    assert [r.domain for r in rows] == ["code", "math"] and [r.source for r in rows] == [f"{f}:1", f"{f}:3"]
    assert report.n_bad == 1 and report.first[0].startswith(f"{f}:2: {error}")
    with pytest.raises(DataError, match=rf"bad RL prompt rows: 3 rows read, 2 kept, 1 bad .*\n  {f}:2: "):
        read_prompts([str(f)])


def test_domain_filter_over_released_rows(tmp_path):
    f = write_rows(tmp_path / "rl.jsonl", [MATH, CODE, CODE])
    assert [r.row["mid"] for r in read_prompts([str(f)], domains=["code"])] == ["cc-0017", "cc-0017"]
    with pytest.raises(DataError, match=r"no prompts of domains \['science'\]"):
        read_prompts([str(f)], domains=["science"])
