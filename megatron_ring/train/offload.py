"""Colocated training and rollout: while the SGLang engines roll out on the training GPUs, the
trainer gives back what only training needs and takes it again before the next update.

What moves off the device: Megatron DDP's gradient buffers, the optimizer state (Adam's exp_avg /
exp_avg_sq and, with bf16 weights, the distributed optimizer's fp32 main params) and the frozen
reference model. The policy's own weights stay: the weight push to the engines reads them.

Means used:
- Gradient buffers: Megatron-Core's own DistributedDataParallel.offload_grad_buffers /
  restore_grad_buffers (storage().resize_(0), then re-allocate and zero: gradients are zeroed
  before every step anyway, so nothing is copied). param.main_grad and the buckets' views stay
  valid because the storage object is kept.
- Optimizer state, main params, reference: Megatron-Core 0.16.1's MegatronOptimizer.offload_to_cpu
  does not fit. It rebinds `p.data` of every optimizer param to a CPU copy, and with fp32 weights
  those params are views into the DDP param buffer, i.e. the policy weights (a wasted copy that
  also cuts the view's link to the buffer); it copies with blocking, unpinned .cpu(), and it only
  moves `is_cuda` tensors (nothing on CPU). Instead every such storage keeps a host copy (pinned
  on CUDA, non_blocking copies, one synchronize) and its device storage is freed with
  `untyped_storage().resize_(0)`; reload resizes it back and copies the bytes in. The tensor
  objects (optimizer state entries, main params and their `model_param.main_param` handles,
  reference parameters) are never replaced, so every view and dict key stays valid.

Storages that hold the policy's weights are never touched. Optimizer state is collected at each
offload: Adam creates it lazily on the first step, and state that appears later is picked up then.
"""

from __future__ import annotations

import time

import torch


def _storage_bytes(t: torch.Tensor) -> torch.Tensor:
    """A uint8 tensor over the whole storage of t (whatever t's offset, shape and dtype)."""
    return torch.empty(0, dtype=torch.uint8, device=t.device).set_(t.untyped_storage())


class HostCopies:
    """Device storages copied into host memory and freed in place, later restored into the same
    storage objects, so every tensor, view and dict key that refers to them stays valid. Host
    buffers are pinned on CUDA, allocated once and reused."""

    def __init__(self):
        self._host: dict[int, torch.Tensor] = {}  # id(tensor) -> host bytes of its storage
        self._moved: list[torch.Tensor] = []  # one tensor per storage freed by the last move_out

    def move_out(self, tensors) -> int:
        """Copy out and free each distinct, non-empty storage; returns the bytes freed."""
        moved, seen = [], set()
        for t in tensors:
            ptr = t.untyped_storage().data_ptr()
            if t.untyped_storage().nbytes() and ptr not in seen:
                seen.add(ptr)
                moved.append(t)
        cuda = any(t.device.type == "cuda" for t in moved)
        host = {}
        for t in moved:
            nbytes = t.untyped_storage().nbytes()
            buf = self._host.get(id(t))
            if buf is None or buf.numel() != nbytes:
                buf = torch.empty(nbytes, dtype=torch.uint8, device="cpu", pin_memory=cuda)
            buf.copy_(_storage_bytes(t), non_blocking=cuda)
            host[id(t)] = buf
        if cuda:
            torch.cuda.synchronize()  # the copies are done before their sources are freed
        for t in moved:
            t.untyped_storage().resize_(0)
        self._host.update(host)
        self._moved += moved
        return sum(buf.numel() for buf in host.values())

    def move_back(self) -> None:
        """Re-allocate every freed storage and copy its bytes back (synchronised)."""
        cuda = any(t.device.type == "cuda" for t in self._moved)
        for t in self._moved:
            buf = self._host[id(t)]
            t.untyped_storage().resize_(buf.numel())
            _storage_bytes(t).copy_(buf, non_blocking=cuda)
        if cuda:
            torch.cuda.synchronize()
        self._moved = []


class TrainerOffload:
    """offload() / reload() around rollouts. Both are idempotent: offload when offloaded and
    reload when not offloaded do nothing, so callers can call them unconditionally."""

    def __init__(self, ddp, optimizer, reference=None):
        self.ddp, self.optimizer, self.reference = ddp, optimizer, reference
        self.device = next(ddp.module.parameters()).device
        self.offloaded = False
        self.copies = HostCopies()

    def _grad_buffers(self):
        return [b for b in self.ddp.buffers + self.ddp.expert_parallel_buffers if b.grad_data is not None]

    def _torch_optimizers(self):
        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            inner = getattr(opt, "optimizer", None)
            if inner is not None and not getattr(opt, "is_stub_optimizer", False):
                yield inner

    def _movable(self) -> list[torch.Tensor]:
        """Tensors whose device storages to copy out and free: optimizer state, optimizer params
        that are not the policy's weights (fp32 main params), reference parameters and buffers."""
        keep = {p.untyped_storage().data_ptr() for p in self.ddp.module.parameters()}
        keep |= {b.grad_data.untyped_storage().data_ptr() for b in self._grad_buffers()}
        candidates = []
        for opt in self._torch_optimizers():
            for state in opt.state.values():
                candidates += [v for v in state.values() if isinstance(v, torch.Tensor)]
            for group in opt.param_groups:
                candidates += [p for p in group["params"] if isinstance(p, torch.Tensor)]
        if self.reference is not None:
            candidates += [*self.reference.parameters(), *self.reference.buffers()]
        return [t for t in candidates if t.device == self.device and t.untyped_storage().data_ptr() not in keep]

    def offload(self) -> dict:
        if self.offloaded:
            return {"offload_bytes": 0, "offload_s": 0.0}
        t0, cuda = time.perf_counter(), self.device.type == "cuda"
        freed = self.copies.move_out(self._movable())
        freed += sum(b.grad_data.untyped_storage().nbytes() for b in self._grad_buffers())
        self.ddp.offload_grad_buffers(synchronize=False, empty_cache=False)
        if cuda:
            torch.cuda.empty_cache()
        self.offloaded = True
        return {"offload_bytes": freed, "offload_s": time.perf_counter() - t0}

    def reload(self) -> dict:
        if not self.offloaded:
            return {"reload_s": 0.0}
        t0, cuda = time.perf_counter(), self.device.type == "cuda"
        self.copies.move_back()
        self.ddp.restore_grad_buffers(synchronize=False)  # re-allocated and zeroed
        if cuda:
            torch.cuda.synchronize()
        self.offloaded = False
        return {"reload_s": time.perf_counter() - t0}
