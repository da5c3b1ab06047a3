"""What the sandbox and code-reward tests share: hostile-program helpers, the same programs run on
the host (each attack's control), host directories outside /tmp and inside the sandbox's
allowlist, a fake run directory holding a secret, planted data files, and the demo's code tasks."""

import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from megatron_ring.data.demo_tasks import CODE_KINDS
from megatron_ring.rewards.code_reward import CodeRewardSettings, run_tests
from megatron_ring.rewards.sandbox import SANDBOX_UID, SandboxLimits, run_job
from megatron_ring.rewards.sandbox_cgroup import PREFIX

ROOT = Path(__file__).resolve().parents[1]
FAST = SandboxLimits(cpu_s=2, case_timeout_s=2.0)
needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap missing: make install")


def demo_code_tasks(per_kind: int = 3) -> list[dict]:
    rng = random.Random(0)
    return [make(rng) for make in CODE_KINDS for _ in range(per_kind)]


def _someone_elses(entry: Path, status: str) -> bool:
    """A sandbox of another process on this machine (other test runs may share it): in a sandbox
    cgroup named after another pid, or a bwrap whose parent is another live process."""
    try:
        cgroups = (entry / "cgroup").read_text()
    except OSError:
        cgroups = ""
    owners = re.findall(re.escape(PREFIX) + r"(\d+)-", cgroups)
    if owners:
        return int(owners[0]) != os.getpid()
    ppid = int(re.search(r"^PPid:\s+(\d+)", status, re.M).group(1))
    return re.search(r"^Name:\s+bwrap$", status, re.M) is not None and ppid not in (os.getpid(), 1)


def sandbox_processes() -> list[str]:
    """Processes that belong to our sandboxes: the sandbox uid when we are root, else bwrap or the
    harness."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            status = (entry / "status").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        uid = int(re.search(r"^Uid:\s+(\d+)", status, re.M).group(1))
        if (uid == SANDBOX_UID if os.geteuid() == 0 else (b"bwrap" in cmdline or b"kill_others" in cmdline)):
            if not _someone_elses(entry, status):
                found.append(f"{entry.name}: {status.splitlines()[0]} {cmdline[:80]!r}")
    return found


def assert_host_intact():
    deadline = time.monotonic() + 3.0
    while sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    left = sandbox_processes()
    assert left == [], left
    assert subprocess.run(["true"], timeout=10).returncode == 0  # the host can still start processes


@pytest.fixture
def host_dir():
    """A world-writable directory outside /tmp (the sandbox has its own /tmp), so only the
    sandbox's read-only root stands between a program and it."""
    path = Path(tempfile.mkdtemp(prefix="sandbox-test-", dir="/var/tmp"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def attack(program: str, expected: str = "done\n", limits: SandboxLimits = FAST, hide=()):
    """Run a hostile program whose test expects what it prints when the attack works."""
    start = time.monotonic()
    result = run_tests(program, [{"input": "", "output": expected}], CodeRewardSettings(hide, limits))
    return result, time.monotonic() - start


def make_run_dir(base: Path) -> tuple[Path, str]:
    """A fake run directory under `base` with a world-readable checkpoint holding a secret."""
    secret = "SECRET-" + os.urandom(8).hex()
    ckpt = base / "run" / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / "model.txt").write_text(secret)
    for path in (base / "run", ckpt):
        path.chmod(0o755)
    (ckpt / "model.txt").chmod(0o644)
    return base / "run", secret


@pytest.fixture
def run_dir(host_dir):
    """A fake run directory outside the sandbox's allowlist (under /var/tmp)."""
    return make_run_dir(host_dir)


@pytest.fixture
def allowlisted_dir():
    """A world-readable directory inside the sandbox's allowlist (under /usr/local): only `hide`
    keeps what is in it from code. Only root can make one."""
    if os.geteuid() != 0 or not os.access("/usr/local/share", os.W_OK):
        pytest.skip("needs root: every directory the sandbox shows belongs to root")
    path = Path(tempfile.mkdtemp(prefix="megatron-ring-test-", dir="/usr/local/share"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def plant(base: Path, relative: str, secret: str) -> Path:
    """A world-readable data file base/relative holding `secret` where a row's expected output
    would be (its new directories world-readable too)."""
    path = base / relative
    for parent in reversed(path.relative_to(base).parents[:-1]):
        if not (base / parent).exists():
            (base / parent).mkdir()
            (base / parent).chmod(0o755)
    path.write_text('{"prompt": "add", "output": "%s"}\n' % secret)
    path.chmod(0o644)
    return path


def sandbox_output(program: str, limits: SandboxLimits = FAST, hide=()) -> str:
    """What `program` printed in the sandbox (one case, empty stdin)."""
    lines = run_job({"program": program, "mode": "stdio", "cases": [""]}, limits, hide)
    try:
        return next(lines).get("stdout", "")
    finally:
        lines.close()


def host_output(program: str) -> str:
    """What `program` prints run on the host as the trainer: shows the attack works unsandboxed."""
    return subprocess.run([sys.executable, "-I", "-c", program], capture_output=True, text=True,
                          timeout=60, cwd="/").stdout


def _secret_reader(prefix: str) -> str:
    """The start of a hostile program: grab(path) collects the secrets of a readable *.jsonl."""
    return f"""
import os
found = set()
def grab(path):
    if not path.endswith(".jsonl"):
        return
    try:
        with open(path) as f:
            text = f.read(1 << 16)
    except OSError:
        return
    found.update(w for w in text.replace('"', " ").split() if w.startswith({prefix!r}))
"""


def find_secrets(prefix: str, roots, stop_at: int) -> str:
    """A program that walks the filesystem (bounded) for *.jsonl and prints the secrets it read."""
    return _secret_reader(prefix) + f"""
budget = 20000
for top in {[str(r) for r in roots]!r}:
    for here, dirs, files in os.walk(top):
        budget -= 1
        dirs[:] = [] if budget < 0 or len(found) >= {stop_at} or here.count("/") > 7 else [
            d for d in dirs if not d.startswith(".") and os.path.join(here, d) not in ("/proc", "/sys")]
        for name in files:
            grab(os.path.join(here, name))
print("\\n".join(sorted(found)))
"""


def mountinfo_siblings(prefix: str) -> str:
    """A program that reads /proc/self/mountinfo and then the data files next to every path it
    names (a hidden run directory's sibling data sets), printing the secrets it read."""
    return _secret_reader(prefix) + """
seen = set()
for line in open("/proc/self/mountinfo"):
    fields = line.split()
    for path in (fields[3], fields[4]):
        parent = os.path.dirname(path.rstrip("/"))
        if parent in seen or parent in ("", "/", "/proc", "/sys"):
            continue
        seen.add(parent)
        try:
            subdirs = [os.path.join(parent, d) for d in os.listdir(parent)]
        except OSError:
            continue
        for sub in subdirs:
            for here, dirs, files in os.walk(sub):
                if here.count("/") - sub.count("/") >= 3:
                    dirs[:] = []
                for name in files:
                    grab(os.path.join(here, name))
print("\\n".join(sorted(found)))
"""


class PeakMemory:
    """Samples the anonymous and shared memory (PSS) of the processes in this process's sandboxes
    (bwrap's descendants) while active: an account of the RAM a sandbox took that does not depend
    on the mechanism bounding it."""

    def __init__(self, interval_s: float = 0.01):
        self.interval_s, self.peak_mb, self._stop = interval_s, 0.0, threading.Event()

    @staticmethod
    def now_mb() -> float:
        parents = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                except (OSError, IndexError, ValueError):
                    pass
        mine, total, changed = {os.getpid()}, 0, True
        while changed:
            changed = False
            for pid, ppid in parents.items():
                if ppid in mine and pid not in mine:
                    mine.add(pid)
                    changed = True
        outside = {os.getpid()} | {pid for pid, ppid in parents.items() if ppid == os.getpid()}  # us, bwrap
        for pid in mine - outside:
            try:
                for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                    if line.startswith(("Pss_Anon:", "Pss_Shmem:")):  # not the shared libraries
                        total += int(line.split()[1])
            except OSError:
                pass
        return total / 1024

    def _run(self):
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, self.now_mb())
            self._stop.wait(self.interval_s)

    def __enter__(self):
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
