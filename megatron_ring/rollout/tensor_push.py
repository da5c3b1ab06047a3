"""The colocated push: every training GPU hands the engine TP rank on the same GPU its own copy of
each bucket by /update_weights_from_tensor, so no byte crosses a network.

Training rank `local_rank` of node `n` feeds engine `n * engines_per_node + local_rank // tp`,
as that engine's TP rank `local_rank % tp` (the fleet starts engine j of a node on GPUs
j*tp .. j*tp+tp-1, the same GPUs those training ranks use). Each rank serialises its bucket the
way SGLang's MultiprocessingSerializer does (ForkingPickler, base64): a CUDA tensor travels as a
CUDA IPC handle, a CPU tensor (sharing strategy "file_system") as a shared-memory file name, so
the engine maps the trainer's memory in both cases and the same path runs in the CPU tests. The
engine's TP rank 0 trainer rank gathers its engine's payloads (one per TP rank) and posts them;
every rank of the engine keeps its bucket alive until the answer is back.
"""

from __future__ import annotations

import base64
import io
import os
from multiprocessing.reduction import ForkingPickler
from typing import Iterable

import torch
import torch.distributed as dist
import torch.multiprocessing

from megatron_ring.platform import distributed
from megatron_ring.rollout.base import RolloutError
from megatron_ring.rollout.sglang_client import SGLangClient
from megatron_ring.rollout.weight_buckets import Bucket


def serialize(bucket: Bucket) -> str:
    """One TP rank's payload of a "flattened_bucket" update (MultiprocessingSerializer's format)."""
    if bucket.flat.is_cuda:
        try:  # SGLang's receiving side expects its own reduction of CUDA tensors (device by UUID)
            from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
            monkey_patch_torch_reductions()
        except ImportError:
            pass
    buf = io.BytesIO()
    ForkingPickler(buf).dump({"flattened_tensor": bucket.flat, "metadata": bucket.metadata()})
    return base64.b64encode(buf.getvalue()).decode()


class TensorPush:
    """Collective on every trainer rank: each one's part of the colocated push."""

    def __init__(self, engine_urls: list[str], tp: int, engines_per_node: int, timeout_s: float = 600.0):
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        if not torch.cuda.is_available():
            torch.multiprocessing.set_sharing_strategy("file_system")  # a name any process can open
        self.tp, self.timeout_s = tp, timeout_s
        engine_of = [(r // local) * engines_per_node + (r % local) // tp for r in range(world)]
        engine_of = [e if e < len(engine_urls) and (r % local) // tp < engines_per_node else None
                     for r, e in enumerate(engine_of)]
        self.engine = engine_of[rank]
        self.client = SGLangClient(engine_urls[self.engine], timeout_s=timeout_s) if self.engine is not None else None
        # One gloo group per engine (its TP ranks' trainer ranks); new_group is collective on every rank.
        self.group, self.leader = None, None
        for e in range(len(engine_urls)):
            members = [r for r in range(world) if engine_of[r] == e]
            if len(members) != tp:
                raise RolloutError(f"engine {e} ({engine_urls[e]}) has {len(members)} training ranks on its GPUs, "
                                   f"expected rollout.engine_tp={tp}")
            group = dist.new_group(members, backend="gloo") if world > 1 else None
            if e == self.engine:
                self.group, self.leader = group, members[0]
        self.is_leader = self.engine is not None and rank == self.leader

    def _gather(self, payload: str) -> list[str] | None:
        if self.group is None:
            return [payload]
        out = [None] * self.tp if self.is_leader else None
        dist.gather_object(payload, out, dst=self.leader, group=self.group)
        return out

    def _share(self, outcome: str) -> str:
        """The leader's outcome ('' or an error) to every rank of its engine."""
        if self.group is None:
            return outcome
        box = [outcome]
        dist.broadcast_object_list(box, src=self.leader, group=self.group)
        return box[0]

    def push(self, buckets: Iterable[Bucket], version: int) -> dict:
        """Every rank walks `buckets` to the end (the gathers behind it are collective); an error
        of any engine reaches every rank once the walk is over."""
        error, sent = "", {"bytes": 0, "buckets": 0}
        if self.is_leader:
            try:
                self.client.begin_weight_update()
            except RolloutError as e:
                error = str(e)
        for bucket in buckets:
            if self.engine is None:
                continue
            sent["bytes"] += bucket.nbytes
            sent["buckets"] += 1
            error = self._share(error)
            if error:
                continue
            payloads = self._gather(serialize(bucket))
            if self.is_leader:
                try:
                    self.client.update_weights_from_tensor(payloads, version)
                except RolloutError as e:
                    error = str(e)
            error = self._share(error)  # the bucket may be freed once this returns
        if self.is_leader:
            try:
                self.client.end_weight_update()
            except RolloutError as e:
                error = error or str(e)
        failed = [e for e in distributed.everyone(error) if e]
        if failed:
            raise RolloutError(f"colocated weight push {version} failed: {failed[0]}")
        return sent
