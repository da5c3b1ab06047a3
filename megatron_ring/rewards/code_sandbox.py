"""Code reward: the model's program run on the test cases inside a bubblewrap sandbox; 1 only if
every case passes.

Why a sandbox: the program is written by the policy being trained, so it can be anything (fork bomb,
memory bomb, endless loop, a socket to the trainer, a read of the checkpoints). Layers:

- bubblewrap (`bwrap`): new user, pid, net, ipc, uts namespaces; `/` bound read-only; a fresh,
  size-capped tmpfs at /tmp whose /tmp/box is the working directory; /run and the caller's `hide`
  paths (the run directory, checkpoints) covered by empty read-only tmpfs; dies with its parent.
- bwrap itself is started as an unprivileged uid (65534) when we are root: RLIMIT_NPROC is not
  enforced for real root, nor for a namespace uid that maps to root.
- per-case rlimits (CPU, address space, processes, file size, open files, no core) set by a small
  harness inside the sandbox on each program process, a per-case wall clock that kills the case's
  process group and every other process in the sandbox's pid namespace, capped output, and an outer
  wall clock that kills bwrap (its pid namespace and everything in it goes with it).

All cases of a program run in one sandbox: the harness reads the job (program, inputs, limits) on
stdin and writes one JSON line per case. The expected outputs never enter the sandbox; they are
compared here, and we stop at the first failing case (the reward is all or nothing). Without bwrap
we raise: code is never run unsandboxed."""

from __future__ import annotations

import functools
import json
import os
import re
import selectors
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

SANDBOX_UID = 65534  # nobody: what bwrap runs as when we are root
DEFAULT_HIDE = ("/run",)  # host sockets (docker, systemd, ...) live here
PYTHON_LANGUAGES = ("python", "python3", "py")


class SandboxUnavailable(RuntimeError):
    """bwrap missing or unable to start a sandbox: a setup problem, never a program's score."""


@dataclass(frozen=True)
class SandboxLimits:
    cpu_s: int = 5              # RLIMIT_CPU of each program process
    case_timeout_s: float = 5.0  # wall clock of one test case
    memory_mb: int = 1024       # RLIMIT_AS of each program process
    processes: int = 8          # RLIMIT_NPROC: processes and threads of the program, per sandbox
    file_mb: int = 16           # RLIMIT_FSIZE: largest file the program may write
    open_files: int = 64        # RLIMIT_NOFILE
    output_kb: int = 1024       # stdout kept per case; more fails the case
    tmpfs_mb: int = 64          # size of the sandbox's private /tmp (its working directory)
    startup_s: float = 10.0     # outer wall clock on top of the cases' own

    def total_timeout_s(self, cases: int) -> float:
        return self.startup_s + cases * (self.case_timeout_s + 1.0)


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


# ---------------------------------------------------------------- extracting the program

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


# ---------------------------------------------------------------- the harness inside the sandbox

# Runs under the sandbox's own Python (stdlib only, 3.8+). One JSON line per case on stdout.
HARNESS = r'''
import json, os, resource, selectors, signal, subprocess, sys, time

DRIVER = """
import io, json, sys
name, args_path = sys.argv[1], sys.argv[2]
with open(args_path) as f:
    args = json.load(f)
real, sys.stdout = sys.stdout, io.StringIO()
scope = {"__name__": "solution"}
with open("main.py") as f:
    exec(compile(f.read(), "main.py", "exec"), scope)
fn = scope.get(name)
if fn is None and isinstance(scope.get("Solution"), type):
    fn = getattr(scope["Solution"](), name, None)
if not callable(fn):
    raise NameError("no function %r in the program" % name)
result = fn(*args)
sys.stdout = real
print()
print(json.dumps(result))
"""


def limiter(lim):
    def apply():
        mb = 1 << 20
        for name, value in (("RLIMIT_CPU", (lim["cpu_s"], lim["cpu_s"] + 1)),
                            ("RLIMIT_AS", (lim["memory_mb"] * mb,) * 2),
                            ("RLIMIT_NPROC", (lim["processes"] + 2,) * 2),  # + init, harness
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
                                preexec_fn=limiter(lim), start_new_session=True)
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
    import ctypes
    if ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE, 0)")
    job = json.load(sys.stdin)
    lim = job["limits"]
    os.makedirs("/tmp/.case", exist_ok=True)
    for i, case in enumerate(job["cases"]):
        with open("/tmp/box/main.py", "w") as f:  # fresh each case: a program may rewrite itself
            f.write(job["program"])
        stdin_path, args_path = "/tmp/.case/stdin%d" % i, "/tmp/.case/args%d.json" % i
        with open(stdin_path, "w") as f:
            f.write(case if job["mode"] == "stdio" else "")
        if job["mode"] == "stdio":
            argv = [sys.executable, "-I", "main.py"]
        else:
            with open(args_path, "w") as f:
                json.dump(case, f)
            argv = [sys.executable, "-I", "-c", DRIVER, job["fn_name"], args_path]
        result = run_case(argv, stdin_path, lim)
        sys.stdout.write(json.dumps(result) + "\n")
        sys.stdout.flush()
        if not result["clean"]:
            return


main()
'''


# ---------------------------------------------------------------- starting the sandbox

def _others_can_reach(path: str, run: bool = False) -> bool:
    """Can an unprivileged uid reach `path` (every parent directory o+x), and run it?"""
    path = os.path.realpath(path)
    try:
        if run and not os.stat(path).st_mode & 0o001:
            return False
        parent = os.path.dirname(path)
        while True:
            if not os.stat(parent).st_mode & 0o001:
                return False
            if parent == "/":
                return True
            parent = os.path.dirname(parent)
    except OSError:
        return False


def sandbox_python() -> str:
    """An interpreter the sandbox uid can run: ours if reachable (ours may live under /root),
    else the system one. The harness and the programs need only the standard library."""
    candidates = [sys.executable, shutil.which("python3") or "", "/usr/bin/python3", "/usr/local/bin/python3"]
    for candidate in candidates:
        if candidate and (os.geteuid() != 0 or _others_can_reach(candidate, run=True)):
            if os.path.exists(candidate):
                return os.path.realpath(candidate)
    raise SandboxUnavailable(
        f"no Python interpreter the sandbox uid {SANDBOX_UID} can run (tried {candidates}); "
        "install Debian's python3 (apt-get install python3)")


def bwrap_path() -> str:
    path = shutil.which("bwrap")
    if path is None:
        raise SandboxUnavailable(
            "bubblewrap (bwrap) not found: code rewards run programs only inside it. Install it with "
            "`apt-get install bubblewrap` (`make install` does this).")
    return path


@functools.lru_cache(maxsize=None)
def _bwrap_options(path: str) -> frozenset:
    text = subprocess.run([path, "--help"], capture_output=True, text=True, timeout=10).stdout
    options = frozenset(re.findall(r"^\s+(--[\w-]+)", text, re.M))
    if "--size" not in options:
        raise SandboxUnavailable(f"{path} has no --size option (bubblewrap >= 0.7 needed): the sandbox's "
                                 "/tmp would be unbounded in RAM")
    return options


def _hide_args(hide) -> list[str]:
    args = []
    for raw in (*DEFAULT_HIDE, *hide):
        path = os.path.realpath(str(raw))
        if path == "/":
            raise ValueError("cannot hide / from the sandbox")
        if path == "/tmp" or path.startswith("/tmp/") or not os.path.exists(path):
            continue  # the sandbox's /tmp is its own tmpfs: host /tmp is never visible
        if os.geteuid() == 0 and not _others_can_reach(path):
            continue  # e.g. under /root: out of the sandbox uid's reach already (and of bwrap's)
        if os.path.isdir(path):
            args += ["--size", "4096", "--tmpfs", path, "--remount-ro", path]
        else:
            args += ["--ro-bind", "/dev/null", path]
    return args


def bwrap_argv(limits: SandboxLimits, hide=()) -> list[str]:
    bwrap = bwrap_path()
    hardening = ["--disable-userns"] if "--disable-userns" in _bwrap_options(bwrap) else []  # >= 0.8
    return [bwrap,
            "--unshare-all", "--unshare-user", *hardening,
            "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID),
            "--die-with-parent", "--new-session", "--as-pid-1",
            "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc",
            "--size", str(limits.tmpfs_mb << 20), "--tmpfs", "/tmp", "--dir", "/tmp/box",
            *_hide_args(hide),
            "--chdir", "/tmp/box", "--clearenv",
            "--setenv", "PATH", "/usr/local/bin:/usr/bin:/bin", "--setenv", "HOME", "/tmp/box",
            "--setenv", "LANG", "C.UTF-8", "--setenv", "PYTHONDONTWRITEBYTECODE", "1",
            "--", sandbox_python(), "-I", "-c", HARNESS]


def _as_unprivileged() -> dict:
    if os.geteuid() != 0:
        return {}
    return {"user": SANDBOX_UID, "group": SANDBOX_UID, "extra_groups": []}


def _sandbox_lines(argv: list[str], job: bytes, timeout_s: float):
    """Yield the harness's JSON lines, then a {"status": "sandbox ..."} line. The sandbox is killed
    when the caller stops reading, on error, or at the wall clock: first bwrap's child (pid 1 of
    the sandbox's pid namespace, so every process in it dies), so that bwrap reaps it and exits
    and no orphan is left for the host's init. Raises SandboxUnavailable when bwrap itself fails."""
    info_r, info_w = os.pipe()
    argv = [argv[0], "--info-fd", str(info_w), *argv[1:]]
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                cwd="/", start_new_session=True, pass_fds=(info_w,), **_as_unprivileged())
    except BaseException:
        os.close(info_r)
        raise
    finally:
        os.close(info_w)
    info = open(info_r, "rb")
    sel = selectors.DefaultSelector()
    deadline = time.monotonic() + timeout_s
    pending, err, buf, info_text, got_line = memoryview(job), bytearray(), bytearray(), bytearray(), False
    try:
        os.set_blocking(proc.stdin.fileno(), False)
        sel.register(proc.stdin, selectors.EVENT_WRITE, "in")
        for stream, name in ((proc.stdout, "out"), (proc.stderr, "err"), (info, "info")):
            sel.register(stream, selectors.EVENT_READ, name)
        while sel.get_map():
            left = deadline - time.monotonic()
            if left <= 0:
                yield {"status": "sandbox timeout"}
                return
            for key, _ in sel.select(left):
                if key.data == "in":
                    try:
                        pending = pending[os.write(key.fd, pending[:1 << 16]):]
                    except BrokenPipeError:
                        pending = pending[:0]
                    if not pending:
                        sel.unregister(key.fileobj)
                        proc.stdin.close()
                    continue
                chunk = os.read(key.fd, 1 << 16)
                if not chunk:
                    sel.unregister(key.fileobj)
                elif key.data == "info":
                    info_text += chunk
                elif key.data == "err":
                    err = (err + chunk)[-4096:]
                else:
                    buf += chunk
                    while b"\n" in buf:
                        line, _, rest = bytes(buf).partition(b"\n")
                        buf = bytearray(rest)
                        got_line = True
                        try:
                            result = json.loads(line)
                        except ValueError:
                            result = None
                        ok = isinstance(result, dict) and all(
                            isinstance(result.get(k), t) for k, t in (("status", str), ("rc", int),
                                                                      ("stdout", str), ("stderr", str)))
                        yield result if ok else {"status": "sandbox sent a bad line"}
        try:
            rc = proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            yield {"status": "sandbox timeout"}
            return
        message = err.decode("utf-8", "replace").strip()
        if not got_line and rc != 0 and message.startswith("bwrap:"):
            raise SandboxUnavailable(f"bwrap could not start a sandbox: {message}")
        yield {"status": "sandbox exited", "rc": rc, "stderr": message}
    finally:
        sel.close()
        _kill_sandbox(proc, info, info_text)
        for stream in (proc.stdin, proc.stdout, proc.stderr, info):
            if not stream.closed:
                stream.close()


def _kill_sandbox(proc: subprocess.Popen, info, info_text: bytearray) -> None:
    if proc.poll() is not None:
        return
    if not info.closed:  # bwrap writes {"child-pid": N} once the sandbox exists
        os.set_blocking(info.fileno(), False)
        try:
            info_text += info.read() or b""
        except OSError:
            pass
    try:
        child = json.loads(bytes(info_text))["child-pid"]
        if proc.poll() is None:
            os.kill(child, signal.SIGKILL)
        proc.wait(2.0)
        return
    except (ValueError, KeyError, TypeError, ProcessLookupError, subprocess.TimeoutExpired):
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # bwrap's --die-with-parent takes the sandbox down
    except ProcessLookupError:
        pass
    proc.wait()


# ---------------------------------------------------------------- test cases

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
    job = json.dumps({"program": program, "mode": test_type, "fn_name": fn_name or "f", "cases": cases,
                      "limits": asdict(limits)}).encode()
    lines = _sandbox_lines(bwrap_argv(limits, hide), job, limits.total_timeout_s(total))
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
