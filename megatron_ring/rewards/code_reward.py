"""Code reward: the response's program run on the row's test cases inside the sandbox
(`sandbox.py`); 1 only if every case passes.

All cases of a program run in one sandbox. The expected outputs never enter the sandbox; they are
compared here, and we stop at the first failing case (the reward is all or nothing)."""

from __future__ import annotations

import json
import re
import signal
from dataclasses import dataclass

from megatron_ring.rewards.sandbox import SandboxLimits, run_job

PYTHON_LANGUAGES = ("python", "python3", "py")


@dataclass
class SandboxResult:
    passed: int
    total: int
    all_passed: bool
    error: str | None = None  # the first failure, None when all passed


_defaults = {"hide": (), "limits": SandboxLimits()}


def configure_sandbox(hide=None, limits: SandboxLimits | None = None) -> None:
    """Process-wide defaults for score_code (a reward worker sets the run's hidden paths once)."""
    if hide is not None:
        _defaults["hide"] = tuple(str(p) for p in hide)
    if limits is not None:
        _defaults["limits"] = limits


_FENCE = re.compile(r"```[ \t]*([\w+#.-]*)[^\n]*\n(.*?)```", re.S)


def extract_program(response: str) -> str | None:
    """The last ```python block of a response, else its last ``` block; None when there is none
    (an unclosed block means the response was cut off)."""
    blocks = _FENCE.findall(response)
    if not blocks:
        return None
    python = [code for lang, code in blocks if lang.lower() in PYTHON_LANGUAGES]
    code = python[-1] if python else blocks[-1][1]
    return code if code.strip() else None


def _normalize(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.rstrip().splitlines())


def _decode(value):
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
            value = [json.loads(line) for line in value.splitlines() if line.strip()]
            return value
    return value if isinstance(value, list) else [value]


def _short(text: str, n: int = 200) -> str:
    return text if len(text) <= n else text[:n] + "..."


def _judge(result: dict, test: dict, mode: str) -> str | None:
    """None when the case passed, else why it failed."""
    status, rc = result.get("status"), result.get("rc")
    if status != "exited":
        return status
    if rc != 0:
        tail = (result.get("stderr") or "").strip().splitlines()
        name = f" ({signal.Signals(-rc).name})" if rc < 0 and -rc in signal.valid_signals() else ""
        return f"exit code {rc}{name}" + (f": {_short(tail[-1])}" if tail else "")
    out = result.get("stdout", "")
    if mode == "stdio":
        if _normalize(out) == _normalize(str(test["output"])):
            return None
        return f"wrong output {_short(out)!r}"
    lines = [line for line in out.splitlines() if line.strip()]
    try:
        got = json.loads(lines[-1]) if lines else None
    except ValueError:
        got = None
    if lines and got == _decode(test["output"]):
        return None
    return f"wrong result {_short(lines[-1] if lines else '')!r}"


def run_tests(program: str, tests: list[dict], test_type: str = "stdio", fn_name: str | None = None,
              limits: SandboxLimits | None = None, hide=None) -> SandboxResult:
    """Run `program` on every test case in one sandbox; stops at the first failure."""
    limits = limits or _defaults["limits"]
    hide = _defaults["hide"] if hide is None else tuple(str(p) for p in hide)
    total = len(tests)
    if not tests:
        return SandboxResult(0, 0, False, "no test cases")
    if test_type not in ("stdio", "function"):
        return SandboxResult(0, total, False, f"unknown test_type {test_type!r}")
    if test_type == "stdio":
        cases = [str(t["input"]) for t in tests]
    else:
        try:
            cases = [_function_args(t["input"]) for t in tests]
        except ValueError as e:
            return SandboxResult(0, total, False, f"bad function test input: {e}")
    job = {"program": program, "mode": test_type, "fn_name": fn_name or "f", "cases": cases}
    lines = run_job(job, limits, hide, total)
    passed, error = 0, None
    try:
        for result in lines:
            status = result.get("status", "")
            if status.startswith("sandbox"):
                detail = f": {_short(result['stderr'])}" if result.get("stderr") else ""
                error = f"case {passed}: {status}{detail}"
                break
            reason = _judge(result, tests[passed], test_type)
            if reason is not None:
                error = f"case {passed}: {reason}"
                break
            passed += 1
            if passed == total:
                break
    finally:
        lines.close()  # kills the sandbox if it is still running
    return SandboxResult(passed, total, passed == total, None if passed == total else error)


def check_code(response: str, row: dict, limits: SandboxLimits | None = None, hide=None) -> SandboxResult:
    """The code reward with its reason: the response's program against the row's test cases."""
    tests = row.get("code_test_cases") or []
    language = str(row.get("code_language") or "python").lower()
    if language not in PYTHON_LANGUAGES:
        return SandboxResult(0, len(tests), False, f"language {language!r} is not supported (Python only)")
    program = extract_program(response)
    if program is None:
        return SandboxResult(0, len(tests), False, "no ``` code block in the response")
    return run_tests(program, tests, row.get("test_type") or "stdio", row.get("fn_name"), limits, hide)


def score_code(response: str, row: dict) -> float:
    return 1.0 if check_code(response, row).all_passed else 0.0
