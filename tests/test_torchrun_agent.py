"""How a failed worker is reported (platform/torchrun_agent.py): rank 0's console without its
error reports, the first error found in a worker's stderr, and the rank blamed when several
failed (not one torchrun stopped, not a peer's lost connection after a kill)."""

import io
import os
import types
from pathlib import Path

from megatron_ring.platform.torchrun_agent import ConsoleFilter, failure_report, first_error

TRACEBACK = """[rank0]: Traceback (most recent call last):
[rank0]:   File "x.py", line 1, in <module>
[rank0]:     f()
[rank0]: KeyError: 'loss'
[rank0]:
[rank0]: During handling of the above exception, another exception occurred:
[rank0]:
[rank0]: Traceback (most recent call last):
[rank0]:   File "x.py", line 3, in <module>
[rank0]: RuntimeError: wrapped
"""
REPORT = "megatron-ring distill: error: bad SFT rows: 3 bad\n  a.jsonl:1: too long\n  a.jsonl:4: too long\n"


def test_first_error_is_the_root_exception_or_the_report_with_its_details():
    assert first_error("warning: x\n" + TRACEBACK) == "KeyError: 'loss'"
    assert first_error("step 1\n" + REPORT + "later\n" + TRACEBACK) == REPORT.rstrip("\n")
    assert first_error("just output\n") is None


def test_console_shows_progress_as_drawn_and_hides_error_reports():
    out = io.StringIO()
    console = ConsoleFilter(out)
    console.feed("\rdistill:  10%|#   | 1/10")
    assert out.getvalue() == "\rdistill:  10%|#   | 1/10"  # a partial bar is shown at once
    console.feed("\rdistill:  20%|##  | 2/10\nUserWarning: shown\n" + TRACEBACK[:60])
    console.feed(TRACEBACK[60:] + REPORT + "megatron-ring distill: err")
    console.feed("or: second\nafter\n", final=True)
    assert out.getvalue() == "\rdistill:  10%|#   | 1/10\rdistill:  20%|##  | 2/10\nUserWarning: shown\nafter\n"


def fake_failure(log_dir: Path, rank: int, pid: int, exitcode: int, stderr: str):
    err = log_dir / "none_abc" / "attempt_0" / str(rank) / "stderr.log"
    err.parent.mkdir(parents=True)
    err.write_text(stderr)
    return types.SimpleNamespace(local_rank=rank, pid=pid, exitcode=exitcode, timestamp=0)


def report(tmp_path, failures, torchrun_log=""):
    (tmp_path / "torchrun.log").write_text(torchrun_log)
    return failure_report("megatron-ring rl", tmp_path, types.SimpleNamespace(failures=failures))


def test_report_blames_the_cause_not_its_consequences(tmp_path):
    killed = fake_failure(tmp_path, 0, 100, -9, "step 3\n")
    peer = fake_failure(tmp_path, 1, 101, 1, TRACEBACK)  # lost its connection to rank 0
    lines = report(tmp_path, {0: killed, 1: peer})
    assert lines == [f"megatron-ring rl: worker logs in {tmp_path}; rank 0's stderr: "
                     f"{tmp_path}/none_abc/attempt_0/0/stderr.log",
                     "megatron-ring rl: error: rank 0 (pid 100) was killed by SIGKILL"]


def test_report_skips_ranks_torchrun_stopped(tmp_path):
    stopped = fake_failure(tmp_path, 0, 100, -15, "")
    failed = fake_failure(tmp_path, 1, 101, 1, TRACEBACK)
    log = "WARNING torch.distributed.elastic.multiprocessing.api: Sending process 100 closing signal SIGTERM\n"
    assert report(tmp_path, {0: stopped, 1: failed}, log)[-1] == "megatron-ring rl: error: KeyError: 'loss'"
    deliberate = fake_failure(tmp_path / "b", 0, 100, 2, REPORT.replace("distill", "rl"))
    lines = report(tmp_path / "b", {0: deliberate, 1: fake_failure(tmp_path / "b", 1, 101, -9, "")})
    assert lines[-1] == REPORT.replace("distill", "rl").rstrip("\n")


def test_report_prefers_rank0_among_ranks_that_each_said_an_error(tmp_path):
    """A failed checkpoint write: torch tells only rank 0 the cause; the others say it failed."""
    zero = fake_failure(tmp_path, 0, 100, 2, "megatron-ring rl: error: save failed: [Errno 28] no space\n")
    one = fake_failure(tmp_path, 1, 101, 2, "megatron-ring rl: error: save failed on another rank\n")
    os.utime(tmp_path / "none_abc" / "attempt_0" / "0" / "stderr.log", ns=(2 * 10**18, 2 * 10**18))
    assert report(tmp_path, {0: zero, 1: one})[-1] == "megatron-ring rl: error: save failed: [Errno 28] no space"
