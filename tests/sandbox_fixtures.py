"""What the sandbox and code-reward tests share: hostile-program helpers, a host directory outside
/tmp, a fake run directory holding a secret, and the demo's code tasks."""

import os
import random
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from megatron_ring.data.demo_tasks import CODE_KINDS
from megatron_ring.rewards.code_reward import run_tests
from megatron_ring.rewards.sandbox import SANDBOX_UID, SandboxLimits

ROOT = Path(__file__).resolve().parents[1]
FAST = SandboxLimits(cpu_s=2, case_timeout_s=2.0)
needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap missing: make install")


def demo_code_tasks(per_kind: int = 3) -> list[dict]:
    rng = random.Random(0)
    return [make(rng) for make in CODE_KINDS for _ in range(per_kind)]


def sandbox_processes() -> list[str]:
    """Processes that belong to a sandbox: its uid when we are root, else bwrap or the harness."""
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
            found.append(f"{entry.name}: {status.splitlines()[0]} {cmdline[:80]!r}")
    return found


def assert_host_intact():
    deadline = time.monotonic() + 3.0
    while sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sandbox_processes() == []
    assert subprocess.run(["true"], timeout=10).returncode == 0  # the host can still start processes


@pytest.fixture
def host_dir():
    """A world-writable directory outside /tmp (the sandbox has its own /tmp), so only the
    sandbox's read-only root stands between a program and it."""
    path = Path(tempfile.mkdtemp(prefix="sandbox-test-", dir="/var/tmp"))
    path.chmod(0o777)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def attack(program: str, expected: str = "done\n", **kwargs):
    """Run a hostile program whose test expects what it prints when the attack works."""
    start = time.monotonic()
    result = run_tests(program, [{"input": "", "output": expected}], **{"limits": FAST, **kwargs})
    return result, time.monotonic() - start


@pytest.fixture
def run_dir(host_dir):
    """A fake run directory with a world-readable checkpoint: only `hide` keeps it from code."""
    secret = "SECRET-" + os.urandom(8).hex()
    ckpt = host_dir / "run" / "checkpoints"
    ckpt.mkdir(parents=True)
    (ckpt / "model.txt").write_text(secret)
    for path in (host_dir / "run", ckpt):
        path.chmod(0o755)
    (ckpt / "model.txt").chmod(0o644)
    return host_dir / "run", secret
