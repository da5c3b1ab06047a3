"""Trainer side of pushing new weights into an SGLang server.

Disk: the trainer has exported an HF directory (megatron_ring.models.weights.export_hf); the
server reloads it. Simple and works wherever the server can read the trainer's files.

Broadcast: a process group of its own between the trainer's rank 0 (rank 0 of the group) and
the server's ranks (rank_offset.. of the group), separate from the trainer's default group. The
server joins it the way torch's own group helper does (tcp rendezvous on the trainer's store,
keys under "<group>", "<group>/" and "<device>/"), so the trainer builds the same store prefixes
from public classes. Tensors go in buckets: for each bucket the server is told names, dtypes
and shapes (an HTTP call that returns only after the broadcasts, so it runs in a thread) while
rank 0 broadcasts the tensors in the same order.
"""

from __future__ import annotations

import threading
import time
import warnings
from datetime import timedelta
from typing import Iterable, Iterator

import torch
import torch.distributed as dist

from megatron_ring.models import hf_convert as conv
from megatron_ring.rollout.base import RolloutError
from megatron_ring.rollout.sglang_client import SGLangClient


def hf_named_tensors(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, full tensor) for the whole model; collective: every trainer rank iterates."""
    from megatron_ring.models.weights import gather_full  # imports Megatron: the rest of this module needs only torch

    for name, full in gather_full(model):
        yield from conv.to_hf(name, full, model.arch).items()


def push_from_disk(client: SGLangClient, hf_dir, version: int) -> None:
    """The server reloads hf_dir (written by export_hf) and tags its answers with version."""
    client.update_weights_from_disk(str(hf_dir), version)


def buckets(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
            ) -> Iterator[tuple[list[tuple[str, torch.Tensor]], bool]]:
    """Consecutive groups of about bucket_bytes (one tensor at least), each with is_last."""
    current, size, full = [], 0, None
    for name, t in named:
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > bucket_bytes:
            if full is not None:
                yield full, False
            full, current, size = current, [], 0
        current.append((name, t))
        size += nbytes
    if full is not None:
        yield full, False  # `current` holds at least the tensor that did not fit
    if current:
        yield current, True


class _Task(threading.Thread):
    """A blocking call run beside the collective it waits for."""

    def __init__(self, fn):
        super().__init__(daemon=True)
        self.fn, self.result, self.error = fn, None, None

    def run(self):
        try:
            self.result = self.fn()
        except BaseException as e:  # reported by the caller
            self.error = e


def _group_store(host: str, port: int, world_size: int, group_name: str, device: str,
                 timeout: timedelta) -> dist.Store:
    store = dist.TCPStore(host, port, world_size, is_master=True, timeout=timeout,
                          wait_for_workers=False)
    for prefix in (group_name, f"{group_name}/", f"{device}/"):
        store = dist.PrefixStore(prefix, store)
    return store


class WeightBroadcaster:
    """Trainer rank 0's end of the weight-update group with one SGLang server."""

    def __init__(self, client: SGLangClient, master_address: str, master_port: int,
                 server_world_size: int = 1, group_name: str = "weight_update_group",
                 backend: str = "gloo", dtype: torch.dtype | None = torch.bfloat16,
                 bucket_bytes: int = 512 << 20, timeout_s: float = 600.0):
        self.client, self.master_address, self.master_port = client, master_address, master_port
        self.world_size = 1 + server_world_size
        self.group_name, self.backend, self.dtype = group_name, backend, dtype
        self.bucket_bytes, self.timeout_s = bucket_bytes, timeout_s
        self.device = "cuda" if backend == "nccl" else "cpu"
        self.pg = None

    def _wait(self, task: _Task, done, what: str, local: _Task | None = None) -> None:
        """Until done() and the HTTP call returned; fail early if the HTTP call (or the local
        side of the collective, `local`) failed."""
        deadline = time.monotonic() + self.timeout_s
        while not done():
            if not task.is_alive() and task.error is not None:
                self.pg = None  # the group is out of step with the server now
                raise RolloutError(f"{what}: {task.error}") from task.error
            if time.monotonic() > deadline:
                self.pg = None
                raise RolloutError(f"{what}: not finished after {self.timeout_s:g} s")
            time.sleep(0.002)
        if local is not None and local.error is not None:
            self.pg = None
            raise RolloutError(f"{what}: {local.error}") from local.error
        task.join(self.timeout_s)
        if task.is_alive():
            raise RolloutError(f"{what}: {self.client.url} did not answer after the transfer")
        if task.error is not None:
            self.pg = None
            raise RolloutError(f"{what}: {task.error}") from task.error

    def connect(self) -> None:
        """Create the group: the server joins over HTTP while rank 0 hosts the store."""
        timeout = timedelta(seconds=self.timeout_s)
        task = _Task(lambda: self.client.init_weights_update_group(
            self.master_address, self.master_port, 1, self.world_size, self.group_name, self.backend))
        made = {}

        def make():
            store = _group_store(self.master_address, self.master_port, self.world_size,
                                 self.group_name, self.device, timeout)
            if self.backend == "nccl":
                opts = dist.ProcessGroupNCCL.Options()
                opts._timeout = timeout
                pg = dist.ProcessGroupNCCL(store, 0, self.world_size, opts)
            else:
                pg = dist.ProcessGroupGloo(store, 0, self.world_size, timeout)
            pg._set_sequence_number_for_group()  # the server's ranks wait for rank 0's number
            made["pg"] = pg

        maker = _Task(make)
        task.start()
        maker.start()
        what = f"joining {self.client.url} to weight group {self.group_name!r} at {self.master_address}:{self.master_port}"
        self._wait(task, lambda: not maker.is_alive(), what, local=maker)
        self.pg = made["pg"]

    def push(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Send every tensor to the server; it serves them (tagged with version) afterwards."""
        if self.pg is None:
            self.connect()
        with self.client.weight_update():
            for bucket, last in buckets(named_tensors, self.bucket_bytes):
                self._send_bucket(bucket, version, flush=last)

    def _send_bucket(self, bucket, version: int, flush: bool) -> None:
        tensors = [t.detach().to(self.device, self.dtype or t.dtype).contiguous() for _, t in bucket]
        names = [n for n, _ in bucket]
        dtypes = [str(t.dtype).removeprefix("torch.") for t in tensors]
        shapes = [list(t.shape) for t in tensors]
        task = _Task(lambda: self.client.update_weights_from_distributed(
            names, dtypes, shapes, self.group_name, version, flush_cache=flush))
        task.start()
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = 0, 0
        works = [self.pg.broadcast([t], opts) for t in tensors]
        what = f"broadcasting {len(tensors)} tensors ({names[0]}...) to {self.client.url}"
        self._wait(task, lambda: all(w.is_completed() for w in works), what)
        try:
            for w in works:
                w.wait()
        except RuntimeError as e:
            self.pg = None
            raise RolloutError(f"{what}: {e}") from e

    def close(self) -> None:
        """Leave the group on both sides (best effort on the server: it may be gone)."""
        if self.pg is None:
            return
        self.pg = None
        try:
            self.client.destroy_weights_update_group(self.group_name)
        except RolloutError as e:
            warnings.warn(f"weight group {self.group_name!r} may still exist on the server: {e}")
