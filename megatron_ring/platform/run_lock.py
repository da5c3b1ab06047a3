"""One trainer per run directory: an exclusive flock on RUN_DIR/trainer.lock for the life of the
stage. Two trainers on one directory interleave their metrics and overwrite each other's
checkpoints; the second one now stops at once, naming the first one's pid.

Who holds it: the process that started the job. That is the `megatron-ring distill|rl`
launcher, so a second launcher stops before torchrun starts; it tells its workers through
MEGATRON_RING_RUN_LOCK (its pid), which rank 0 trusts only when that pid is its grandparent
(launcher -> torchrun -> worker). When torchrun was started directly (a SLURM batch script runs
torchrun on every node) rank 0 takes the lock itself; Megatron's writers it forks inherit it.
The kernel releases a flock when its holder dies, however it dies, so a killed run never blocks
the next one. The file stays (deleting a lock file that others may be opening is racy) and
holds the holder's pid, host, start time, SLURM job and command, for the message.

On a shared file system the lock needs flock across nodes (NFSv4; Lustre mounted with -o flock);
where the file system refuses flock the stage warns and runs unlocked. A SLURM job requeued after
a node failure may find its own previous run's lock still held until the server's lease expires:
rank 0 waits up to REQUEUE_WAIT_S for a lock that names its own job.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import sys
import time
from pathlib import Path

LOCK_FILE = "trainer.lock"
HELD_BY_ENV = "MEGATRON_RING_RUN_LOCK"
REQUEUE_WAIT_S = 300.0

_held: dict[Path, int] = {}  # run directory -> the open, locked file (kept for the process's life)


class RunDirBusy(ValueError):
    """Another trainer holds the run directory."""


def _describe_self() -> str:
    job = os.environ.get("SLURM_JOB_ID")
    command = " ".join(["megatron-ring", *sys.argv[1:]])[:160]
    return (f"pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%dT%H:%M:%S')}"
            + (f", SLURM job {job}" if job else "") + f": {command}")


def _try_lock(path: Path) -> tuple[int | None, str]:
    """(fd, "") when locked; (None, holder) when another process holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        os.close(fd)
        return None, holder
    except OSError as e:
        os.close(fd)
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            print(f"megatron-ring: warning: {path}: this file system refuses flock ({os.strerror(e.errno)}); "
                  "running without the lock that stops a second trainer on this directory", file=sys.stderr)
            return -1, ""
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, (_describe_self() + "\n").encode(), 0)
    os.fsync(fd)
    return fd, ""


def acquire(run_dir: str | os.PathLike, wait_for_own_job_s: float = 0.0) -> None:
    """Lock the run directory for this process's life, or raise RunDirBusy naming the holder."""
    run_dir = Path(run_dir).resolve()
    if run_dir in _held:
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    deadline = time.monotonic() + wait_for_own_job_s
    job = os.environ.get("SLURM_JOB_ID")
    while True:
        fd, holder = _try_lock(path)
        if fd is not None:
            _held[run_dir] = fd
            return
        own_job = bool(job) and f", SLURM job {job}:" in holder
        if not own_job or time.monotonic() >= deadline:
            raise RunDirBusy(f"{run_dir} is in use by another trainer: {holder or 'holder unknown'} (it holds "
                             f"{path}). Wait for it to end or stop it: a second trainer on one run directory "
                             "would interleave its metrics and overwrite its checkpoints")
        time.sleep(5.0)


def release(run_dir: str | os.PathLike) -> None:
    fd = _held.pop(Path(run_dir).resolve(), None)
    if fd is not None and fd >= 0:
        os.close(fd)


@contextlib.contextmanager
def held(run_dir: str | os.PathLike):
    """The launcher's lock around starting torchrun; the workers it starts are told."""
    acquire(run_dir)
    before = os.environ.get(HELD_BY_ENV)
    os.environ[HELD_BY_ENV] = str(os.getpid())
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(HELD_BY_ENV, None)
        else:
            os.environ[HELD_BY_ENV] = before
        release(run_dir)


def _parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])  # after "pid (comm)": state, ppid


def claim_in_worker(run_dir: str | os.PathLike) -> None:
    """Rank 0 of a stage: take the lock, unless the launcher that started this job holds it."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    launcher = os.environ.get(HELD_BY_ENV)
    if launcher and launcher == str(_parent_of(os.getppid())):
        return
    acquire(run_dir, wait_for_own_job_s=REQUEUE_WAIT_S if os.environ.get("SLURM_JOB_ID") else 0.0)
