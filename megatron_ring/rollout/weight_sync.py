"""Trainer side of pushing new weights into SGLang engines over a process group.

Disk (push_from_disk): the trainer has exported an HF directory (models.weights.export_hf) and
every engine reloads it. Simple; needs a file system every engine reads, and costs a full write
and read of the model per step.

Distributed (WeightGroup): one process group spans the trainer's sending rank (global rank 0,
group rank 0) and every TP rank of every engine: world = 1 + sum of the engines' TP sizes,
engine j at rank_offset 1 + the TP sizes before it. Each bucket (weight_buckets.Bucket) is ONE
broadcast of a flat uint8 tensor that reaches every engine at once, announced to each engine by
/update_weights_from_distributed with load_format "flattened_bucket" (the call returns only after
the broadcast, so it runs in a thread). While a bucket is on the wire the caller gathers the next.

The engines join the way SGLang's init_custom_process_group does (tcp rendezvous on the
trainer's store, keys under "<group>", "<group>/" and "<device>/"), so the trainer builds the
same store prefixes from public classes. The group is created once and reused; a push that fails
(an engine died) drops it, and the next push builds a new one under a new name.
"""

from __future__ import annotations

import threading
import time
import warnings
from datetime import timedelta
from typing import Iterable

import torch.distributed as dist

from megatron_ring.platform.distributed import free_port
from megatron_ring.rollout.base import RolloutError
from megatron_ring.rollout.sglang_client import SGLangClient
from megatron_ring.rollout.weight_buckets import Bucket


def push_from_disk(client: SGLangClient, hf_dir, version: int) -> None:
    """The server reloads hf_dir (written by export_hf) and tags its answers with version."""
    client.update_weights_from_disk(str(hf_dir), version)


class Task(threading.Thread):
    """A blocking call run beside the collective it waits for (a daemon: a call that never
    returns must not keep the trainer from exiting)."""

    def __init__(self, fn, what: str):
        super().__init__(daemon=True)
        self.fn, self.what, self.result, self.error = fn, what, None, None
        self.start()

    def run(self):
        try:
            self.result = self.fn()
        except BaseException as e:  # reported by the caller
            self.error = e


def wait_all(tasks: list[Task], done, timeout_s: float, what: str) -> None:
    """Until done() and every task returned; RolloutError as soon as a task failed (naming it)
    or after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while not (done() and not any(t.is_alive() for t in tasks)):
        for t in tasks:
            if not t.is_alive() and t.error is not None:
                raise RolloutError(f"{what}: {t.what}: {t.error}") from t.error
        if time.monotonic() > deadline:
            late = [t.what for t in tasks if t.is_alive()] or ["the trainer's side of the collective"]
            raise RolloutError(f"{what}: not finished after {timeout_s:g} s ({', '.join(late)})")
        time.sleep(0.001)
    for t in tasks:
        if t.error is not None:
            raise RolloutError(f"{what}: {t.what}: {t.error}") from t.error


def group_store(host: str, port: int, world_size: int, group_name: str, device: str,
                timeout: timedelta) -> dist.Store:
    store = dist.TCPStore(host, port, world_size, is_master=True, timeout=timeout, wait_for_workers=False)
    for prefix in (group_name, f"{group_name}/", f"{device}/"):
        store = dist.PrefixStore(prefix, store)
    return store


class WeightGroup:
    """Trainer rank 0's end of the weight-update group with every engine of a fleet."""

    def __init__(self, engines: list[tuple[str, int]], master_address: str, backend: str = "gloo",
                 timeout_s: float = 600.0, name: str = "megatron_ring_weights"):
        """engines: (url, TP size) of each engine, in rank order."""
        self.engines = [(SGLangClient(url), int(tp)) for url, tp in engines]
        self.master_address, self.backend, self.timeout_s = master_address, backend, timeout_s
        self.device = "cuda" if backend == "nccl" else "cpu"
        self.base_name, self.generation, self.name = name, 0, None
        self.pg = None
        self.stale: str | None = None  # a broken group's name, left on the engines that survived

    @property
    def world_size(self) -> int:
        return 1 + sum(tp for _, tp in self.engines)

    def offsets(self) -> list[int]:
        out, at = [], 1
        for _, tp in self.engines:
            out.append(at)
            at += tp
        return out

    def connect(self) -> None:
        """Create the group: every engine joins over HTTP while rank 0 hosts the store."""
        if self.stale is not None:  # best effort: an engine restarted since has no such group
            for client, _ in self.engines:
                try:
                    client.destroy_weights_update_group(self.stale)
                except RolloutError:
                    pass
            self.stale = None
        self.generation += 1
        name, port = f"{self.base_name}_{self.generation}", free_port()
        world, timeout = self.world_size, timedelta(seconds=self.timeout_s)
        made = {}

        def make():
            store = group_store(self.master_address, port, world, name, self.device, timeout)
            if self.backend == "nccl":
                opts = dist.ProcessGroupNCCL.Options()
                opts._timeout = timeout
                pg = dist.ProcessGroupNCCL(store, 0, world, opts)
            else:
                pg = dist.ProcessGroupGloo(store, 0, world, timeout)
            pg._set_sequence_number_for_group()  # the engines' ranks wait for rank 0's number
            made["pg"] = pg

        local = Task(make, f"rank 0 hosting {self.master_address}:{port}")
        joins = [Task(lambda c=c, o=o: c.init_weights_update_group(self.master_address, port, o, world, name,
                                                                   self.backend), f"{c.url} joining at rank {o}")
                 for (c, _), o in zip(self.engines, self.offsets())]
        wait_all([local, *joins], lambda: True, self.timeout_s,
                 f"creating weight group {name!r} (world {world}) at {self.master_address}:{port}")
        self.pg, self.name = made["pg"], name

    def push(self, buckets: Iterable[Bucket], version: int) -> dict:
        """Send every bucket to every engine; they serve them, tagged with version, afterwards.
        Returns {"bytes", "buckets"}."""
        if self.pg is None:
            self.connect()
        sent = {"bytes": 0, "buckets": 0}
        began = []
        try:
            for client, _ in self.engines:
                client.begin_weight_update()
                began.append(client)
            inflight = None
            for bucket in buckets:  # the generator gathers the next bucket while one is in flight
                if inflight is not None:
                    self._finish(*inflight)
                inflight = self._start(bucket, version)
                sent["bytes"] += bucket.nbytes
                sent["buckets"] += 1
            if inflight is not None:
                self._finish(*inflight)
            for client in began:
                client.end_weight_update()
        except BaseException:
            self.stale, self.pg = self.name, None  # out of step with the engines now
            for client in began:
                try:
                    client.end_weight_update()
                except RolloutError:
                    pass
            raise
        return sent

    def _start(self, bucket: Bucket, version: int):
        names, dtypes = bucket.names, bucket.dtype_names()
        calls = [Task(lambda c=c: c.update_weights_from_distributed(
                    names, dtypes, bucket.shapes, self.name, version, flush_cache=True,
                    load_format="flattened_bucket"), c.url)
                 for c, _ in self.engines]
        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = 0, 0
        work = self.pg.broadcast([bucket.flat], opts)
        return bucket, calls, work, version

    def _finish(self, bucket: Bucket, calls: list[Task], work, version: int) -> None:
        what = (f"weight push {version}: a bucket of {len(bucket.names)} tensor(s) ({bucket.names[0]} ...) to "
                f"{len(self.engines)} engine(s)")
        wait_all(calls, work.is_completed, self.timeout_s, what)
        try:
            work.wait()
        except RuntimeError as e:
            raise RolloutError(f"{what}: the broadcast failed: {e}") from e

    def close(self) -> None:
        """Leave the group on both sides (best effort on the engines: some may be gone)."""
        if self.pg is None:
            return
        self.pg = None
        for client, _ in self.engines:
            try:
                client.destroy_weights_update_group(self.name)
            except RolloutError as e:
                warnings.warn(f"weight group {self.name!r} may still exist on {client.url}: {e}")
