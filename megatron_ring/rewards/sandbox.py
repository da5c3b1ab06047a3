"""A process sandbox for programs the policy wrote: bubblewrap plus per-process rlimits.

Why: the program is written by the policy being trained, so it can be anything (fork bomb,
memory bomb, endless loop, a socket to the trainer, a read of the checkpoints). Layers:

- bubblewrap (`bwrap`): new user, pid, net, ipc, uts namespaces; `/` bound read-only; a fresh,
  size-capped tmpfs at /tmp whose /tmp/box is the working directory; /run and the caller's `hide`
  paths (the run directory, checkpoints) covered by empty read-only tmpfs; dies with its parent.
- bwrap itself is started as an unprivileged uid (65534) when we are root: RLIMIT_NPROC is not
  enforced for real root, nor for a namespace uid that maps to root.
- per-case rlimits (CPU, address space, processes, file size, open files, no core) set by the
  harness (`sandbox_harness.py`) inside the sandbox on each program process, a per-case wall clock
  that kills the case's process group and every other process in the sandbox's pid namespace,
  capped output, and an outer wall clock that kills bwrap (its pid namespace and everything in it
  goes with it).

One sandbox runs one job (a program and its cases): the harness reads the job on stdin and writes
one JSON line per case. Without bwrap we raise: code is never run unsandboxed."""

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

from megatron_ring.rewards.sandbox_harness import HARNESS

SANDBOX_UID = 65534  # nobody: what bwrap runs as when we are root
DEFAULT_HIDE = ("/run",)  # host sockets (docker, systemd, ...) live here


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




def run_job(job: dict, limits: SandboxLimits, hide=(), cases: int = 1):
    """Run the harness on `job` (program, mode, cases; the limits are added) in a fresh sandbox.
    Yields one dict per case as the harness reports it, then a {"status": "sandbox ..."} line;
    closing the generator kills the sandbox."""
    payload = json.dumps({**job, "limits": asdict(limits)}).encode()
    return _sandbox_lines(bwrap_argv(limits, hide), payload, limits.total_timeout_s(cases))
