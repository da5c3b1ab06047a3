"""Stop for requeue: checkpoint at the end of the current step, then exit.

The SLURM batch script traps the warning signal (SLURM sends it `cluster.signal_before_s`
before the time limit, or an admin with `scancel --signal=USR1 --batch`) and writes
RUN_DIR/preempt.request; the script requeues the job once the stage has exited. A file rather
than a signal to the trainers, because torchrun, srun and a container each stand between the
batch shell and the Python processes, and SIGUSR1 kills torchrun. Every rank reads the file on
the shared file system, and the decision is all-reduced, so all ranks stop after the same step.
"""

from __future__ import annotations

from pathlib import Path

from megatron_ring.platform.distributed import any_rank
from megatron_ring.train import checkpoint

REQUEST = "preempt.request"


def request_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / REQUEST


def requested(run_dir: str | Path) -> bool:
    """Collective: True on every rank when any rank sees the request."""
    return any_rank(request_path(run_dir).exists())


def save_or_stop(run_dir: str | Path, step: int, total: int, due: bool, save, log, stage: str) -> bool:
    """Collective, after every step: publish the asynchronous saves that have finished writing,
    save when due or when a requeue is requested (the last step needs no request: the stage
    ends anyway); True when the stage must stop here, its checkpoint published."""
    checkpoint.finalize_saves()
    stop = step < total and requested(run_dir)
    if due or stop:
        save(step)
    if stop:
        checkpoint.finalize_saves(blocking=True)
        log.message(f"{stage}: stopped for requeue after step {step} (checkpoint saved)")
    return stop


def stopped_early(run_dir: str | Path) -> bool:
    """After a stage returned: did it stop for a requeue rather than finish?"""
    return request_path(run_dir).exists()
