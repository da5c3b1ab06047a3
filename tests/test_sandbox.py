"""The code sandbox: hostile programs score 0 and leave the host and the run intact."""

import socket
import threading
import time

import pytest

from megatron_ring.rewards import sandbox
from megatron_ring.rewards.code_reward import run_tests
from megatron_ring.rewards.sandbox import SandboxLimits, SandboxUnavailable
from tests.sandbox_fixtures import (FAST, ROOT, assert_host_intact, attack, host_dir, needs_bwrap,  # noqa: F401
                                    run_dir)


def test_missing_bwrap_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(sandbox.shutil, "which", lambda name: None)
    with pytest.raises(SandboxUnavailable, match="apt-get install bubblewrap"):
        run_tests("print(1)", [{"input": "", "output": "1\n"}])


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
