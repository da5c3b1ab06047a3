"""The harness that runs inside the sandbox as its pid 1 (stdlib only, Python 3.8+): it reads a
job (program, mode, cases, limits, driver) on stdin, runs each case as its own process under
rlimits and a wall clock, and writes one JSON line per case on stdout.

A program, not a library: `sandbox.py` reads this file's text (importlib.resources) and runs it
with the sandbox's interpreter (`python -I -c TEXT`), since no host path of the package is inside
the sandbox. Importing it runs nothing. Function and unit cases run the job's `driver`
(`sandbox_driver.py`, sent by the host the same way) in each case's process."""

import ctypes
import json
import os
import resource
import selectors
import signal
import subprocess
import sys
import time


def limiter(lim):
    def apply():
        mb = 1 << 20
        for name, value in (("RLIMIT_CPU", (lim["cpu_s"], lim["cpu_s"] + 1)),
                            ("RLIMIT_AS", (lim["memory_mb"] * mb,) * 2),
                            ("RLIMIT_NPROC", (lim["processes"] + 1,) * 2),  # + the harness (pid 1)
                            ("RLIMIT_FSIZE", (lim["file_mb"] * mb,) * 2),
                            ("RLIMIT_NOFILE", (lim["open_files"],) * 2),
                            ("RLIMIT_CORE", (0, 0))):
            resource.setrlimit(getattr(resource, name), value)
    return apply


def kill_others():
    """SIGKILL and reap every other process of the sandbox (we are its init); True once none is left."""
    for _ in range(2000):
        try:
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            return True
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            pass
        time.sleep(0.001)
    return False


def run_case(argv, stdin_path, lim):
    with open(stdin_path, "rb") as stdin:
        proc = subprocess.Popen(argv, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                preexec_fn=limiter(lim), start_new_session=True)  # noqa: PLW1509 (one thread)
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ, "out")
    sel.register(proc.stderr, selectors.EVENT_READ, "err")
    out, err, status, exited = bytearray(), bytearray(), None, False
    deadline = time.monotonic() + lim["case_timeout_s"]
    cap = lim["output_kb"] * 1024
    while sel.get_map() and status is None:
        left = deadline - time.monotonic()
        if left <= 0:
            status = "timeout"
            break
        events = sel.select(0 if exited else min(left, 0.05))
        if exited and not events:
            break  # the program is done; what its leftover children hold open does not count
        exited = exited or proc.poll() is not None
        for key, _ in events:
            chunk = os.read(key.fd, 1 << 16)
            if not chunk:
                sel.unregister(key.fileobj)
            elif key.data == "out":
                out += chunk
                if len(out) > cap:
                    status = "output limit"
            else:
                err = (err + chunk)[-2048:]
    if status is None:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            status = "timeout"
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    rc = proc.wait()
    clean = kill_others()
    sel.close()
    proc.stdout.close()
    proc.stderr.close()
    return {"status": status or "exited", "rc": rc, "clean": clean,
            "stdout": out[:cap].decode("utf-8", "replace"),
            "stderr": err.decode("utf-8", "replace")}


def main():
    # We are pid 1 of the sandbox (bwrap --as-pid-1): the program cannot signal us. Not dumpable:
    # it cannot reach our stdout, the pipe to the host, through /proc/1/fd either.
    if ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0)")
    job = json.load(sys.stdin)
    lim = job["limits"]
    os.makedirs("/tmp/.case", exist_ok=True)
    for i, case in enumerate(job["cases"]):
        with open("/tmp/box/main.py", "w") as f:  # fresh each case: a program may rewrite itself
            f.write(job["program"])
        stdin_path, spec_path = f"/tmp/.case/stdin{i}", f"/tmp/.case/spec{i}.json"
        with open(stdin_path, "w") as f:
            f.write(case if job["mode"] == "stdio" else "")
        if job["mode"] == "stdio":
            argv = [sys.executable, "-I", "main.py"]
        else:  # function, unit: the driver runs the program and then the call or the tests
            with open(spec_path, "w") as f:
                json.dump(case, f)
            argv = [sys.executable, "-I", "-c", job["driver"], job["mode"], spec_path]
        result = run_case(argv, stdin_path, lim)
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()
        if not result["clean"]:
            return


if __name__ == "__main__":
    main()
