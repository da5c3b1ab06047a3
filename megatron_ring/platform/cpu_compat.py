"""Let the pinned Megatron-Core run on a machine without CUDA (tests, CI, the CPU demo).

Megatron-Core assumes CUDA in a handful of places (current_device, the CUDA RNG tracker, streams
and events in the MoE dispatcher, literal device='cuda' tensors and .cuda() calls in the
optimizer, 'torch.cuda.FloatTensor' type checks, gloo-incompatible all-to-all split sizes).
This module answers those assumptions with CPU equivalents. It is applied only when CUDA is
unavailable, never on a GPU machine, and refuses any megatron-core other than the pinned one,
because every patch below names a private detail of that version.

One gap is not about CUDA: without transformer-engine Megatron-Core 0.16.1 leaves a name its MoE
router reads unbound (patch_missing_transformer_engine). apply() fills it on every machine
without transformer-engine, GPU ones included, before its CUDA check.

Megatron is imported inside the functions below, not here: platform.distributed imports this
module in the launcher, which needs no Megatron (seconds to import), and the version check
must run before any private Megatron module is imported.
"""

from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode

from megatron_ring.versions import MEGATRON_CORE, version_of

PINNED_MEGATRON_CORE = version_of(MEGATRON_CORE)

_applied = False


class _NoopEvent:
    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        return None

    def synchronize(self):
        return None

    def wait(self, *args, **kwargs):
        return None

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


class _NoopStream:
    def __init__(self, *args, **kwargs):
        pass

    def wait_stream(self, other):
        return None

    def wait_event(self, event):
        return None

    def record_event(self, event=None):
        return event if event is not None else _NoopEvent()

    def synchronize(self):
        return None

    def query(self):
        return True

    def __eq__(self, other):
        return isinstance(other, _NoopStream)

    def __hash__(self):
        return 0


_NOOP_STREAM = _NoopStream()


def _is_cuda_device(device) -> bool:
    if isinstance(device, int) and not isinstance(device, bool):
        return True
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


_CPU = torch.device("cpu")
_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
}


class _CudaToCpuMode(TorchFunctionMode):
    """Maps CUDA device requests to the CPU for every torch call made while it is active.

    Megatron's optimizer and DDP create tensors with device='cuda', call .cuda(), and check
    param.type() == 'torch.cuda.FloatTensor'; this mode keeps those lines meaningful on CPU.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs = dict(kwargs, device=_CPU)
        if func is torch.Tensor.cuda:
            return args[0]
        if func in (torch.Tensor.record_stream, torch.Tensor.pin_memory):
            return args[0] if func is torch.Tensor.pin_memory else None
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = _TYPE_NAMES.get(args[0].dtype)
            if name is not None:
                return name
        if func is torch.Tensor.to and args and len(args) > 1 and _is_cuda_device(args[1]):
            args = (args[0], _CPU) + tuple(args[2:])
        return func(*args, **kwargs)


def _gloo_split_sizes(tensor, as_numpy: bool = False, record_stream: bool = False):
    """gloo's all_to_all_single takes split sizes as Python lists, not CPU tensors."""
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.tolist()
    return tensor


def _check_version():
    from megatron.core import package_info  # deferred: see the module docstring

    if package_info.__version__ != PINNED_MEGATRON_CORE:
        raise RuntimeError(
            f"megatron_ring's CPU compatibility layer is written for megatron-core=="
            f"{PINNED_MEGATRON_CORE}, but megatron-core {package_info.__version__} is installed. "
            f"Install the pinned version (make install) or run on a CUDA machine."
        )


def _patch_torch_cuda():
    cuda = torch.cuda
    cuda.current_device = lambda: _CPU
    cuda.device_count = lambda: 1
    cuda.set_device = lambda *a, **k: None
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda: None
    cuda.Stream = _NoopStream
    cuda.Event = _NoopEvent
    cuda.current_stream = lambda *a, **k: _NOOP_STREAM
    cuda.default_stream = lambda *a, **k: _NOOP_STREAM
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    # Megatron's RNG tracker seeds "CUDA" states by manual_seed + get_rng_state: seed the CPU.
    # (torch.manual_seed itself calls cuda.manual_seed_all, so seed the generator directly.)
    cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    cuda.manual_seed_all = lambda seed: None
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0


def _patch_megatron():
    from megatron.core.tensor_parallel import random as mrandom  # deferred: see the module docstring
    from megatron.core.transformer.moe import moe_utils, token_dispatcher  # deferred: as above

    # The RNG tracker forks "CUDA" RNG states for tensor-parallel regions: use the CPU generator.
    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)

    # token_dispatcher imported the function by name, so patch both places.
    moe_utils.maybe_move_tensor_to_cpu = _gloo_split_sizes
    token_dispatcher.maybe_move_tensor_to_cpu = _gloo_split_sizes

    # Without apex/TE the distributed optimizer wraps torch Adam, whose per-parameter state has a
    # 'step' tensor. Its checkpoint loaders skip 'step' in the loaded tensors (load_state_dict
    # restores it from the param groups) but then copy every key of the live state: KeyError.
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    @torch.no_grad()  # fp32 main params are views of the (leaf) model params
    def _set_states(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        main_param = self.optimizer.param_groups[group_index]["params"][group_order]
        live = {"param": main_param, **self.optimizer.state[main_param]}
        for key, value in tensors.items():
            if key in ("padding", "step"):  # dp_reshardable's bookkeeping; 'step' came from the param groups
                continue
            live[key].copy_(value)

    DistributedOptimizer._set_main_param_and_optimizer_states = _set_states

    # Recomputed attention (train.recompute core_attn or full) builds its causal mask with a
    # literal device="cuda" inside the backward pass, on autograd's thread, where the CUDA
    # stand-in mode above is not active; fused_softmax imported the function by name.
    from megatron.core.fusions import fused_softmax

    fused_softmax.get_default_causal_mask = lambda sq: torch.ones(sq, sq).triu(diagonal=1).bool()


def patch_missing_transformer_engine() -> None:
    """megatron.core.transformer.moe.moe_utils binds te_general_gemm only when transformer-engine
    imports, and the router reads it unconditionally; None is what the router checks for.
    Leaves an installed transformer-engine's binding alone (and so any other Megatron's)."""
    from megatron.core.transformer.moe import moe_utils  # deferred: see the module docstring

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def apply() -> bool:
    """Install the CPU layer if CUDA is absent (and, on any machine, the stand-in for a missing
    transformer-engine). Returns True when the CPU layer is active."""
    global _applied
    patch_missing_transformer_engine()
    if _applied:
        return True
    if torch.cuda.is_available():
        return False
    _check_version()
    _patch_torch_cuda()
    _patch_megatron()
    _CudaToCpuMode().__enter__()
    _applied = True
    return True
