"""The smallest real training run: ling-tiny on synthetic sequences, Megatron DDP + distributed
optimizer, a checkpoint every few steps, resume from the last one. Used by `make demo` until
the distillation stage exists, and by the tests as the training smoke path."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_ring.models.builder import build_model
from megatron_ring.models.presets import get_preset
from megatron_ring.platform import distributed
from megatron_ring.train import checkpoint
from megatron_ring.train.engine import Batch, build_optimizer, build_scheduler, train_step, wrap_ddp


def synthetic_batch(step: int, rows: int, seq: int, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Arithmetic progressions mod a small range: learnable after two tokens, a function of step only."""
    g = torch.Generator().manual_seed(1000 + step)
    start = torch.randint(0, 64, (rows, 1), generator=g)
    stride = torch.randint(1, 8, (rows, 1), generator=g)
    tokens = 2 + (start + stride * torch.arange(seq + 1)) % min(64, vocab - 2)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def run(run_dir: str, steps: int, tp: int, ep: int, lr: float = 3e-3, global_rows: int = 8,
        micro_rows: int = 2, seq: int = 32, save_every: int = 0, preset: str = "ling-tiny") -> list[dict]:
    arch = get_preset(preset)
    layout = distributed.init(tp, ep)
    layout.validate(arch)
    model = build_model(arch, layout, aux_loss_coeff=1e-3, z_loss_coeff=1e-4)
    ddp = wrap_ddp(model)
    optimizer = build_optimizer(ddp, lr=lr)
    scheduler = build_scheduler(optimizer, lr=lr, total_steps=steps)
    root = Path(run_dir)
    ckpt_root = root / "checkpoints"
    start = 0
    last = checkpoint.latest(ckpt_root)
    if last is not None:
        state = checkpoint.load(last, model, optimizer)
        start = state["step"]
        scheduler.load_state_dict(state["scheduler"])
        if dist.get_rank() == 0:
            print(f"resumed from {last} at step {start}", flush=True)
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    assert global_rows % (dp * micro_rows) == 0, "global batch must split evenly over DP and micro-batches"
    rows = global_rows // dp
    history = []
    metrics = root / "metrics.jsonl"
    if dist.get_rank() == 0:
        root.mkdir(parents=True, exist_ok=True)
    for step in range(start + 1, steps + 1):
        t0 = time.perf_counter()
        ids, labels = synthetic_batch(step, global_rows, seq, arch.vocab_size)
        ids, labels = ids[dp_rank * rows:(dp_rank + 1) * rows], labels[dp_rank * rows:(dp_rank + 1) * rows]
        micro = [Batch(ids[i:i + micro_rows], labels[i:i + micro_rows], torch.ones_like(labels[i:i + micro_rows], dtype=torch.float))
                 for i in range(0, rows, micro_rows)]
        out = train_step(ddp, optimizer, scheduler, micro)
        record = {"stage": "demo", "step": step, "loss": out["loss"], "grad_norm": out["grad_norm"],
                  "lr": optimizer.param_groups[0]["lr"], "tokens": out["tokens"],
                  "step_time_s": round(time.perf_counter() - t0, 4)}
        history.append(record)
        if dist.get_rank() == 0:
            print(f"step {step:4d}/{steps}  loss {record['loss']:.4f}  grad_norm {record['grad_norm']:.3f}  "
                  f"{record['step_time_s']:.2f}s", flush=True)
            with metrics.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if save_every and (step % save_every == 0 or step == steps):
            checkpoint.save(ckpt_root, step, model, optimizer, {"scheduler": scheduler.state_dict()})
    distributed.shutdown()
    return history
