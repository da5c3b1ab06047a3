"""The rendered batch scripts under a real SLURM (slurmctld, slurmd and munged on localhost):
`megatron-ring slurm --submit` runs the tiny distillation to its last checkpoint; a preemption
signal makes it checkpoint and requeue itself, `scontrol requeue` kills and restarts it, and
the run still ends with every step exactly once."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_ring.train import checkpoint
from tests.slurm_cluster import slurm_cluster  # noqa: F401

pytestmark = pytest.mark.slow  # real SLURM daemons: `make test` only
ROOT = Path(__file__).resolve().parents[1]
TINY = ["train.epochs=1", "train.save_initial=false", "logging.wandb=disabled", "logging.progress=false"]


def submit(cluster, tmp_path: Path, run_dir: Path, *sets: str) -> int:
    r = subprocess.run([sys.executable, "-m", "megatron_ring.cli", "slurm", "recipes/tiny/distill.yaml", *TINY, *sets,
                        "--run-dir", str(run_dir), "--out", str(tmp_path / "slurm"), "--submit"],
                       cwd=ROOT, env=cluster.env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    return int(re.search(r"Submitted batch job (\d+)", r.stdout).group(1))


def steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.is_file() else []


def logs(run_dir: Path, job: int) -> tuple[str, str]:
    """The batch script's log and node 0's (torchrun's) log of the job."""
    read = lambda name: (run_dir / "logs" / name).read_text(errors="replace")  # noqa: E731
    return read(f"tiny-distill-{job}.out"), read(f"tiny-distill-{job}-node0.out")


def wait_for(cond, timeout: float, what: str, cluster, job: int) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {timeout} s; job {cluster.job(job)}")
        time.sleep(0.2)


def test_batch_job_trains_to_the_last_checkpoint(slurm_cluster, tmp_path):
    run_dir = tmp_path / "run"
    job = submit(slurm_cluster, tmp_path, run_dir, "data.demo_sft_rows=400", "train.save_every_steps=3")
    info = slurm_cluster.wait(job, "COMPLETED", timeout=600)
    assert info["ExitCode"] == "0:0"
    done = steps(run_dir)
    assert done == list(range(1, len(done) + 1)) and len(done) >= 4
    assert checkpoint.saved_step(checkpoint.latest(run_dir / "checkpoints")) == done[-1]
    assert (run_dir / "checkpoints" / "iter_0000003").is_dir()
    assert (run_dir / "plots" / "distill.png").is_file() and (run_dir / "recipe.yaml").is_file()
    batch, node = logs(run_dir, job)
    assert "restart 0" in batch and "stage exited with code 0" in batch
    assert "distill:" in node and "steps/epoch" in node


def test_preemption_and_requeue_resume_without_losing_steps(slurm_cluster, tmp_path):
    run_dir = tmp_path / "run"
    job = submit(slurm_cluster, tmp_path, run_dir, "data.demo_sft_rows=2400", "train.save_every_steps=10")
    wait_for(lambda: len(steps(run_dir)) >= 2, 300, "two training steps", slurm_cluster, job)

    # 1. The preemption warning: the stage checkpoints after its step, the script requeues.
    slurm_cluster.signal_batch(job, "USR1")
    wait_for(lambda: "resumed from" in logs(run_dir, job)[1], 300, "a resumed stage", slurm_cluster, job)
    stopped = int(re.search(r"stopped for requeue after step (\d+)", logs(run_dir, job)[1]).group(1))
    assert f"resumed from {run_dir / 'checkpoints' / f'iter_{stopped:07d}'}" in logs(run_dir, job)[1]
    assert slurm_cluster.job(job)["Restarts"] == "1"

    # 2. A hard requeue (the job is killed): it resumes from the last checkpoint it has.
    wait_for(lambda: len(steps(run_dir)) >= stopped + 2, 300, "steps after the resume", slurm_cluster, job)
    slurm_cluster.requeue(job)
    info = slurm_cluster.wait(job, "COMPLETED", timeout=600)
    assert info["ExitCode"] == "0:0" and info["Restarts"] == "2"

    done = steps(run_dir)
    assert done == list(range(1, len(done) + 1)), "a step was lost or logged twice"
    assert len(done) > stopped + 2
    assert checkpoint.saved_step(checkpoint.latest(run_dir / "checkpoints")) == done[-1]
    batch, node = logs(run_dir, job)
    assert "requeueing job" in batch and batch.count("== ") >= 4  # three starts, one requeue
    assert node.count("resumed from") == 2
