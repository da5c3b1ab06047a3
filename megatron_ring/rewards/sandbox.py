"""A process sandbox for programs the policy wrote: bubblewrap, a cgroup where the host has one,
and per-process rlimits.

Why: the program is written by the policy being trained, so it can be anything (fork bomb,
memory bomb, endless loop, a socket to the trainer, a walk of the disk for the data sets' expected
outputs). Layers:

- bubblewrap (`bwrap`): new user, pid, net, ipc, uts and cgroup namespaces; an empty root that
  holds only an allowlist, read-only: `/usr`, `/bin`, `/sbin`, `/lib*` (symlinks where the host
  has them), the interpreter's prefix, a minimal `/etc` (a passwd and group naming the sandbox
  uid, the loader cache, the time zone). No data set, home directory, socket, run directory or
  sibling stage of the host is there to find, by walking or through /proc/self/mountinfo. A fresh
  size-capped tmpfs at /tmp whose /tmp/box is the working directory, a size-capped /dev/shm, /proc
  of its own pid namespace; `/`, `/dev` and the rest read-only. The caller's `hide` paths that lie
  inside the allowlist are covered by empty read-only tmpfs. Dies with its parent.
- bwrap itself is started as an unprivileged uid (65534) when we are root: RLIMIT_NPROC is not
  enforced for real root, nor for a namespace uid that maps to root.
- a cgroup per sandbox (`sandbox_cgroup.py`) where the host delegates one: memory.max and pids.max
  for everything in it together. `memory_bound()` says which bound holds on this host.
- per-case rlimits (CPU, address space, processes, file size, open files, no core) set by the
  harness (`sandbox_harness.py`: a program whose text runs there, never imported here) inside
  the sandbox on each program process, a per-case wall clock that kills the case's process group
  and every other process in the sandbox's pid namespace, capped output, and an outer wall clock
  that kills bwrap (its pid namespace and everything in it goes with it).

One sandbox runs one job (a program and its cases): the harness reads the job on stdin and writes
one JSON line per case. Without bwrap we raise: code is never run unsandboxed."""

from __future__ import annotations

import functools
import importlib.resources
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

from megatron_ring.rewards import sandbox_cgroup

SANDBOX_UID = 65534  # nobody: what bwrap runs as when we are root
SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")  # bound when present
HOST_ETC = ("/etc/ld.so.cache", "/etc/localtime")  # the only host files of /etc the sandbox sees
ETC_FILES = {  # written into the sandbox: the uid has a name, nothing else of the host's accounts
    "/etc/passwd": b"root:x:0:0:root:/:/usr/sbin/nologin\n"
                   b"nobody:x:65534:65534:sandbox:/tmp/box:/usr/sbin/nologin\n",
    "/etc/group": b"root:x:0:\nnogroup:x:65534:\n",
}
HARNESS_MB = 64  # allowance for the harness (the sandbox's pid 1, not under RLIMIT_AS)


class SandboxUnavailable(RuntimeError):
    """bwrap missing or unable to start a sandbox: a setup problem, never a program's score."""


@dataclass(frozen=True)
class SandboxLimits:
    """What one sandbox may use.

    Memory: each program process is held to `memory_mb` of address space (RLIMIT_AS). Where the
    host delegates a cgroup (see `memory_bound()`), the whole sandbox (harness, every program
    process, its /tmp and /dev/shm files) is held to `sandbox_memory_mb` (memory.max; default
    memory_mb + tmpfs_mb + shm_mb + HARNESS_MB) and to the harness plus `processes` tasks
    (pids.max). Without a cgroup the bound is the rlimits' product: processes x memory_mb +
    tmpfs_mb + shm_mb + HARNESS_MB (`rlimit_bound_mb()`)."""

    cpu_s: int = 5              # RLIMIT_CPU of each program process
    case_timeout_s: float = 5.0  # wall clock of one test case
    memory_mb: int = 1024       # RLIMIT_AS of each program process
    processes: int = 8          # RLIMIT_NPROC: processes and threads of the program, per sandbox
    file_mb: int = 16           # RLIMIT_FSIZE: largest file the program may write
    open_files: int = 64        # RLIMIT_NOFILE
    output_kb: int = 1024       # stdout kept per case; more fails the case
    tmpfs_mb: int = 64          # size of the sandbox's private /tmp (its working directory)
    shm_mb: int = 16            # size of the sandbox's private /dev/shm
    sandbox_memory_mb: int | None = None  # memory.max of the whole sandbox (None: see above)
    startup_s: float = 10.0     # outer wall clock on top of the cases' own

    def total_timeout_s(self, cases: int) -> float:
        return self.startup_s + cases * (self.case_timeout_s + 1.0)

    def cgroup_memory_mb(self) -> int:
        if self.sandbox_memory_mb is not None:
            return self.sandbox_memory_mb
        return self.memory_mb + self.tmpfs_mb + self.shm_mb + HARNESS_MB

    def rlimit_bound_mb(self) -> int:
        return self.processes * self.memory_mb + self.tmpfs_mb + self.shm_mb + HARNESS_MB


def memory_bound(limits: SandboxLimits) -> tuple[int, str]:
    """The most memory (MB) one sandbox can hold on this host, and what enforces it."""
    parents, how = sandbox_cgroup.available()
    if parents:
        return limits.cgroup_memory_mb(), f"a cgroup per sandbox, {how}"
    return limits.rlimit_bound_mb(), (f"rlimits: {limits.processes} processes x {limits.memory_mb} MB "
                                      f"RLIMIT_AS + /tmp {limits.tmpfs_mb} MB + /dev/shm {limits.shm_mb} MB "
                                      f"+ harness {HARNESS_MB} MB (no cgroup: {how})")


def _announce(limits: SandboxLimits) -> None:
    """Say once per process tree (reward workers inherit the environment) which bound holds."""
    if os.environ.get("MEGATRON_RING_SANDBOX_BOUND"):
        return
    mb, how = memory_bound(limits)
    os.environ["MEGATRON_RING_SANDBOX_BOUND"] = f"{mb} MB"
    print(f"megatron-ring code sandbox: at most {mb} MB per sandbox, by {how}", file=sys.stderr, flush=True)


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


@functools.lru_cache(maxsize=None)
def _python_prefixes(python: str) -> tuple[str, ...]:
    """Where the interpreter keeps its standard library and extension modules."""
    try:
        out = subprocess.run([python, "-I", "-c", "import sys; print(sys.base_prefix); print(sys.base_exec_prefix)"],
                             capture_output=True, text=True, timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise SandboxUnavailable(f"the sandbox interpreter {python} does not run: {e}") from e
    return tuple(dict.fromkeys(os.path.realpath(line) for line in out.split()))


def _inside(path: str, roots) -> bool:
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


def _allowlist(python: str) -> tuple[list[str], tuple[str, ...]]:
    """bwrap options that show the sandbox the host paths a Python program needs (read-only, at
    the same paths), and the visible host directories."""
    args, visible = [], []
    for path in SYSTEM_DIRS:
        if os.path.islink(path):  # merged /usr: /bin -> usr/bin
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
            visible.append(path)
    for prefix in _python_prefixes(python):
        if prefix != "/" and not _inside(prefix, visible):
            args += ["--ro-bind", prefix, prefix]
            visible.append(prefix)
    for path in HOST_ETC:
        args += ["--ro-bind-try", path, path]
    return args, tuple(visible)


def _hide_args(hide, visible) -> list[str]:
    """Empty read-only mounts over the `hide` paths that lie inside the allowlist; the others are
    not in the sandbox at all (a mount there would only name them in /proc/self/mountinfo)."""
    args = []
    for raw in hide:
        path = os.path.realpath(str(raw))
        if path == "/":
            raise ValueError("cannot hide / from the sandbox")
        if not _inside(path, visible) or not os.path.exists(path):
            continue
        if os.geteuid() == 0 and not _others_can_reach(path):
            continue  # out of the sandbox uid's reach already (and of bwrap's)
        if os.path.isdir(path):
            args += ["--size", "4096", "--tmpfs", path, "--remount-ro", path]
        else:
            args += ["--ro-bind", "/dev/null", path]
    return args


def bwrap_argv(limits: SandboxLimits, hide=()) -> list[str]:
    """The bwrap command line; the options that pass file descriptors (--info-fd, --block-fd, the
    generated /etc files) are added when the sandbox is started."""
    bwrap, python = bwrap_path(), sandbox_python()
    hardening = ["--disable-userns"] if "--disable-userns" in _bwrap_options(bwrap) else []  # >= 0.8
    allowlist, visible = _allowlist(python)
    return [bwrap,
            "--unshare-all", "--unshare-user", *hardening,
            "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID),
            "--die-with-parent", "--new-session", "--as-pid-1",
            *allowlist,
            "--dev", "/dev", "--size", str(limits.shm_mb << 20), "--tmpfs", "/dev/shm",
            "--proc", "/proc",
            "--size", str(limits.tmpfs_mb << 20), "--tmpfs", "/tmp", "--dir", "/tmp/box",
            *_hide_args(hide, visible),
            "--remount-ro", "/dev", "--remount-ro", "/",  # the root and /dev are unbounded tmpfs
            "--chdir", "/tmp/box", "--clearenv",
            "--setenv", "PATH", "/usr/local/bin:/usr/bin:/bin", "--setenv", "HOME", "/tmp/box",
            "--setenv", "LANG", "C.UTF-8", "--setenv", "PYTHONDONTWRITEBYTECODE", "1",
            "--", python, "-I", "-c", program_text("sandbox_harness.py")]


@functools.cache
def program_text(name: str) -> str:
    """The source of one of the programs the sandbox runs (`sandbox_harness.py`, `sandbox_driver.py`):
    files of this package, read as text and passed to the sandbox's interpreter, never imported."""
    return importlib.resources.files("megatron_ring.rewards").joinpath(name).read_text()


def _as_unprivileged() -> dict:
    if os.geteuid() != 0:
        return {}
    return {"user": SANDBOX_UID, "group": SANDBOX_UID, "extra_groups": []}


def _warn(message: str, _said=set()) -> None:
    if message not in _said:
        _said.add(message)
        print(f"megatron-ring code sandbox: {message}", file=sys.stderr, flush=True)


def _data_fd(data: bytes) -> int:
    """A pipe's read end holding `data` (a few hundred bytes: it fits the pipe's buffer)."""
    read, write = os.pipe()
    try:
        os.write(write, data)
    finally:
        os.close(write)
    return read


def _start(argv: list[str], cgroup) -> tuple[subprocess.Popen, object, int | None]:
    """Start bwrap with the options that pass descriptors: --info-fd (it writes its child's pid
    there), the generated /etc files and, with a cgroup, --block-fd: the sandbox waits before it
    runs anything until its pid 1 is in the cgroup. Returns bwrap, the info stream and the write
    end of the block pipe (None without a cgroup)."""
    info_r, info_w = os.pipe()
    passed, front, block_w = [info_w], ["--info-fd", str(info_w)], None
    try:
        if cgroup is not None:
            block_r, block_w = os.pipe()
            passed.append(block_r)
            front += ["--block-fd", str(block_r)]
        for dest, data in ETC_FILES.items():
            passed.append(_data_fd(data))
            front += ["--ro-bind-data", str(passed[-1]), dest]
        proc = subprocess.Popen([argv[0], *front, *argv[1:]], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, cwd="/", start_new_session=True, pass_fds=passed,
                                **_as_unprivileged())
    except BaseException:
        os.close(info_r)
        if block_w is not None:
            os.close(block_w)
        raise
    finally:
        for fd in passed:
            os.close(fd)
    return proc, open(info_r, "rb"), block_w


def _into_cgroup(cgroup, info_text: bytearray) -> bool:
    """Move the waiting sandbox into its cgroup once bwrap has said its child's pid; True when done
    (or failed: it then runs under its rlimits alone, and we say so)."""
    try:
        child = json.loads(bytes(info_text))["child-pid"]
    except (ValueError, KeyError, TypeError):
        return False
    try:
        cgroup.add(child)
    except OSError as e:
        _warn(f"could not move a sandbox into {cgroup.dirs[0]} ({e}); it runs under its rlimits alone")
    return True


def _sandbox_lines(argv: list[str], job: bytes, timeout_s: float, limits: SandboxLimits):
    """Yield the harness's JSON lines, then a {"status": "sandbox ..."} line. The sandbox is killed
    when the caller stops reading, on error, or at the wall clock: first bwrap's child (pid 1 of
    the sandbox's pid namespace, so every process in it dies), so that bwrap reaps it and exits
    and no orphan is left for the host's init; then its cgroup is removed. Raises
    SandboxUnavailable when bwrap itself fails."""
    try:
        cgroup = sandbox_cgroup.create(limits.cgroup_memory_mb() << 20, limits.processes + 1)
    except OSError as e:
        _warn(f"could not make a cgroup ({e}); sandboxes run under their rlimits alone")
        cgroup = None
    try:
        proc, info, block_w = _start(argv, cgroup)
    except BaseException:
        if cgroup is not None:
            cgroup.remove()
        raise
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
                    if block_w is not None and _into_cgroup(cgroup, info_text):
                        os.write(block_w, b"1")
                        os.close(block_w)
                        block_w = None
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
        if block_w is not None:  # only now: a sandbox released early would run outside its cgroup
            os.close(block_w)
        for stream in (proc.stdin, proc.stdout, proc.stderr, info):
            if not stream.closed:
                stream.close()
        if cgroup is not None and not cgroup.remove():
            _warn(f"could not remove {cgroup.dirs[-1]} (still busy); a later sandbox retries")


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
    """Run the harness on `job` (program, mode, cases; the limits and the driver are added) in a
    fresh sandbox. Yields one dict per case as the harness reports it, then a {"status": "sandbox ..."} line;
    closing the generator kills the sandbox."""
    payload = json.dumps({**job, "limits": asdict(limits), "driver": program_text("sandbox_driver.py")}).encode()
    argv = bwrap_argv(limits, hide)
    _announce(limits)
    return _sandbox_lines(argv, payload, limits.total_timeout_s(cases), limits)
