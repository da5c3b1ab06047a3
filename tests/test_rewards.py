"""Verifiable rewards: math, multiple choice and sandboxed code; hostile programs score 0 and leave
the host and the run intact; the reward pool kills verifiers that hang."""

import os
import random
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from megatron_ring.data.demo_tasks import CODE_KINDS, math_task, science_formula, science_units
from megatron_ring.rewards import code_sandbox
from megatron_ring.rewards.choice_reward import score_choice
from megatron_ring.rewards.code_sandbox import (SANDBOX_UID, SandboxLimits, SandboxUnavailable, check_code,
                                                extract_program, run_tests, score_code)
from megatron_ring.rewards.math_reward import score_math
from megatron_ring.rewards.reward_pool import RewardPool

ROOT = Path(__file__).resolve().parents[1]
FAST = SandboxLimits(cpu_s=2, case_timeout_s=2.0)
needs_bwrap = pytest.mark.skipif(shutil.which("bwrap") is None, reason="bubblewrap missing: make install")


# ---------------------------------------------------------------- math and multiple choice

def test_math_reward():
    assert score_math("so the sum is \\boxed{132}", "132") == 1.0
    assert score_math("so the sum is \\boxed{131}", "132") == 0.0
    assert score_math("x = \\boxed{\\frac{1}{2}}", "0.5") == 1.0
    assert score_math("\\boxed{1/2}", "\\frac{1}{2}") == 1.0
    assert score_math("\\boxed{2x+2}", "2(x+1)") == 1.0
    assert score_math("the answer is 132", "132") == 0.0  # no \boxed{}: no answer
    assert score_math("\\boxed{13", "13") == 0.0  # cut off


def test_choice_reward():
    assert score_choice("option B. \\boxed{B}", "B") == 1.0
    assert score_choice("\\boxed{(c)}", "C") == 1.0
    assert score_choice("\\boxed{A}", "B") == 0.0
    assert score_choice("B", "B") == 0.0


# ---------------------------------------------------------------- code: correct and wrong programs

def test_extract_program():
    assert extract_program("a\n```python\nx = 1\n```\nb\n```python\nprint(2)\n```") == "print(2)\n"
    assert extract_program("```python\nprint(1)\n```\n```text\nnot code\n```") == "print(1)\n"
    assert extract_program("```\nprint(3)\n```") == "print(3)\n"
    assert extract_program("```python\nprint(1)\n") is None  # cut off
    assert extract_program("no code here") is None


def demo_code_tasks(per_kind: int = 3) -> list[dict]:
    rng = random.Random(0)
    return [make(rng) for make in CODE_KINDS for _ in range(per_kind)]


@needs_bwrap
def test_every_demo_teacher_program_scores_one():
    tasks = demo_code_tasks()
    assert {t["test_type"] for t in tasks} == {"stdio", "function"} and len(tasks) == 33
    with ThreadPoolExecutor(2) as threads:
        results = list(threads.map(lambda t: check_code(t["solution"], t), tasks))
    for task, result in zip(tasks, results):
        assert result.all_passed and result.passed == result.total == 3, (task["prompt"], result)


@needs_bwrap
def test_wrong_programs_score_zero():
    stdio = {"code_test_cases": [{"input": "2 3\n", "output": "5\n"}, {"input": "4 4\n", "output": "8\n"}],
             "test_type": "stdio", "code_language": "python"}
    assert score_code("```python\na, b = map(int, input().split())\nprint(a + b)  \n```", stdio) == 1.0
    wrong = check_code("```python\na, b = map(int, input().split())\nprint(a * b)\n```", stdio)
    assert (wrong.all_passed, wrong.passed) == (False, 0) and "wrong output '6" in wrong.error
    half = check_code("```python\na, b = map(int, input().split())\nprint(8 if a == 4 else 6)\n```", stdio)
    assert (half.passed, half.total) == (0, 2)
    raises = check_code("```python\nraise ValueError('nope')\n```", stdio)
    assert not raises.all_passed and "ValueError: nope" in raises.error
    assert "no ``` code block" in check_code("print(5)", stdio).error
    cpp = check_code("```cpp\nint main(){}\n```", {**stdio, "code_language": "cpp"})
    assert not cpp.all_passed and "not supported" in cpp.error
    assert not run_tests("print(1)", []).all_passed


@needs_bwrap
def test_function_call_tests():
    row = {"code_test_cases": [{"input": "[[1, 2, 3], 2]", "output": "[2, 4, 6]"},
                               {"input": "[[], 5]", "output": "[]"}],
           "test_type": "function", "fn_name": "scale", "code_language": "python"}
    prints = "```python\ndef scale(xs, k):\n    print('debug')\n    return [k * x for x in xs]\n```"
    assert score_code(prints, row) == 1.0  # its prints do not mix with the result
    assert score_code("```python\ndef scale(xs, k):\n    return tuple(k * x for x in xs)\n```", row) == 1.0
    method = "```python\nclass Solution:\n    def scale(self, xs, k):\n        return [k * x for x in xs]\n```"
    assert score_code(method, row) == 1.0  # LeetCode style
    wrong = check_code("```python\ndef scale(xs, k):\n    return xs\n```", row)
    assert not wrong.all_passed and "wrong result" in wrong.error
    missing = check_code("```python\ndef other(xs, k):\n    return xs\n```", row)
    assert not missing.all_passed and "no function 'scale'" in missing.error
    unserializable = check_code("```python\ndef scale(xs, k):\n    return {1, 2}\n```", row)
    assert not unserializable.all_passed and "TypeError" in unserializable.error


def test_missing_bwrap_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(code_sandbox.shutil, "which", lambda name: None)
    with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap"):
        run_tests("print(1)", [{"input": "", "output": "1\n"}])


# ---------------------------------------------------------------- code: hostile programs

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
    assert not result.all_passed and "Read-only file system" in result.error
    in_repo, _ = attack(f"open({str(ROOT / 'pwned')!r}, 'w').write('x')\nprint('done')\n")
    assert not in_repo.all_passed
    assert not target.exists() and not (ROOT / "pwned").exists()
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
    result = run_tests(forge, [{"input": "", "output": "42\n"}] * 3, limits=FAST)
    assert not result.all_passed and result.error == "case 0: wrong output 'blocked PermissionError\\n'"
    assert_host_intact()


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


@needs_bwrap
def test_reading_the_checkpoint_directory(run_dir):
    run, secret = run_dir
    steal = f"print(open({str(run / 'checkpoints' / 'model.txt')!r}).read())\n"
    exposed, _ = attack(steal, secret + "\n")
    assert exposed.all_passed  # without hide the world-readable file is readable: the test means something
    hidden, _ = attack(steal, secret + "\n", hide=[run])
    assert not hidden.all_passed and secret not in hidden.error and "No such file" in hidden.error
    listing, _ = attack(f"import os\nprint(os.listdir({str(run)!r}))\n", "['checkpoints']\n", hide=[run])
    assert not listing.all_passed and "checkpoints" not in listing.error
    removal, _ = attack(f"import shutil\nshutil.rmtree({str(run)!r})\nprint('done')\n", hide=[run])
    assert not removal.all_passed
    assert (run / "checkpoints" / "model.txt").read_text() == secret


@needs_bwrap
def test_big_output_and_big_files():
    flood, seconds = attack("while True:\n    print('x' * 10000)\n")
    assert not flood.all_passed and "output limit" in flood.error and len(flood.error) < 500 and seconds < 5
    big, seconds = attack("open('big', 'wb').write(b'x' * (100 << 20))\nprint('done')\n")
    assert not big.all_passed and "File too large" in big.error and seconds < 5
    assert_host_intact()


# ---------------------------------------------------------------- the reward pool

def ok_reward(response, row):
    return 1.0


def hang_reward(response, row):
    time.sleep(1e6)


def raise_reward(response, row):
    raise ValueError("broken verifier")


def exit_reward(response, row):
    os._exit(3)


def test_pool_kills_hanging_verifiers():
    fns = {"ok": ok_reward, "hang": hang_reward, "raise": raise_reward, "exit": exit_reward}
    with RewardPool(workers=2, timeout_s=1.0, fns=fns) as pool:
        pool.score([("ok", "", {})] * 2)  # workers started
        pids = {w.process.pid for w in pool._workers}
        start = time.monotonic()
        results = pool.score([("ok", "", {}), ("hang", "", {}), ("raise", "", {}), ("exit", "", {}),
                              ("nope", "", {}), ("ok", "", {})])
        seconds = time.monotonic() - start
        assert [r.reward for r in results] == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
        assert [r.timed_out for r in results] == [False, True, False, False, False, False]
        assert "ValueError: broken verifier" in results[2].error and "died" in results[3].error
        assert "no reward function" in results[4].error
        assert seconds < 4.0  # the hang cost about timeout_s, not forever
        for pid in pids - {w.process.pid for w in pool._workers}:  # the replaced workers are gone
            assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
        assert [r.reward for r in pool.score([("ok", "", {})] * 3)] == [1.0] * 3  # still serving
        workers = [w.process for w in pool._workers]
    assert not any(p.is_alive() for p in workers)


@needs_bwrap
def test_pool_scores_every_domain(run_dir, capsys):
    run, secret = run_dir
    rng = random.Random(1)
    maths = [math_task(rng) for _ in range(40)]
    science = [make(rng) for make in (science_units, science_formula) for _ in range(5)]
    code = demo_code_tasks(per_kind=2)
    items = [("math", t["solution"], t) for t in maths] + [("science", t["solution"], t) for t in science]
    items += [("math", "\\boxed{-1}", maths[0]), ("science", "\\boxed{Z}", science[0])]
    steal = {"code_test_cases": [{"input": "", "output": secret + "\n"}], "test_type": "stdio"}
    items += [("code", t["solution"], t) for t in code]
    items += [("code", f"```python\nprint(open({str(run / 'checkpoints' / 'model.txt')!r}).read())\n```", steal)]
    with RewardPool(workers=2, timeout_s=20.0, hide=[run]) as pool:
        pool.score(items[:2])  # workers started
        start = time.monotonic()
        results = pool.score(items[:len(maths)])
        math_rate = len(maths) / (time.monotonic() - start)
        start = time.monotonic()
        results = pool.score(items)
        seconds = time.monotonic() - start
    rewards = [r.reward for r in results]
    n_ok = len(maths) + len(science)
    assert rewards[:n_ok] == [1.0] * n_ok and rewards[n_ok:n_ok + 2] == [0.0, 0.0]
    assert rewards[n_ok + 2:-1] == [1.0] * len(code) and rewards[-1] == 0.0
    assert all(r.error is None and not r.timed_out for r in results)
    with capsys.disabled():
        print(f"\n  reward pool (2 workers): {math_rate:.0f} math rewards/s; {len(items)} mixed items "
              f"({len(code) + 1} code) in {seconds:.2f}s")
