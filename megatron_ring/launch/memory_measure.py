"""What one lone CPU process really allocates, to hold the memory plan (launch/memory_plan.py)
to: the bytes of the storages behind the trainer's params, gradient buffers and optimizer state,
and the activation peak of one SFT forward+backward through Megatron's schedule.

The peak is read from torch's profiler (profile_memory=True): every CPU allocation and free
during the step is an event carrying the allocator's running total since profiling began, so the
largest total is the most the step held at once on top of what existed before it (weights,
gradient buffers, optimizer: allocated earlier, not counted). A warm-up step first makes lazy
allocations (RoPE tables, Adam state) happen outside the measured step.

Run only in a process of its own: platform.distributed.init patches torch for the whole process."""

from __future__ import annotations

import torch


def _storage_bytes(tensors) -> int:
    seen = {}
    for t in tensors:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
    return sum(seen.values())


def trainer(arch, dtype=torch.float32, recompute=None):
    """ling-tiny (or any arch) as Session builds it, in this one process: model, DDP, optimizer."""
    from megatron_ring.models.builder import build_model
    from megatron_ring.platform import distributed
    from megatron_ring.train.engine import build_optimizer, wrap_ddp

    layout = distributed.init(1, 1)
    model = build_model(arch, layout, params_dtype=dtype, recompute=recompute, aux_loss_coeff=1e-3,
                        z_loss_coeff=1e-4)
    ddp = wrap_ddp(model)
    return layout, model, ddp, build_optimizer(ddp, lr=1e-3)


def state_bytes(model, ddp, optimizer) -> dict[str, int]:
    """Bytes of the storages behind params, gradient buffers and optimizer state (Adam's
    tensors and fp32 main params; the per-parameter `step` scalars are left out). Call after one
    optimizer step: Adam creates its state then."""
    grads = [p.main_grad for p in model.parameters()]
    opt = []
    for o in getattr(optimizer, "chained_optimizers", [optimizer]):
        opt += [v for st in o.optimizer.state.values() for k, v in st.items() if torch.is_tensor(v) and k != "step"]
        opt += [p for g in getattr(o, "shard_fp32_from_float16_groups", []) for p in g]
    return {"params": _storage_bytes(model.parameters()), "grads": _storage_bytes(grads),
            "optimizer": _storage_bytes(opt)}


def sft_step(ddp, tokens: int, vocab: int, seed: int = 0) -> dict:
    """One forward+backward of a [1, tokens] row through train.engine.forward_backward."""
    from megatron_ring.train.engine import Batch, forward_backward

    ids = torch.randint(2, vocab, (1, tokens + 1), generator=torch.Generator().manual_seed(seed))
    ddp.zero_grad_buffer()
    return forward_backward(ddp, [Batch(ids[:, :-1], ids[:, 1:], torch.ones(1, tokens))])


def activation_peak(ddp, tokens: int, vocab: int) -> int:
    """Bytes: the most one forward+backward allocates on top of what exists before it."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    sft_step(ddp, tokens, vocab)  # warm-up: lazy allocations happen here
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        sft_step(ddp, tokens, vocab, seed=1)
    peak, stack = 0, list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        node = stack.pop()
        if node.tag == _EventType.Allocation and node.extra_fields.device.type == "cpu":
            peak = max(peak, node.extra_fields.total_allocated)
        stack.extend(node.children)
    return peak
