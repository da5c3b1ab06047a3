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


class TrainerOffload:
    """offload() / reload() around rollouts. Both are idempotent: offload when offloaded and
    reload when not offloaded do nothing, so callers can call them unconditionally."""

    def __init__(self, ddp, optimizer, reference=None):
        self.ddp, self.optimizer, self.reference = ddp, optimizer, reference
        self.device = next(ddp.module.parameters()).device
        self.offloaded = False
        self._host: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id(tensor) -> (tensor, host bytes)
        self._moved: list[torch.Tensor] = []  # one tensor per storage freed by the last offload

    def _grad_buffers(self):
        return [b for b in self.ddp.buffers + self.ddp.expert_parallel_buffers if b.grad_data is not None]

    def _torch_optimizers(self):
        for opt in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            inner = getattr(opt, "optimizer", None)
            if inner is not None and not getattr(opt, "is_stub_optimizer", False):
                yield inner

    def _movable(self) -> list[torch.Tensor]:
        """One tensor per device storage to copy out and free: optimizer state, optimizer params
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
        out, seen = [], set(keep)
        for t in candidates:
            if t.device != self.device or t.untyped_storage().nbytes() == 0:
                continue
            ptr = t.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                out.append(t)
        return out

    def offload(self) -> dict:
        if self.offloaded:
            return {"offload_bytes": 0, "offload_s": 0.0}
        t0, cuda = time.perf_counter(), self.device.type == "cuda"
        moved, host = self._movable(), {}
        for t in moved:
            nbytes = t.untyped_storage().nbytes()
            _, buf = self._host.get(id(t), (None, None))
            if buf is None or buf.numel() != nbytes:  # host copies are allocated once and reused
                buf = torch.empty(nbytes, dtype=torch.uint8, device="cpu", pin_memory=cuda)
            buf.copy_(_storage_bytes(t), non_blocking=cuda)
            host[id(t)] = (t, buf)
        freed = sum(t.untyped_storage().nbytes() for t in moved)
        freed += sum(b.grad_data.untyped_storage().nbytes() for b in self._grad_buffers())
        if cuda:
            torch.cuda.synchronize()  # the copies are done before their sources are freed
        for t in moved:
            t.untyped_storage().resize_(0)
        self.ddp.offload_grad_buffers(synchronize=False, empty_cache=False)
        if cuda:
            torch.cuda.empty_cache()
        self._host, self._moved, self.offloaded = host, moved, True
        return {"offload_bytes": freed, "offload_s": time.perf_counter() - t0}

    def reload(self) -> dict:
        if not self.offloaded:
            return {"reload_s": 0.0}
        t0, cuda = time.perf_counter(), self.device.type == "cuda"
        for t in self._moved:
            buf = self._host[id(t)][1]
            t.untyped_storage().resize_(buf.numel())
            _storage_bytes(t).copy_(buf, non_blocking=cuda)
        self.ddp.restore_grad_buffers(synchronize=False)  # re-allocated and zeroed
        if cuda:
            torch.cuda.synchronize()
        self._moved, self.offloaded = [], False
        return {"reload_s": time.perf_counter() - t0}
