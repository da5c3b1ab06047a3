"""tests/slurm_cluster.py against real SLURM daemons on localhost: exit codes, a signal to the
batch shell caught by a trap, a requeue that restarts the job, and a clean stop."""

import os
import time
from pathlib import Path

import pytest

from tests import slurm_cluster as sc
from tests.slurm_cluster import LocalSlurm, parse_scontrol, slurm_cluster  # noqa: F401

pytestmark = pytest.mark.slow  # real SLURM daemons: `make test` only
LOOP = 'while :; do sleep 60 & wait $!; done\n'  # a trap only fires promptly inside `wait`


def script(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\n" + body)
    path.chmod(0o755)
    return path


def wait_file(path: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < deadline, f"{path} not created within {timeout} s"
        time.sleep(0.1)


def test_parse_scontrol():
    d = parse_scontrol("JobId=7 JobName=my job x JobState=RUNNING Reason=None ExitCode=3:0 "
                       "ReqB:S:C:T=0:0:*:* Socks/Node=* Command=/a/b.sh x y\n")
    assert d == {"JobId": "7", "JobName": "my job x", "JobState": "RUNNING", "Reason": "None",
                 "ExitCode": "3:0", "ReqB:S:C:T": "0:0:*:*", "Socks/Node": "*", "Command": "/a/b.sh x y"}


def test_unavailable_names_what_is_missing(monkeypatch):
    if os.geteuid() != 0:
        pytest.skip("checks the install path, which needs root")
    monkeypatch.setattr(sc, "_which", lambda name: None)
    monkeypatch.setattr(sc, "_install_error", None)
    with pytest.raises(sc.SlurmUnavailable, match=r"missing: munged, slurmctld, slurmd, .*apt-get not found"):
        sc.ensure_slurm()


def test_exit_zero(slurm_cluster, tmp_path):
    job = slurm_cluster.sbatch(script(tmp_path / "ok.sh", 'echo "$SLURM_JOB_ID $2" > "$1/ran"\n'), tmp_path, "hello")
    info = slurm_cluster.wait(job, "COMPLETED", timeout=30)
    assert info["ExitCode"] == "0:0" and info["Restarts"] == "0"
    assert (tmp_path / "ran").read_text().split() == [str(job), "hello"]
    assert (tmp_path / f"slurm-{job}.out").exists()  # sbatch runs in the script's directory


def test_exit_code(slurm_cluster, tmp_path):
    job = slurm_cluster.sbatch(script(tmp_path / "fail.sh", "exit 3\n"))
    info = slurm_cluster.wait(job, "FAILED", timeout=30)
    assert info["ExitCode"] == "3:0"
    with pytest.raises(RuntimeError, match="ended FAILED"):  # a wrong terminal state fails at once
        slurm_cluster.wait(job, "COMPLETED", timeout=30)


def test_signal_batch_reaches_trap(slurm_cluster, tmp_path):
    body = ('#SBATCH --requeue --open-mode=append\nDIR=$1\n'
            'trap \'echo got USR1; touch "$DIR/got_usr1"\' USR1\ntouch "$DIR/started"\n' + LOOP)
    log = tmp_path / "out.log"
    job = slurm_cluster.sbatch(script(tmp_path / "trap.sh", body), tmp_path, options=["--output", log])
    wait_file(tmp_path / "started")  # the trap is set before the signal is sent
    slurm_cluster.signal_batch(job, "USR1")
    wait_file(tmp_path / "got_usr1", timeout=10)
    assert slurm_cluster.job(job)["JobState"] == "RUNNING"  # trapped, not killed
    slurm_cluster.cancel(job)
    slurm_cluster.wait(job, "CANCELLED", timeout=30)
    assert "got USR1" in log.read_text()


def test_requeue_restarts_job(slurm_cluster, tmp_path):
    body = ('#SBATCH --requeue --open-mode=append\n'
            'echo "run restart=${SLURM_RESTART_COUNT:-0}"\ntouch "$1/started.${SLURM_RESTART_COUNT:-0}"\n' + LOOP)
    log = tmp_path / "out.log"
    job = slurm_cluster.sbatch(script(tmp_path / "requeue.sh", body), tmp_path, options=["--output", log])
    wait_file(tmp_path / "started.0")
    t0 = time.monotonic()
    slurm_cluster.requeue(job)
    wait_file(tmp_path / "started.1", timeout=40)
    print(f"requeue -> restarted in {time.monotonic() - t0:.1f} s")
    info = slurm_cluster.job(job)
    assert info["JobState"] == "RUNNING" and info["Restarts"] == "1"
    lines = log.read_text().splitlines()  # appended, not overwritten; slurmstepd adds its own line:
    assert [x for x in lines if x.startswith("run ")] == ["run restart=0", "run restart=1"]
    assert any("DUE TO JOB REQUEUE" in x for x in lines)  # "*** JOB n ... CANCELLED AT ... DUE TO JOB REQUEUE ***"
    slurm_cluster.cancel(job)
    slurm_cluster.wait(job, "CANCELLED", timeout=30)


def test_second_cluster_then_stop_leaves_nothing(slurm_cluster, tmp_path):
    with LocalSlurm(tmp_path / "c2", cpus=1) as c2:  # beside the module's cluster: its own ports
        assert {c2.ctld_port, c2.slurmd_port}.isdisjoint({slurm_cluster.ctld_port, slurm_cluster.slurmd_port})
        job = c2.sbatch(script(tmp_path / "long.sh", "touch \"$1/started\"\n" + LOOP), tmp_path)
        wait_file(tmp_path / "started")
        pids = c2.pids()
        assert c2.leftovers()  # the daemons and the running job are found
        t0 = time.monotonic()
    print(f"stop with a running job: {time.monotonic() - t0:.2f} s")
    assert c2.leftovers() == []
    assert not [p for p in pids.values() if Path(f"/proc/{p}").exists()]
    c2.stop()  # a second stop is a no-op
    assert slurm_cluster.run("sinfo", "-h", "-o", "%T").stdout.strip() == "idle"  # the module's one still up
