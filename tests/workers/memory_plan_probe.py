"""One lone CPU process for tests/test_memory_plan.py and tools/bench_memory_plan.py (the CPU
layer patches torch for the whole process, so not pytest's own). Prints one JSON object.

    state DTYPE            bytes of params, grad buffers, optimizer state of ling-tiny (after a step)
    peak T [T ...]         the profiler's activation peak of one SFT forward+backward at each T
    recompute GRAN MODS N  loss and gradients with and without that recompute setting
"""

import json
import sys
from types import SimpleNamespace

import torch

from megatron_ring.launch import memory_measure
from megatron_ring.models.presets import get_preset


def main(argv):
    arch = get_preset("ling-tiny")
    what = argv[0]
    if what == "state":
        dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[argv[1]]
        _, model, ddp, opt = memory_measure.trainer(arch, dtype)
        memory_measure.sft_step(ddp, 64, arch.vocab_size)
        opt.step()
        out = memory_measure.state_bytes(model, ddp, opt)
    elif what == "peak":
        _, _, ddp, _ = memory_measure.trainer(arch)
        out = {t: memory_measure.activation_peak(ddp, int(t), arch.vocab_size) for t in argv[1:]}
    elif what == "recompute":
        rc = SimpleNamespace(granularity=argv[1], modules=argv[2].split(","), num_layers=int(argv[3]))
        runs = []
        for setting in (None, rc):
            torch.manual_seed(5)
            from megatron.core import parallel_state
            if parallel_state.model_parallel_is_initialized():
                parallel_state.destroy_model_parallel()
            _, model, ddp, _ = memory_measure.trainer(arch, recompute=setting)
            metrics = memory_measure.sft_step(ddp, 256, arch.vocab_size)
            runs.append((metrics["loss"], {n: p.main_grad.clone() for n, p in model.named_parameters()}))
        (l0, g0), (l1, g1) = runs
        out = {"loss": [l0, l1], "max_grad_diff": max((g0[n] - g1[n]).abs().max().item() for n in g0),
               "max_grad": max(g.abs().max().item() for g in g0.values()), "n": len(g0)}
    else:
        raise SystemExit(f"unknown probe {what!r}")
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
