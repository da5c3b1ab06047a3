"""Code reward: the response's program run on the row's tests inside the sandbox (`sandbox.py`);
1 only if every case passes. The test forms (stdin/stdout, function calls, unit tests) and the
judging of a case are `code_tests.py`.

All cases of a program run in one sandbox. Expected outputs of stdin/stdout and function tests
never enter the sandbox; they are compared here, and we stop at the first failing case (the
reward is all or nothing). Unit tests must run inside, next to the program: their file is deleted
before the program starts, and a pass needs a nonce the test driver prints only once the tests
finished."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field

from megatron_ring.data.code_tests import PYTHON_LANGUAGES, CodeTests, code_tests
from megatron_ring.rewards.code_judge import judge
from megatron_ring.rewards.sandbox import SandboxLimits, run_job


@dataclass
class SandboxResult:
    passed: int
    total: int
    all_passed: bool
    error: str | None = None  # the first failure, None when all passed


@dataclass(frozen=True)
class CodeRewardSettings:
    """How code is scored, bound to a reward pool (or a held-out evaluation) and passed to every
    score call: `hide` the host paths (run directory, checkpoints) the sandbox covers, `limits`
    the sandbox's, `float_tolerance` that of function results for rows without their own (the
    recipe's reward.float_tolerance)."""

    hide: tuple[str, ...] = ()
    limits: SandboxLimits = field(default_factory=SandboxLimits)
    float_tolerance: float = 0.0

    def __post_init__(self):
        object.__setattr__(self, "hide", tuple(str(p) for p in self.hide))
        if not self.float_tolerance >= 0:
            raise ValueError(f"float tolerance must be >= 0, got {self.float_tolerance}")
        object.__setattr__(self, "float_tolerance", float(self.float_tolerance))


_FENCE_LANGUAGE = re.compile(r"[ \t]*([\w+#.-]*)")


def _fenced_blocks(response: str):
    """(language, code) of every ``` block, as the regex ```[ \\t]*([\\w+#.-]*)[^\\n]*\\n(.*?)```
    (re.S) finds them, in linear time: that regex is quadratic on a run of backticks (every
    ``` tries the rest of the text for a newline), 40 s for 100 KB of them."""
    pos = 0
    while True:
        start = response.find("```", pos)
        if start < 0:
            return
        newline = response.find("\n", start + 3)
        if newline < 0:
            return  # no later ``` has a newline after it either
        end = response.find("```", newline + 1)
        if end < 0:
            return  # an unclosed block (cut off); no later ``` can be closed either
        header = response[start + 3:newline]
        yield _FENCE_LANGUAGE.match(header).group(1), response[newline + 1:end]
        pos = end + 3


def extract_program(response: str) -> str | None:
    """The last ```python block of a response, else its last ``` block; None when there is none
    (an unclosed block means the response was cut off)."""
    blocks = list(_fenced_blocks(response))
    if not blocks:
        return None
    python = [code for lang, code in blocks if lang.lower() in PYTHON_LANGUAGES]
    code = python[-1] if python else blocks[-1][1]
    return code if code.strip() else None


def sandbox_budget_s(row: dict, limits: SandboxLimits) -> float:
    """The sandbox's own wall clock for scoring a response to this row (startup + its cases)."""
    try:
        cases = len(code_tests(row).cases)
    except ValueError:
        cases = 1  # refused before any sandbox starts
    return limits.total_timeout_s(cases)


def run_code(program: str, tests: CodeTests, settings: CodeRewardSettings) -> SandboxResult:
    """Run `program` on every case of `tests` in one sandbox; stops at the first failure."""
    tol = settings.float_tolerance if tests.float_tolerance is None else tests.float_tolerance
    cases = tests.cases
    if tests.test_type == "unit":
        cases = [{**case, "nonce": secrets.token_hex(16)} for case in cases]
    total = len(cases)
    lines = run_job({"program": program, "mode": tests.test_type, "cases": cases}, settings.limits,
                    settings.hide, total)
    passed, error = 0, None
    try:
        for result in lines:
            status = result.get("status", "")
            if status.startswith("sandbox"):
                detail = f": {result['stderr'][:200]}" if result.get("stderr") else ""
                error = f"case {passed}: {status}{detail}"
                break
            reason = judge(result, tests, passed, cases[passed], tol)
            if reason is not None:
                error = f"case {passed}: {reason}"
                break
            passed += 1
            if passed == total:
                break
    finally:
        lines.close()  # kills the sandbox if it is still running
    return SandboxResult(passed, total, passed == total, None if passed == total else error)


def run_tests(program: str, tests: list[dict], settings: CodeRewardSettings, test_type: str = "stdio",
              fn_name: str | None = None) -> SandboxResult:
    """run_code on {input, output} cases given directly (stdio or function tests)."""
    try:
        parsed = code_tests({"code_test_cases": tests, "test_type": test_type, "fn_name": fn_name})
    except ValueError as e:
        return SandboxResult(0, len(tests), False, str(e))
    return run_code(program, parsed, settings)


def check_code(response: str, row: dict, settings: CodeRewardSettings) -> SandboxResult:
    """The code reward with its reason: the response's program against the row's tests."""
    try:
        tests = code_tests(row)
    except ValueError as e:
        return SandboxResult(0, 0, False, f"bad row: {e}")
    program = extract_program(response)
    if program is None:
        return SandboxResult(0, len(tests.cases), False, "no ``` code block in the response")
    return run_code(program, tests, settings)


def code_verdict(response: str, row: dict, settings: CodeRewardSettings) -> tuple[float, str | None]:
    """(reward, why it is 0): what the reward pool reports, so `megatron-ring score` can say why."""
    result = check_code(response, row, settings)
    return (1.0 if result.all_passed else 0.0), result.error


def score_code(response: str, row: dict, settings: CodeRewardSettings) -> float:
    return code_verdict(response, row, settings)[0]
