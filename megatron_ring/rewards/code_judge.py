"""How one case of a code row's tests is judged from the sandbox harness's result: stdout
against the expected text (stdio), the returned JSON value against the expected one by
`same_value` (function), the driver's nonce (unit). The test forms are `data/code_tests.py`."""

from __future__ import annotations

import json
import math
import signal

from megatron_ring.data.code_tests import CodeTests


def same_value(got, want, tol: float = 0.0) -> bool:
    """Equality of JSON values that keeps their types apart where JSON does: a bool is not a
    number (True is not 1), null is only null, text only text. Numbers compare by value, ints and
    floats alike, because JSON has one number type (a reference serialised by another language
    cannot keep 2.0 apart from 2); within `tol` when either is a float; NaN equals NaN. Lists
    compare item by item (JSON writes tuples as lists), objects key by key."""
    if isinstance(got, bool) or isinstance(want, bool):
        return type(got) is type(want) and got == want
    if isinstance(got, (int, float)) and isinstance(want, (int, float)):
        if got == want:
            return True
        if isinstance(got, float) and isinstance(want, float) and math.isnan(got) and math.isnan(want):
            return True
        return bool(tol) and (isinstance(got, float) or isinstance(want, float)) and abs(got - want) <= tol
    if isinstance(got, list) and isinstance(want, list):
        return len(got) == len(want) and all(same_value(g, w, tol) for g, w in zip(got, want))
    if isinstance(got, dict) and isinstance(want, dict):
        return got.keys() == want.keys() and all(same_value(got[k], want[k], tol) for k in want)
    return type(got) is type(want) and got == want


def _short(text: str, n: int = 200) -> str:
    return text if len(text) <= n else text[:n] + "..."


def _normalize(text: str) -> str:
    return "\n".join(line.rstrip() for line in text.rstrip().splitlines())


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def judge(result: dict, tests: CodeTests, i: int, sent, tol: float) -> str | None:
    """None when case i passed, else why not. `result` is the harness's line for it, `sent` the
    case as the sandbox got it (a unit case carries the nonce its driver prints when the tests
    finish: exiting with 0 before them is not a pass)."""
    status, rc = result.get("status"), result.get("rc")
    if status != "exited":
        return status
    if rc != 0:
        tail = (result.get("stderr") or "").strip().splitlines()
        name = f" ({signal.Signals(-rc).name})" if rc < 0 and -rc in signal.valid_signals() else ""
        return f"exit code {rc}{name}" + (f": {_short(tail[-1])}" if tail else "")
    out = result.get("stdout", "")
    if tests.test_type == "stdio":
        return None if _normalize(out) == _normalize(tests.expected[i]) else f"wrong output {_short(out)!r}"
    last = _last_line(out)
    if tests.test_type == "unit":
        return None if last == sent["nonce"] else "the tests did not finish (the program exited before them)"
    try:
        got, ok = json.loads(last), True
    except (ValueError, RecursionError):
        ok = False
    try:
        if ok and same_value(got, tests.expected[i], tol):
            return None
    except RecursionError:
        pass
    return f"wrong result {_short(last)!r}"
