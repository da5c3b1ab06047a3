"""Processes that die with their parent (Linux PR_SET_PDEATHSIG), so that killing a launcher,
even with SIGKILL, ends its whole job: torchrun, torchrun's workers, and what a worker starts
(Megatron's forked checkpoint writers, the multiprocessing helpers it spawns, reward workers).
Without it they were re-parented to init and went on training, and a rerun started a second
trainer on the same run directory.

The kernel clears the setting on fork and sends the signal when the *thread* that created the
process exits, so every generation arms itself, and only children of a main thread are tied:
- torchrun: the launcher's Popen runs `preexec()` in the child;
- torchrun workers, and the children a worker spawns (multiprocessing "spawn" re-imports the
  parent's main module, megatron_ring.cli, as __mp_main__): `tie_to_job()` when megatron_ring.cli
  runs as the main module of a torchrun job; the parent is named by MEGATRON_RING_PARENT_PID
  (set by our torchrun agent, then by each worker for its own children), else taken as is;
- forked children of those (Megatron's writers): an os.register_at_fork hook.
Each checks after arming that its parent is still the one that started it, so a parent that died
a moment earlier cannot leave it orphaned. Elsewhere than Linux nothing is armed.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading

PARENT_ENV = "MEGATRON_RING_PARENT_PID"
_PR_SET_PDEATHSIG = 1


# libc's prctl, looked up once at import: a forked child must not dlopen.
_PRCTL = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def arm(parent: int, sig: int = signal.SIGKILL) -> None:
    """Receive `sig` when `parent` (this process's parent) dies; at once if it already has."""
    if _PRCTL is None:
        return
    if _PRCTL(_PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:  # it died before the signal was armed
        os.kill(os.getpid(), sig)


def preexec(sig: int = signal.SIGKILL):
    """A Popen preexec_fn tying the child to the calling process (call it from the main thread)."""
    parent = os.getpid()
    return lambda: arm(parent, sig)


_main_thread = threading.main_thread().ident
_forker: int | None = None  # set in the parent just before a fork by its main thread
_armed = False


def _before_fork() -> None:
    global _forker
    _forker = os.getpid() if threading.get_ident() == _main_thread else None


def _after_fork_in_child() -> None:
    if _forker is not None:
        arm(_forker)
        os.environ[PARENT_ENV] = str(os.getpid())


def tie_to_job() -> None:
    """In a process of a torchrun job (a worker, or a child a worker spawned): die with the
    parent, and make this process's own children die with it."""
    global _armed
    if "TORCHELASTIC_RUN_ID" not in os.environ or _armed or _PRCTL is None:
        return
    _armed = True
    named = os.environ.get(PARENT_ENV)
    arm(int(named) if named else os.getppid())
    os.environ[PARENT_ENV] = str(os.getpid())
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
