"""The code reward: programs extracted from responses (in linear time) and judged on their tests in the
sandbox, in the three forms (stdin/stdout, function calls, unit tests). Rows that cannot run are
refused when read: tests/test_code_tests.py."""

import random
import re
import time
from concurrent.futures import ThreadPoolExecutor

from megatron_ring.rewards.code_judge import same_value
from megatron_ring.rewards.code_reward import (CodeRewardSettings, _fenced_blocks, check_code, extract_program,
                                               run_tests, score_code)
from tests.sandbox_fixtures import demo_code_tasks, needs_bwrap
from tests.test_code_tests import HUMANEVAL, MBPP

SETTINGS = CodeRewardSettings()


def test_extract_program():
    assert extract_program("a\n```python\nx = 1\n```\nb\n```python\nprint(2)\n```") == "print(2)\n"
    assert extract_program("```python\nprint(1)\n```\n```text\nnot code\n```") == "print(1)\n"
    assert extract_program("```\nprint(3)\n```") == "print(3)\n"
    assert extract_program("```python\nprint(1)\n") is None  # cut off
    assert extract_program("no code here") is None


@needs_bwrap
def test_every_demo_teacher_program_scores_one():
    tasks = demo_code_tasks()
    assert {t["test_type"] for t in tasks} == {"stdio", "function"} and len(tasks) == 33
    with ThreadPoolExecutor(2) as threads:
        results = list(threads.map(lambda t: check_code(t["solution"], t, SETTINGS), tasks))
    for task, result in zip(tasks, results):
        assert result.all_passed and result.passed == result.total == 3, (task["prompt"], result)


@needs_bwrap
def test_wrong_programs_score_zero():
    stdio = {"code_test_cases": [{"input": "2 3\n", "output": "5\n"}, {"input": "4 4\n", "output": "8\n"}],
             "test_type": "stdio", "code_language": "python"}
    assert score_code("```python\na, b = map(int, input().split())\nprint(a + b)  \n```", stdio, SETTINGS) == 1.0
    wrong = check_code("```python\na, b = map(int, input().split())\nprint(a * b)\n```", stdio, SETTINGS)
    assert (wrong.all_passed, wrong.passed) == (False, 0) and "wrong output '6" in wrong.error
    half = check_code("```python\na, b = map(int, input().split())\nprint(8 if a == 4 else 6)\n```", stdio, SETTINGS)
    assert (half.passed, half.total) == (0, 2)
    raises = check_code("```python\nraise ValueError('nope')\n```", stdio, SETTINGS)
    assert not raises.all_passed and "ValueError: nope" in raises.error
    assert "no ``` code block" in check_code("print(5)", stdio, SETTINGS).error
    cpp = check_code("```cpp\nint main(){}\n```", {**stdio, "code_language": "cpp"}, SETTINGS)
    assert not cpp.all_passed and "not supported" in cpp.error
    assert not run_tests("print(1)", [], SETTINGS).all_passed


@needs_bwrap
def test_function_call_tests():
    row = {"code_test_cases": [{"input": "[[1, 2, 3], 2]", "output": "[2, 4, 6]"},
                               {"input": "[[], 5]", "output": "[]"}],
           "test_type": "function", "fn_name": "scale", "code_language": "python"}
    prints = "```python\ndef scale(xs, k):\n    print('debug')\n    return [k * x for x in xs]\n```"
    assert score_code(prints, row, SETTINGS) == 1.0  # its prints do not mix with the result
    assert score_code("```python\ndef scale(xs, k):\n    return tuple(k * x for x in xs)\n```", row, SETTINGS) == 1.0
    method = "```python\nclass Solution:\n    def scale(self, xs, k):\n        return [k * x for x in xs]\n```"
    assert score_code(method, row, SETTINGS) == 1.0  # LeetCode style
    wrong = check_code("```python\ndef scale(xs, k):\n    return xs\n```", row, SETTINGS)
    assert not wrong.all_passed and "wrong result" in wrong.error
    missing = check_code("```python\ndef other(xs, k):\n    return xs\n```", row, SETTINGS)
    assert not missing.all_passed and "no function 'scale'" in missing.error
    unserializable = check_code("```python\ndef scale(xs, k):\n    return {1, 2}\n```", row, SETTINGS)
    assert not unserializable.all_passed and "TypeError" in unserializable.error


# ---------------------------------------------------------------- extraction in linear time

_OLD_FENCE = re.compile(r"```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)```", re.S)  # the quadratic original


def test_extraction_matches_the_regex_it_replaced():
    rng = random.Random(0)
    pieces = ["`", "``", "```", "\n", "python", "py", " ", "\t", "x = 1", "cpp x", "-", "````"]
    for _ in range(4000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 24)))
        assert list(_fenced_blocks(text)) == _OLD_FENCE.findall(text), repr(text)


def test_extraction_is_linear_on_pathological_responses():
    """The regex took 41.7 s on 100 KB of backticks (5.2 s on 30 KB)."""
    n = 100_000
    hostile = {"backticks": "`" * n, "fence, no newline": "```python" + " " * n,
               "unclosed": "```python\n" + "x" * n, "fence per line": "```\n" * (n // 4),
               "almost fences": "``\n`" * (n // 4), "many blocks": "```py\nx\n```" * (n // 11),
               "backticks, newline at the end": "`" * n + "\n"}
    for name, text in hostile.items():
        start = time.perf_counter()
        extract_program(text)
        assert time.perf_counter() - start < 1.0, name


# ---------------------------------------------------------------- unit tests (HumanEval, MBPP)



def code(program: str) -> str:
    return f"Here it is.\n```python\n{program}\n```"


@needs_bwrap
def test_unit_tests_humaneval_and_mbpp_forms():
    assert check_code(code("def add(a, b):\n    print('noise')\n    return a + b"), HUMANEVAL, SETTINGS).all_passed
    wrong = check_code(code("def add(a, b):\n    return a * b"), HUMANEVAL, SETTINGS)
    assert not wrong.all_passed and (wrong.passed, wrong.total) == (0, 1)
    assert "test line 4 failed: assert candidate(2, 3) == 5 (AssertionError)" in wrong.error
    missing = check_code(code("def plus(a, b):\n    return a + b"), HUMANEVAL, SETTINGS)
    assert "NameError: name 'add' is not defined" in missing.error
    assert check_code(code("import math\ndef hyp(a, b):\n    return math.hypot(a, b)"), MBPP, SETTINGS).all_passed
    crashes = check_code(code("def hyp(a, b):\n    return (a * a + b * b) ** 0.5 if a > 1 else 1 / 0"), MBPP, SETTINGS)
    assert "test line 4 failed: assert math.isclose" in crashes.error and "ZeroDivisionError" in crashes.error
    # test_type "unit" declared, code_test_cases not needed; stdio rows are still stdio.
    assert check_code(code("def add(a, b):\n    return a + b"), {**HUMANEVAL, "test_type": "unit"}, SETTINGS).all_passed


@needs_bwrap
def test_unit_tests_pass_only_when_they_ran():
    """A pass is the driver's nonce, printed after the tests: exiting early, rebinding what the
    driver calls, forging its output or reading the test file beforehand all score 0."""
    hacks = {
        "exits before the tests": "import sys\nsys.exit(0)",
        "exits hard": "import os\nos.write(1, b'\\n\"passed\"\\n')\nos._exit(0)",
        "rebinds exec": "import builtins\nbuiltins.exec = lambda *a, **k: None\ndef add(a, b):\n    return 0",
        "rebinds sys.exit": "import sys\nsys.exit = lambda *a: None\ndef add(a, b):\n    return 0",
        "reads the tests first": ("import os, re\nfound = {}\nfor name in os.listdir('/tmp/.case'):\n"
                                  "    text = open('/tmp/.case/' + name).read()\n"
                                  "    found.update({(int(a), int(b)): int(c) for a, b, c in "
                                  "re.findall(r'candidate\\((-?\\d+), (-?\\d+)\\) == (-?\\d+)', text)})\n"
                                  "def add(a, b):\n    return found[(a, b)]"),
    }
    for name, program in hacks.items():
        result = check_code(code(program), HUMANEVAL, SETTINGS)
        assert not result.all_passed, (name, result)
    assert "did not finish" in check_code(code(hacks["exits before the tests"]), HUMANEVAL, SETTINGS).error


# ---------------------------------------------------------------- function results by type

def test_same_value_keeps_json_types_apart():
    assert not same_value(True, 1) and not same_value(1, True) and not same_value(0, False)
    assert same_value(True, True) and not same_value(None, 0) and not same_value("1", 1)
    assert same_value(1, 1.0) and same_value(2.0, 2)  # JSON has one number type
    assert not same_value(0.1 + 0.2, 0.3) and same_value(0.1 + 0.2, 0.3, tol=1e-9)
    assert same_value([1, [2.0000001, {"a": 3}]], [1, [2, {"a": 3}]], tol=1e-6)
    assert not same_value([1, [2.001, {"a": 3}]], [1, [2, {"a": 3}]], tol=1e-6)
    assert not same_value([1, 2], [1, 2, 3]) and not same_value({"a": 1}, {"a": 1, "b": 2})
    assert not same_value(1, 2, tol=5)  # the tolerance is for floats
    assert same_value(float("nan"), float("nan")) and same_value(float("inf"), float("inf"), tol=1)


@needs_bwrap
def test_function_results_compared_by_type():
    row = {"domain": "code", "prompt": "p", "test_type": "function", "fn_name": "f",
           "code_test_cases": [{"input": "[3]", "output": "true"}, {"input": "[4]", "output": "0.5"}]}
    right = "def f(x):\n    return True if x == 3 else 0.5"
    assert check_code(code(right), row, SETTINGS).all_passed
    as_int = check_code(code("def f(x):\n    return 1 if x == 3 else 0.5"), row, SETTINGS)
    assert not as_int.all_passed and as_int.error == "case 0: wrong result '1'"
    near = code("def f(x):\n    return True if x == 3 else 0.5 + 1e-7")
    assert not check_code(near, row, SETTINGS).all_passed
    assert check_code(near, {**row, "float_tolerance": 1e-6}, SETTINGS).all_passed
    # the caller's tolerance, for rows without their own, given with each call: no process state
    loose = CodeRewardSettings(float_tolerance=1e-6)
    assert check_code(near, row, loose).all_passed and not check_code(near, row, SETTINGS).all_passed
    assert not check_code(near, {**row, "float_tolerance": 0}, loose).all_passed  # the row's own wins
