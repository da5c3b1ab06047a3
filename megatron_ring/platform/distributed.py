"""Process groups: torch.distributed (NCCL on GPU, gloo on CPU) plus Megatron's parallel state;
the collective patterns every stage uses (rank 0 does something, the others wait or get its
result; any rank's flag); torchrun launching.

Megatron is imported only inside init and shutdown: the launcher imports this module for
torchrun() and launched_world_size(), and importing Megatron takes seconds."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from megatron_ring.platform import cpu_compat, parent_death
from megatron_ring.platform.layout import Layout


def launched_world_size() -> int:
    """Processes in this job as torchrun (or srun) started it; 1 for a lone process."""
    return int(os.environ.get("WORLD_SIZE", "1"))


_CONTROL = None  # the control group (see init), or None: the default group
# The default group's timeout (NCCL's watchdog on GPUs): collectives of the training step, which
# never wait on HTTP. Tests shorten it to show that rollouts do not run under it.
COLLECTIVE_TIMEOUT_S = float(os.environ.get("MEGATRON_RING_COLLECTIVE_TIMEOUT_S", 600))


def init(layout_tp: int = 1, layout_ep: int = 1, seed: int = 1234, control_timeout_s: float = 600.0) -> Layout:
    """Join the job's process group (torchrun env, or a single process) and set up TP/EP/DP, and
    the control group: gloo over every rank with its own timeout (control_timeout_s), which every
    "rank 0 does something, the others wait" pattern below uses. Waiting there, a rank is in no
    NCCL collective: rank 0 may spend hours on HTTP and rewards without tripping a watchdog."""
    from megatron.core import parallel_state, tensor_parallel  # deferred: slow, the launcher needs none

    cpu = cpu_compat.apply()
    world = launched_world_size()
    rank = int(os.environ.get("RANK", "0"))
    if not dist.is_initialized():
        if not cpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        backend = "gloo" if cpu else "nccl"
        if "MASTER_ADDR" in os.environ:
            dist.init_process_group(backend, rank=rank, world_size=world,
                                    timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        else:  # a lone process needs no rendezvous
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    layout = Layout(tp=layout_tp, ep=layout_ep, world_size=dist.get_world_size())
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=1,
    )
    global _CONTROL
    if world > 1:
        _CONTROL = dist.new_group(backend="gloo", timeout=timedelta(seconds=control_timeout_s))
    # CPU initialisation (use_cpu_initialization) draws from the default generator.
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return layout


def device() -> torch.device:
    """Where this rank computes: its GPU (NCCL), else the CPU (gloo)."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


def to_device(batch):
    """A dataclass of tensors on device(): batches are built on the CPU, from Python lists."""
    dev = device()
    moved = {f.name: getattr(batch, f.name).to(dev) for f in dataclasses.fields(batch)
             if isinstance(getattr(batch, f.name), torch.Tensor)}
    return dataclasses.replace(batch, **moved)


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_rank0() -> bool:
    """True on global rank 0, and in a process without a process group."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def rank0_then_broadcast(fn, error_type: type[Exception] = RuntimeError):
    """Collective: fn() run on rank 0 only; every rank returns its (picklable) result, or raises:
    rank 0 its own error, the others error_type with its message."""
    if not _distributed():
        return fn()
    box, error = [None], None
    if dist.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except Exception as e:  # every rank must hear about it, or they wait forever
            error = e
            box[0] = ("error", str(e) if isinstance(e, error_type) else f"{type(e).__name__}: {e}")
    dist.broadcast_object_list(box, src=0, group=_CONTROL)
    if error is not None:
        raise error
    kind, value = box[0]
    if kind == "error":
        raise error_type(value)
    return value


def rank0_then_barrier(fn):
    """Collective: fn() run on rank 0 only (it writes what the others read next); every rank goes
    on once it has returned, and raises (RuntimeError on the others) if it failed. Returns fn's
    result on rank 0, None elsewhere."""
    result = []
    rank0_then_broadcast(lambda: result.append(fn()))
    return result[0] if result else None


def any_rank(flag: bool) -> bool:
    """Collective: True on every rank when flag is True on any rank."""
    if not _distributed():
        return bool(flag)
    t = torch.tensor([int(bool(flag))], device=device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def everyone(obj) -> list:
    """Collective: every rank's (picklable) obj, in rank order, on every rank (control group)."""
    if not _distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=_CONTROL)
    return out


def control_group():
    """The gloo group of control messages (None in a lone process: the default group)."""
    return _CONTROL


def shutdown():
    from megatron.core import parallel_state  # deferred: slow, the launcher needs none

    global _CONTROL
    _CONTROL = None
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(nproc: int, argv: list[str], env: dict | None = None, log_dir: str | os.PathLike | None = None,
             prog: str = "megatron-ring", **kwargs) -> subprocess.CompletedProcess:
    """Run `python -m <argv>` as nproc local processes under torchrun (one node). torchrun and its
    workers die with this process, even when it is killed outright (platform/parent_death.py).
    With log_dir, every rank's output is kept there, rank 0's is shown, and a failed worker ends
    the command with its first error line and exit code 2 (platform/torchrun_agent.py)."""
    agent = ["-m", "torch.distributed.run"] if log_dir is None else \
        ["-m", "megatron_ring.platform.torchrun_agent", prog, str(log_dir)]
    cmd = [sys.executable, *agent, f"--nproc-per-node={nproc}", "--nnodes=1", f"--master-port={free_port()}",
           "--master-addr=127.0.0.1", *argv]
    full_env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    full_env.pop(parent_death.PARENT_ENV, None)  # torchrun's workers take torchrun as their parent
    full_env.update(env or {})
    return subprocess.run(cmd, env=full_env, preexec_fn=parent_death.preexec(), **kwargs)
