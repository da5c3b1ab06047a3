"""The test forms of a code row (data/code_tests.py), checked when the row is read: rows whose
tests cannot run are refused with file:line and the key at fault. Running them is
tests/test_code_reward.py."""

import json

from megatron_ring.data.jsonl_rows import RowReport
from megatron_ring.data.rl_prompts import read_prompts

# Unit-test rows in HumanEval's form (test + entry_point) and MBPP's (test_list); the code
# reward's tests run programs on them.
HUMANEVAL = {"domain": "code", "prompt": "Write add(a, b).", "entry_point": "add",
             "test": "METADATA = {}\n\ndef check(candidate):\n    assert candidate(2, 3) == 5\n"
                     "    assert candidate(-1, 1) == 0\n"}
MBPP = {"domain": "code", "prompt": "Write hyp(a, b).", "test_imports": ["import math"],
        "test_setup_code": "EPS = 1e-9",
        "test_list": ["assert hyp(3, 4) == 5.0", "assert math.isclose(hyp(1, 1), 2 ** 0.5, abs_tol=EPS)"]}


def test_code_rows_that_cannot_run_are_refused_when_read(tmp_path):
    stdio = {"domain": "code", "prompt": "p", "code_test_cases": [{"input": "1\n", "output": "1\n"}]}
    rows = [
        HUMANEVAL, MBPP, stdio, {**stdio, "test_type": "stdio"},
        {**stdio, "test_type": "assert"},
        {**stdio, "test_type": "function"},
        {**stdio, "test_type": "function", "fn_name": "f", "float_tolerance": -1},
        {**stdio, "float_tolerance": 0.1},
        {**stdio, "code_language": "cpp"},
        {**HUMANEVAL, "test_list": ["assert True"]},
        {**HUMANEVAL, "entry_point": "not a name"},
        {**HUMANEVAL, "test": "def check(candidate):\n    assert candidate(1 == 1\n"},
        {**MBPP, "test_list": []},
        {**MBPP, "test_imports": "import math"},
        {"domain": "code", "prompt": "p", "test_type": "unit"},
    ]
    f = tmp_path / "rl.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = RowReport()
    kept = read_prompts([str(f)], on_bad="skip", show=20, report=report)
    assert len(kept) == 4 and report.n_bad == len(rows) - 4
    expected = ["'test_type' must be one of ['stdio', 'function', 'unit'], got 'assert'",
                "'fn_name' must name the function",
                "'float_tolerance' must be a number >= 0, got -1",
                "'float_tolerance' applies to function results only",
                "'code_language' 'cpp' is not supported",
                "exactly one of them",
                "'entry_point' must name the function under test, got 'not a name'",
                "the test source does not compile",
                "'test_list' must be a non-empty list of assert statements",
                "'test_imports' must be a list of strings",
                "exactly one of them"]
    for line, (where, text) in enumerate(zip(report.first, expected), start=5):
        assert where.startswith(f"{f}:{line}: ") and text in where, (where, text)
