"""The driver of a function or unit-test case, run inside the sandbox in the case's own process
(stdlib only, Python 3.8+): `python -I -c TEXT MODE SPEC_PATH`, the text of this file sent by the
host in the job (`sandbox.py` reads it with importlib.resources; the harness starts it). It runs
the program (main.py) in a fresh namespace, then the call (function: spec fn_name, args) or the
tests (unit: spec test, nonce), and prints the result on a line of its own after the program's
output. Importing it runs nothing."""

import io
import json
import os
import sys


def report(e, test):
    line, tb = 0, e.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_filename == "test":
            line = tb.tb_lineno
        tb = tb.tb_next
    source = test.splitlines()[line - 1].strip()[:200] if line else ""
    message = " ".join(str(e).split())[:200]
    detail = type(e).__name__ + (f": {message}" if message else "")
    sys.stderr.write(f"test line {line} failed: {source} ({detail})")


def main():
    # Bound before the program runs: it may rebind builtins (exec, print, sys.exit) in this process.
    run, build, say, real = exec, compile, print, sys.stdout
    # The spec file goes before the program runs: a unit test's asserts are the expected answers.
    mode, spec_path = sys.argv[1], sys.argv[2]
    with open(spec_path) as f:
        spec = json.load(f)
    os.unlink(spec_path)
    sys.stdout = io.StringIO()
    scope = {"__name__": "solution"}
    with open("main.py") as f:
        run(build(f.read(), "main.py", "exec"), scope)
    if mode == "function":
        name = spec["fn_name"]
        fn = scope.get(name)
        if fn is None and isinstance(scope.get("Solution"), type):
            fn = getattr(scope["Solution"](), name, None)
        if not callable(fn):
            raise NameError(f"no function {name!r} in the program")
        result = json.dumps(fn(*spec["args"]))
    else:
        test, nonce = spec["test"], spec.pop("nonce")
        try:
            run(build(test, "test", "exec"), scope)
        except Exception as e:  # noqa: BLE001 (any failure of the tests fails the case)
            report(e, test)
            sys.exit(1)
            return  # sys.exit rebound by the program: still no nonce, no pass
        result = nonce  # printed only when the tests finished
    sys.stdout = real
    say()
    say(result)


if __name__ == "__main__":
    main()
