"""The code reward: programs extracted from responses and judged on their test cases in the sandbox."""

from concurrent.futures import ThreadPoolExecutor

from megatron_ring.rewards.code_reward import check_code, extract_program, run_tests, score_code
from tests.sandbox_fixtures import demo_code_tasks, needs_bwrap


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
        results = list(threads.map(lambda t: check_code(t["solution"], t), tasks))
    for task, result in zip(tasks, results):
        assert result.all_passed and result.passed == result.total == 3, (task["prompt"], result)


@needs_bwrap
def test_wrong_programs_score_zero():
    stdio = {"code_test_cases": [{"input": "2 3\n", "output": "5\n"}, {"input": "4 4\n", "output": "8\n"}],
             "test_type": "stdio", "code_language": "python"}
    assert score_code("```python\na, b = map(int, input().split())\nprint(a + b)  \n```", stdio) == 1.0
    wrong = check_code("```python\na, b = map(int, input().split())\nprint(a * b)\n```", stdio)
    assert (wrong.all_passed, wrong.passed) == (False, 0) and "wrong output '6" in wrong.error
    half = check_code("```python\na, b = map(int, input().split())\nprint(8 if a == 4 else 6)\n```", stdio)
    assert (half.passed, half.total) == (0, 2)
    raises = check_code("```python\nraise ValueError('nope')\n```", stdio)
    assert not raises.all_passed and "ValueError: nope" in raises.error
    assert "no ``` code block" in check_code("print(5)", stdio).error
    cpp = check_code("```cpp\nint main(){}\n```", {**stdio, "code_language": "cpp"})
    assert not cpp.all_passed and "not supported" in cpp.error
    assert not run_tests("print(1)", []).all_passed


@needs_bwrap
def test_function_call_tests():
    row = {"code_test_cases": [{"input": "[[1, 2, 3], 2]", "output": "[2, 4, 6]"},
                               {"input": "[[], 5]", "output": "[]"}],
           "test_type": "function", "fn_name": "scale", "code_language": "python"}
    prints = "```python\ndef scale(xs, k):\n    print('debug')\n    return [k * x for x in xs]\n```"
    assert score_code(prints, row) == 1.0  # its prints do not mix with the result
    assert score_code("```python\ndef scale(xs, k):\n    return tuple(k * x for x in xs)\n```", row) == 1.0
    method = "```python\nclass Solution:\n    def scale(self, xs, k):\n        return [k * x for x in xs]\n```"
    assert score_code(method, row) == 1.0  # LeetCode style
    wrong = check_code("```python\ndef scale(xs, k):\n    return xs\n```", row)
    assert not wrong.all_passed and "wrong result" in wrong.error
    missing = check_code("```python\ndef other(xs, k):\n    return xs\n```", row)
    assert not missing.all_passed and "no function 'scale'" in missing.error
    unserializable = check_code("```python\ndef scale(xs, k):\n    return {1, 2}\n```", row)
    assert not unserializable.all_passed and "TypeError" in unserializable.error
