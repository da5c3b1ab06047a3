"""The test forms of a code row, checked when the row is read (how one case's result is judged
is `rewards/code_judge.py`).

Three forms (paper 3.3), named by the row's `test_type`:
- "stdio": `code_test_cases` [{input, output}]: the program reads `input` on stdin, its stdout
  must equal `output` (trailing whitespace ignored);
- "function": `code_test_cases` [{input: JSON argument list, output: JSON value}] and `fn_name`:
  `fn_name(*input)` (or `Solution().fn_name`) must return `output`, compared by `same_value`;
- "unit": the program, then the row's test source, run in one namespace; it passes when the test
  code finishes without an exception. HumanEval form: `test` (defining `check(candidate)`) and
  `entry_point`, run as `test` + `check(entry_point)`; MBPP form: `test_list` (assert
  statements), after the optional `test_imports` (list) and `test_setup_code` (text).
Without `test_type`, a row with `test` or `test_list` and no `code_test_cases` is "unit", else
"stdio". Any other value, or a row its form cannot run, is refused when read: a row that can
never pass would score 0 on every response and teach the policy nothing."""

from __future__ import annotations

import json
from dataclasses import dataclass

TEST_TYPES = ("stdio", "function", "unit")
PYTHON_LANGUAGES = ("python", "python3", "py")


@dataclass(frozen=True)
class CodeTests:
    test_type: str
    cases: list  # what the sandbox runs per case: stdin text, {fn_name, args}, {test}
    expected: list  # per case: stdout text (stdio), a JSON value (function), None (unit)
    float_tolerance: float | None = None  # the row's own; None: the caller's CodeRewardSettings.float_tolerance


def _decode(value):
    """An expected function result: JSON text decoded; a value that is not JSON text kept as is."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def _function_args(value) -> list:
    """A JSON list of arguments; also accepted: one JSON value per line, or a single value."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            return [json.loads(line) for line in value.splitlines() if line.strip()]
    return value if isinstance(value, list) else [value]


def _io_cases(row: dict) -> list[dict]:
    cases = row.get("code_test_cases")
    if not isinstance(cases, list) or not cases or not all(
            isinstance(t, dict) and {"input", "output"} <= set(t) for t in cases):
        raise ValueError("'code_test_cases' must be a non-empty list of {input, output}")
    return cases


def _text_list(row: dict, key: str) -> list[str]:
    value = row.get(key, [])
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise ValueError(f"'{key}' must be a list of strings")
    return value


def _unit_source(row: dict) -> str:
    """The test code run after the program, in its namespace."""
    if ("test" in row) == ("test_list" in row):
        raise ValueError("a unit-test row has 'test' + 'entry_point' (HumanEval form) or 'test_list' "
                         "(MBPP form), exactly one of them")
    if "test" in row:
        test, entry = row["test"], row.get("entry_point")
        if not isinstance(test, str) or not test.strip():
            raise ValueError("'test' must be the non-empty source of the tests (defining check(candidate))")
        if not isinstance(entry, str) or not entry.isidentifier():
            raise ValueError(f"'entry_point' must name the function under test, got {entry!r}")
        source = f"{test}\n\ncheck({entry})\n"
    else:
        asserts = _text_list(row, "test_list")
        if not asserts or not all(a.strip() for a in asserts):
            raise ValueError("'test_list' must be a non-empty list of assert statements")
        setup = row.get("test_setup_code") or ""
        if not isinstance(setup, str):
            raise ValueError("'test_setup_code' must be text")
        source = "\n".join([*_text_list(row, "test_imports"), setup, *asserts]) + "\n"
    try:
        compile(source, "test", "exec")  # compiled only: a test that cannot run is the row's error
    except SyntaxError as e:
        raise ValueError(f"the test source does not compile: {e.msg} at its line {e.lineno}") from None
    return source


def _tolerance(row: dict) -> float | None:
    tol = row.get("float_tolerance")
    if tol is None:
        return None
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0:
        raise ValueError(f"'float_tolerance' must be a number >= 0, got {tol!r}")
    return float(tol)


def form_of(row: dict) -> str:
    """The row's test_type, declared or inferred."""
    declared = row.get("test_type")
    if declared is not None:
        return declared
    return "unit" if ("test" in row or "test_list" in row) and "code_test_cases" not in row else "stdio"


def code_tests(row: dict) -> CodeTests:
    """The row's test cases in the form the sandbox runs; ValueError naming the key when the row
    cannot be run (called when the row is read, and again when it is scored)."""
    language = str(row.get("code_language") or "python").lower()
    if language not in PYTHON_LANGUAGES:
        raise ValueError(f"'code_language' {language!r} is not supported (Python only)")
    kind = form_of(row)
    if kind not in TEST_TYPES:
        raise ValueError(f"'test_type' must be one of {list(TEST_TYPES)}, got {kind!r}")
    tol = _tolerance(row)
    if tol is not None and kind != "function":
        raise ValueError("'float_tolerance' applies to function results only (test_type 'function')")
    if kind == "unit":
        return CodeTests(kind, [{"test": _unit_source(row)}], [None])
    cases = _io_cases(row)
    if kind == "stdio":
        return CodeTests(kind, [str(t["input"]) for t in cases], [str(t["output"]) for t in cases])
    fn_name = row.get("fn_name")
    if not isinstance(fn_name, str) or not fn_name.isidentifier():
        raise ValueError(f"'fn_name' must name the function a function test calls, got {fn_name!r}")
    try:
        args = [_function_args(t["input"]) for t in cases]
    except (ValueError, RecursionError) as e:
        raise ValueError(f"a function test's 'input' is not JSON: {e}") from None
    return CodeTests(kind, [{"fn_name": fn_name, "args": a} for a in args],
                     [_decode(t["output"]) for t in cases], tol)
