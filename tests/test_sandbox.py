"""The code sandbox: hostile programs score 0 and leave the host and the run intact. Each attack
is also shown to work where the sandbox does not stand in the way (on the host, or with a larger
cap), so that its 0 means something."""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from megatron_ring.rewards import sandbox, sandbox_cgroup
from megatron_ring.rewards.code_reward import CodeRewardSettings, run_tests
from megatron_ring.rewards.sandbox import SandboxLimits, SandboxUnavailable, memory_bound, run_job, sandbox_python
from tests.sandbox_fixtures import (FAST, ROOT, PeakMemory, allowlisted_dir, assert_host_intact, attack,  # noqa: F401
                                    find_secrets, host_dir, host_output, make_run_dir, mountinfo_siblings, needs_bwrap,
                                    plant, run_dir, sandbox_output)


def test_missing_bwrap_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap"):
        run_tests("print(1)", [{"input": "", "output": "1\n"}], CodeRewardSettings())


@needs_bwrap
def test_fork_bomb():
    result, seconds = attack("import os\nwhile True:\n    os.fork()\nprint('done')\n")
    assert not result.all_passed and seconds < 10
    assert_host_intact()
    # RLIMIT_NPROC really binds (as root it would not, were the sandbox uid mapped to root).
    probe = ("import os, time\n"
             "for n in range(100):\n"
             "    try:\n"
             "        pid = os.fork()\n"
             "    except OSError:\n"
             "        print('limited', n < 12)\n"
             "        break\n"
             "    if pid == 0:\n"
             "        os.close(1)\n"
             "        time.sleep(60)\n"
             "        os._exit(0)\n"
             "else:\n"
             "    print('unlimited')\n")
    limited, _ = attack(probe, "limited True\n")
    assert limited.all_passed, limited
    assert_host_intact()


@needs_bwrap
def test_memory_bomb():
    result, seconds = attack("x = bytearray(8 << 30)\nx[::4096] = b'1' * len(x[::4096])\nprint('done')\n")
    assert not result.all_passed and "MemoryError" in result.error and seconds < 5
    grower, _ = attack("chunks = []\nwhile True:\n    chunks.append(bytearray(64 << 20))\n",
                       limits=SandboxLimits(case_timeout_s=20.0))
    assert not grower.all_passed and "MemoryError" in grower.error
    assert_host_intact()


@needs_bwrap
def test_endless_loops_are_killed():
    busy, seconds = attack("while True:\n    pass\n", limits=SandboxLimits(cpu_s=1, case_timeout_s=4.0))
    assert not busy.all_passed and "SIGXCPU" in busy.error and seconds < 3.5
    asleep, seconds = attack("import time\ntime.sleep(1e6)\n", limits=SandboxLimits(cpu_s=5, case_timeout_s=1.0))
    assert not asleep.all_passed and "timeout" in asleep.error and seconds < 3.5
    assert_host_intact()


@needs_bwrap
def test_no_network():
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    port, accepted = listener.getsockname()[1], []

    def accept():
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not accepted:
            try:
                accepted.append(listener.accept()[0])
            except socket.timeout:
                pass

    thread = threading.Thread(target=accept)
    thread.start()
    result, _ = attack(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                       "s.sendall(b'hello')\nprint('done')\n")
    dns, _ = attack("import socket\nsocket.create_connection(('pypi.org', 443), timeout=2)\nprint('done')\n")
    time.sleep(0.3)
    assert not result.all_passed and not dns.all_passed and accepted == []
    with socket.create_connection(("127.0.0.1", port), timeout=2):  # the listener itself works
        thread.join()
    assert len(accepted) == 1
    accepted[0].close()
    listener.close()


@needs_bwrap
def test_writes_outside_its_directory(host_dir):
    target = host_dir / "pwned"
    result, _ = attack(f"open({str(target)!r}, 'w').write('x')\nprint('done')\n")
    assert not result.all_passed and "No such file" in result.error  # the host's /var/tmp is not there
    in_repo, _ = attack(f"open({str(ROOT / 'pwned')!r}, 'w').write('x')\nprint('done')\n")
    assert not in_repo.all_passed
    assert not target.exists() and not (ROOT / "pwned").exists()
    # What it sees of the host is read-only, and so are its root and /dev (tmpfs without a cap).
    paths = ["/usr/pwned", "/usr/lib/pwned", "/etc/pwned", "/etc/passwd", "/pwned", "/dev/pwned"]
    probe = (f"for path in {paths!r}:\n"
             "    try:\n        open(path, 'a').write('x')\n        print(path, 'written')\n"
             "    except OSError as e:\n        print(path, e.strerror)\n")
    assert sandbox_output(probe) == "".join(f"{p} Read-only file system\n" for p in paths)
    # Its own directory and /tmp are writable (and private: nothing of it reaches the host).
    own, _ = attack("open('scratch', 'w').write('x')\nopen('/tmp/y', 'w').write('y')\n"
                    "import os\nprint(os.getcwd(), sorted(os.listdir('.')))\n", "/tmp/box ['main.py', 'scratch']\n")
    assert own.all_passed, own


@needs_bwrap
def test_cannot_tamper_with_the_harness():
    """The program cannot kill the harness (the sandbox's init) nor forge result lines into its
    pipe to the host, even knowing the expected output."""
    forge = ("import os, signal\n"
             "os.kill(1, signal.SIGKILL)\n"
             "try:\n"
             "    with open('/proc/1/fd/1', 'w') as f:\n"
             "        f.write('{\"status\": \"exited\", \"rc\": 0, \"stdout\": \"42\", \"stderr\": \"\"}\\n' * 3)\n"
             "except OSError as e:\n"
             "    print('blocked', type(e).__name__)\n")
    result = run_tests(forge, [{"input": "", "output": "42\n"}] * 3, CodeRewardSettings(limits=FAST))
    assert not result.all_passed and result.error == "case 0: wrong output 'blocked PermissionError\\n'"
    assert_host_intact()


@needs_bwrap
def test_reading_the_checkpoint_directory(run_dir):
    """A run directory outside the allowlist is not in the sandbox, hidden or not."""
    run, secret = run_dir
    steal = f"print(open({str(run / 'checkpoints' / 'model.txt')!r}).read())\n"
    assert host_output(steal) == secret + "\n"  # world-readable on the host: the test means something
    for hide in ([], [run]):
        stolen, _ = attack(steal, secret + "\n", hide=hide)
        assert not stolen.all_passed and secret not in stolen.error and "No such file" in stolen.error
    removal, _ = attack(f"import shutil\nshutil.rmtree({str(run)!r})\nprint('done')\n", hide=[run])
    assert not removal.all_passed
    assert (run / "checkpoints" / "model.txt").read_text() == secret


@needs_bwrap
def test_hide_inside_the_allowlist(allowlisted_dir):
    """A run directory the sandbox would see (one under /usr/local) is covered by `hide`; a data set
    next to it stays visible, and the mountinfo attack finds it: the attack works where data lies
    inside the allowlist (test_mountinfo_names_nothing_readable is the same attack outside it)."""
    run, secret = make_run_dir(allowlisted_dir)
    steal = f"print(open({str(run / 'checkpoints' / 'model.txt')!r}).read())\n"
    exposed, _ = attack(steal, secret + "\n")
    assert exposed.all_passed
    hidden, _ = attack(steal, secret + "\n", hide=[run])
    assert not hidden.all_passed and secret not in hidden.error and "No such file" in hidden.error
    listing, _ = attack(f"import os\nprint(os.listdir({str(run)!r}))\n", "['checkpoints']\n", hide=[run])
    assert not listing.all_passed and "checkpoints" not in listing.error
    removal, _ = attack(f"import shutil\nshutil.rmtree({str(run)!r})\nprint('done')\n", hide=[run])
    assert not removal.all_passed
    assert (run / "checkpoints" / "model.txt").read_text() == secret
    prefix = "SECRET-" + os.urandom(6).hex()
    plant(allowlisted_dir, "data/train.jsonl", prefix + "-data")
    found, _ = attack(mountinfo_siblings(prefix), prefix + "-data\n", hide=[run])
    assert found.all_passed, found


@needs_bwrap
def test_data_files_found_by_walking(host_dir):
    """A bounded walk of /var/tmp, /work, /home, the repository and / for *.jsonl finds data sets
    (expected outputs) on the host and nothing in the sandbox."""
    prefix = "SECRET-" + os.urandom(6).hex()
    runs = ROOT / "runs"
    made_runs = not runs.exists()
    stage = runs / host_dir.name  # runs/ is ignored by git
    try:
        plant(host_dir, "distill/data/train.jsonl", prefix + "-var")
        plant(ROOT, f"runs/{host_dir.name}/distill/data/train.jsonl", prefix + "-runs")
        walk = find_secrets(prefix, ["/var/tmp", "/work", "/home", ROOT, "/"], stop_at=2)
        expected = f"{prefix}-runs\n{prefix}-var\n"
        assert host_output(walk) == expected
        result, _ = attack(walk, expected, limits=replace(FAST, case_timeout_s=10.0, cpu_s=10))
        assert result.error == "case 0: wrong output '\\n'"  # it walked to the end and found nothing
    finally:
        shutil.rmtree(stage, ignore_errors=True)
        if made_runs and not any(runs.iterdir()):  # a run started meanwhile keeps it
            runs.rmdir()


@needs_bwrap
def test_mountinfo_names_nothing_readable(host_dir):
    """The hidden run directory and its sibling data set are neither named in the sandbox's
    /proc/self/mountinfo nor readable through any path it names."""
    prefix = "SECRET-" + os.urandom(6).hex()
    run, _ = make_run_dir(host_dir)
    data = plant(host_dir, "data/train.jsonl", prefix + "-data")
    assert prefix in host_output(f"print(open({str(data)!r}).read())")
    mounts = sandbox_output("print(open('/proc/self/mountinfo').read())", hide=[run])
    assert "/usr" in mounts and str(host_dir) not in mounts and "/var" not in mounts
    result, _ = attack(mountinfo_siblings(prefix), prefix + "-data\n", hide=[run])
    assert result.error == "case 0: wrong output '\\n'"  # it read what mountinfo names and found nothing


@needs_bwrap
def test_unix_sockets(host_dir):
    """A world-writable socket under /var/tmp and an abstract one: the host connects, the
    sandbox reaches neither (the listeners accept nothing)."""
    path, name = host_dir / "trainer.sock", "\0megatron-ring-test-" + os.urandom(4).hex()
    listeners = []
    for address in (str(path), name):
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(address)
        listener.listen(4)
        listener.settimeout(0.3)
        listeners.append(listener)
    path.chmod(0o777)
    connect = (f"import socket\nfor address in {[str(path), name]!r}:\n"
               "    s = socket.socket(socket.AF_UNIX)\n    s.settimeout(2)\n"
               "    try:\n        s.connect(address)\n        print('connected')\n"
               "    except OSError as e:\n        print(e.strerror)\n")
    try:
        result, _ = attack(connect, "connected\nconnected\n")
        assert not result.all_passed
        for listener in listeners:
            with pytest.raises(socket.timeout):
                listener.accept()
        assert host_output(connect) == "connected\nconnected\n"
        for listener in listeners:
            listener.accept()[0].close()
    finally:
        for listener in listeners:
            listener.close()


@needs_bwrap
def test_an_interpreter_outside_usr():
    """A trainer's own interpreter (pyenv, conda: outside /usr) is shown by its prefix alone: its
    standard library and extension modules load, its neighbours are not there."""
    python = os.path.realpath(sys.executable)
    prefix = sandbox._python_prefixes(python)[0]
    if prefix == "/usr" or prefix.startswith("/usr/"):
        pytest.skip(f"{python} lives under /usr")
    allowlist, _ = sandbox._allowlist(python)
    probe = f"import os, json, ssl, sqlite3, ctypes\nprint(os.listdir({os.path.dirname(prefix)!r}))\n"
    run = subprocess.run([sandbox.bwrap_path(), "--unshare-all", "--die-with-parent", *allowlist, "--dev", "/dev",
                          "--proc", "/proc", "--", python, "-I", "-c", probe], capture_output=True, text=True, timeout=60)
    assert run.stdout == f"[{os.path.basename(prefix)!r}]\n", run.stderr


TRAINER_SCRIPT = """
import json, sys
from megatron_ring.rewards.code_reward import CodeRewardSettings, run_tests
from megatron_ring.rewards.sandbox import SandboxLimits
settings = CodeRewardSettings(limits=SandboxLimits(cpu_s=2, case_timeout_s=2.0))
result = run_tests(sys.argv[1], [{"input": "", "output": sys.argv[2]}], settings)
print(json.dumps([result.all_passed, result.error]))
"""


@needs_bwrap
def test_home_of_a_non_root_trainer():
    """A trainer that is not root runs bwrap as itself: its $HOME (an HF token, ~/.netrc) must not
    be in the sandbox. Run as uid 4242 when we are root, else as ourselves."""
    uid = 4242 if os.geteuid() == 0 else os.getuid()
    python = sandbox_python()  # as root: one every uid can run
    secret = "SECRET-" + os.urandom(8).hex()
    home = Path(tempfile.mkdtemp(prefix="sandbox-home-", dir="/var/tmp"))
    code = Path(tempfile.mkdtemp(prefix="sandbox-code-", dir="/var/tmp"))
    try:
        (home / ".netrc").write_text(f"machine huggingface.co login hf password {secret}\n")
        os.chown(home / ".netrc", uid, uid)
        os.chown(home, uid, uid)
        (home / ".netrc").chmod(0o600)
        home.chmod(0o700)
        code.chmod(0o755)  # a copy of the package the trainer's uid can read
        shutil.copytree(ROOT / "megatron_ring" / "rewards", code / "megatron_ring" / "rewards",
                        ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(ROOT / "megatron_ring" / "__init__.py", code / "megatron_ring")
        (code / "megatron_ring" / "data").mkdir()  # the code reward reads its rows' test forms there
        for name in ("__init__.py", "code_tests.py"):
            shutil.copy(ROOT / "megatron_ring" / "data" / name, code / "megatron_ring" / "data")
        subprocess.run(["chmod", "-R", "a+rX", str(code)], check=True)
        steal = ("import os, pwd\ntry:\n    entry = pwd.getpwuid(os.getuid()).pw_dir\nexcept KeyError:\n    entry = ''\n"
                 f"for home in (os.environ['HOME'], entry, {str(home)!r}):\n"
                 "    try:\n        print(open(os.path.join(home, '.netrc')).read().split()[-1])\n        break\n"
                 "    except OSError:\n        pass\n")
        as_trainer = {"env": {"HOME": str(home), "PATH": os.environ["PATH"], "PYTHONPATH": str(code)},
                      "cwd": str(code), "capture_output": True, "text": True, "timeout": 60,
                      **({"user": uid, "group": uid, "extra_groups": []} if os.geteuid() == 0 else {})}
        direct = subprocess.run([python, "-c", steal], **as_trainer)
        assert direct.stdout == secret + "\n", direct.stderr  # the trainer's own program reads it
        sandboxed = subprocess.run([python, "-c", TRAINER_SCRIPT, steal, secret + "\n"], **as_trainer)
        assert sandboxed.returncode == 0, sandboxed.stderr
        passed, error = json.loads(sandboxed.stdout)
        assert not passed and secret not in error, error
    finally:
        shutil.rmtree(home, ignore_errors=True)
        shutil.rmtree(code, ignore_errors=True)


FILL_SHM = ("n = 0\ntry:\n    for k in range(8):\n        with open('/dev/shm/fill%d' % k, 'wb') as f:\n"
            "            for _ in range(8):\n                f.write(b'x' * (1 << 20))\n                n += 1\n"
            "except OSError as e:\n    print(e.strerror)\nprint('wrote', n, 'MB')\n")


@needs_bwrap
def test_dev_shm_is_capped():
    """64 MB into /dev/shm (in 8 MB files, under RLIMIT_FSIZE): stopped at shm_mb."""
    roomy, _ = attack(FILL_SHM, "wrote 64 MB\n", limits=replace(FAST, shm_mb=96))
    assert roomy.all_passed, roomy  # the program fills /dev/shm when it may
    filled, _ = attack(FILL_SHM, "wrote 64 MB\n")
    assert not filled.all_passed
    out = sandbox_output(FILL_SHM).splitlines()
    assert out[0] == "No space left on device" and int(out[1].split()[1]) <= FAST.shm_mb, out
    assert not list(Path("/dev/shm").glob("fill*"))
    assert_host_intact()


HOG = """
import os, select
r, w = os.pipe()  # children -> parent: "I hold my 90 MB"
go_r, go_w = os.pipe()  # closed by the parent once all four hold theirs: held together, for sure
for _ in range(3):
    if os.fork() == 0:
        os.close(go_w)
        b = bytearray(90 << 20); b[::4096] = b"1" * len(b[::4096])
        os.write(w, b"1"); select.select([go_r], [], [], 5.0); os._exit(0)
os.close(w); os.close(go_r)
b = bytearray(90 << 20); b[::4096] = b"1" * len(b[::4096])
got = b""
while len(got) < 3:
    chunk = os.read(r, 3)  # b"" once every child has exited (or was killed)
    if not chunk:
        break
    got += chunk
os.close(go_w)
print("done" if len(got) == 3 else "fail")
"""
HOG_LIMITS = SandboxLimits(cpu_s=5, case_timeout_s=10.0, memory_mb=128, processes=4)


@needs_bwrap
def test_memory_of_the_whole_sandbox_without_cgroup(monkeypatch):
    """4 processes x 90 MB, each under RLIMIT_AS=128 MB: without a cgroup they hold more than
    memory_mb together, and the stated bound (processes x memory_mb + tmpfs caps) holds."""
    monkeypatch.setattr(sandbox_cgroup, "available", lambda: ((), "disabled by the test"))
    bound_mb, how = memory_bound(HOG_LIMITS)
    assert how.startswith("rlimits: 4 processes x 128 MB") and bound_mb == 4 * 128 + 64 + 16 + 64
    with PeakMemory() as peak:
        result, _ = attack(HOG, limits=HOG_LIMITS)
    assert result.all_passed, result
    assert 2 * HOG_LIMITS.memory_mb < peak.peak_mb <= bound_mb, peak.peak_mb


@needs_bwrap
def test_memory_of_the_whole_sandbox_with_cgroup():
    """The same 4 x 90 MB in a cgroup of memory_mb + tmpfs caps + harness: killed, and the
    sandbox never holds more than its memory.max."""
    parents, how = sandbox_cgroup.available()
    if not parents:
        pytest.skip(f"no cgroup for sandboxes on this host: {how}")
    assert "megatron-ring-sandbox-" in sandbox_output("print(open('/proc/self/cgroup').read())")
    with PeakMemory() as peak:
        result, _ = attack(HOG, limits=HOG_LIMITS)
    assert not result.all_passed, result
    # + 32 MB: the processes' samples are not taken at one instant (one being killed, another
    # growing into its pages): up to 14 MB over memory.max was seen in 1 of 12 runs on 2 loaded
    # cores, 18.5 MB once in CI
    assert peak.peak_mb <= HOG_LIMITS.cgroup_memory_mb() + 32 and HOG_LIMITS.cgroup_memory_mb() == 272, peak.peak_mb
    assert memory_bound(HOG_LIMITS)[0] == 272
    assert_host_intact()


@needs_bwrap
def test_cgroups_are_removed():
    """A sandbox's cgroup goes with it, also after the outer wall clock or an abandoned reader;
    one left by a killed worker (a dead pid) goes with the next sandbox."""
    parents, how = sandbox_cgroup.available()
    if not parents:
        pytest.skip(f"no cgroup for sandboxes on this host: {how}")
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = [Path(parent) / f"{sandbox_cgroup.PREFIX}{dead.pid}-0" for _, parent in parents]
    for path in stale:
        path.mkdir()
    sleeper = {"program": "import time\ntime.sleep(30)\n", "mode": "stdio", "cases": ["", ""]}
    lines = run_job(sleeper, replace(FAST, case_timeout_s=30.0, startup_s=1.0), cases=0)
    assert next(lines)["status"] == "sandbox timeout"  # the outer wall clock
    lines.close()
    lines = run_job({**sleeper, "program": "print(1)"}, FAST, cases=2)
    assert next(lines)["status"] == "exited"
    lines.close()  # the reader stops while the sandbox still runs
    mine = f"{sandbox_cgroup.PREFIX}{os.getpid()}-"
    assert [n for _, parent in parents for n in os.listdir(parent) if n.startswith(mine)] == []
    assert not any(path.exists() for path in stale)
    assert_host_intact()


@needs_bwrap
def test_big_output_and_big_files():
    flood, seconds = attack("while True:\n    print('x' * 10000)\n")
    assert not flood.all_passed and "output limit" in flood.error and len(flood.error) < 500 and seconds < 5
    big, seconds = attack("open('big', 'wb').write(b'x' * (100 << 20))\nprint('done')\n")
    assert not big.all_passed and "File too large" in big.error and seconds < 5
    assert_host_intact()
