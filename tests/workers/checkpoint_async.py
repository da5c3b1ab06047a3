"""Worker (torchrun, 2 gloo processes): ling-tiny with Megatron DDP and the distributed
optimizer, checkpoints as the stages save them (train/checkpoint.py). Modes:

- roundtrip: two steps, then the same state saved synchronously and asynchronously (the next
  step running while the writer writes); both load back exactly (weights and every optimizer
  tensor) into fresh models; then the layout change: the dp_reshardable checkpoint is refused at
  TP2/EP2 with both layouts named, loads model-only there, and after reshard_in_place loads
  with its optimizer at TP2/EP2, whose own save loads back at TP1/EP2 exactly.
- train: steps 1..3, a synchronous save after step 1 and an asynchronous one after step 2, the
  state after step 1 kept for `resume`. With CKPT_TEST_PAUSE_STEP=N the forked writer of step N
  announces itself in RUN/paused and stops mid-write (the test kills the job then).
- resume: the run resumes from `latest`, which must hold the state kept after step 1, and
  trains on, saving asynchronously, until that save is published.
Rank 0 prints RESULT <json>."""

import argparse
import functools
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_ring.models.builder import build_model
from megatron_ring.models.hf_config import CheckpointError
from megatron_ring.models.presets import get_preset
from megatron_ring.platform import distributed, parent_death
from megatron_ring.train import checkpoint
from megatron_ring.train.engine import Batch, build_optimizer, forward_backward, wrap_ddp

ARCH = get_preset("ling-tiny")
if __name__ in ("__main__", "__mp_main__"):  # a torchrun worker, or a child a worker spawned
    parent_death.tie_to_job()  # dies with torchrun; its forked writers and spawned helpers with it


def pause_writer_of(step: int, marker: Path) -> None:
    """Make the writer of checkpoint `step` stop mid-write (after its first item), forever."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    real = filesystem_async._write_item

    @functools.wraps(real)  # Megatron reads its signature
    def slow(*args, **kwargs):
        stream = next(a for a in args if hasattr(a, "name") and hasattr(a, "write"))
        out = real(*args, **kwargs)
        if f"iter_{step:07d}.tmp" in str(stream.name):
            stream.flush()
            marker.write_text(str(os.getpid()))
            time.sleep(3600)
        return out

    filesystem_async._write_item = slow  # the forked writers inherit it


def trainer(tp: int, ep: int):
    """A fresh model, DDP and optimizer at a layout (the same initial weights every time)."""
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    layout = distributed.init(tp, ep, seed=5)
    model = build_model(ARCH, layout.validate(ARCH))
    model.__dict__["ddp"] = wrap_ddp(model)  # not a submodule: DDP holds the model
    return model, build_optimizer(model.ddp, lr=1e-2, weight_decay=0.1)


def step(model, optimizer, n: int) -> float:
    g = torch.Generator().manual_seed(100 + n)
    ids = torch.randint(2, ARCH.vocab_size, (4, 17), generator=g)
    dp, r = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    mine = slice(r * 4 // dp, (r + 1) * 4 // dp)
    micro = [Batch(ids[mine, :-1], ids[mine, 1:], torch.ones_like(ids[mine, 1:], dtype=torch.float))]
    model.ddp.zero_grad_buffer()
    optimizer.zero_grad()
    out = forward_backward(model.ddp, micro)
    optimizer.step()
    return out["loss"]


def state_of(model, optimizer) -> list[torch.Tensor]:
    """Every weight and every optimizer tensor of this rank, in a fixed order."""
    out = [p.detach().clone() for _, p in sorted(model.named_parameters())]
    for chained in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = chained.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                out.append(p.detach().clone())
                out += [torch.as_tensor(inner.state[p][k]).clone() for k in ("exp_avg", "exp_avg_sq", "step")]
    return out


def same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    """Bit-identical on every rank."""
    mine = len(a) == len(b) and all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))
    flag = torch.tensor([int(mine)])
    dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def roundtrip(root: Path) -> dict:
    out = {}
    model, optimizer = trainer(1, 2)
    for n in (1, 2):
        step(model, optimizer, n)
    before = state_of(model, optimizer)
    checkpoint.save(root / "sync", 2, model, optimizer, {"note": "sync"})
    t0 = time.perf_counter()
    checkpoint.save(root / "async", 2, model, optimizer, {"note": "async"}, asynchronous=True)
    out["async_schedule_s"] = time.perf_counter() - t0
    step(model, optimizer, 3)  # runs while the writer writes: the checkpoint keeps step 2
    out["published_before_finalize"] = (root / "async" / "latest").exists()
    out["moved_on"] = not same(before, state_of(model, optimizer))
    checkpoint.finalize_saves(blocking=True)
    out["async_latest"] = (root / "async" / "latest").read_text().strip()
    for kind in ("sync", "async"):
        m, o = trainer(1, 2)
        state = checkpoint.load(checkpoint.latest(root / kind), m, o)
        out[f"{kind}_exact"] = same(before, state_of(m, o))
        out[f"{kind}_note"] = state["note"]
    out["layout"] = json.loads((root / "sync" / "iter_0000002" / checkpoint.LAYOUT).read_text())

    path = root / "sync" / "iter_0000002"
    m, o = trainer(2, 2)
    try:
        checkpoint.load(path, m, o)
        out["other_layout_error"] = ""
    except CheckpointError as e:
        out["other_layout_error"] = str(e)
    checkpoint.load(path, m)  # the weights alone load at any layout
    out["model_only_other_layout"] = True

    m, o = trainer(1, 2)
    checkpoint.reshard_in_place(path, m, o)
    out["resharded"] = json.loads((path / checkpoint.LAYOUT).read_text())["optimizer_sharding"]
    m, o = trainer(2, 2)
    checkpoint.load(path, m, o)
    checkpoint.save(root / "tp2", 2, m, o, {"note": "tp2"}, sharding=checkpoint.EXPORT)
    m, o = trainer(1, 2)
    checkpoint.load(root / "tp2" / "iter_0000002", m, o)
    out["tp2_back_exact"] = same(before, state_of(m, o))
    return out


def train(root: Path, keep: Path) -> dict:
    pause = int(os.environ.get("CKPT_TEST_PAUSE_STEP", "0"))
    if pause:
        pause_writer_of(pause, root.parent / "paused")
    model, optimizer = trainer(1, 2)
    for n in (1, 2, 3):
        step(model, optimizer, n)
        checkpoint.finalize_saves()
        if n == 1:
            torch.save(state_of(model, optimizer), keep / f"rank{dist.get_rank()}.pt")
            checkpoint.save(root, 1, model, optimizer, {"note": "one"})
        if n == 2:
            checkpoint.save(root, 2, model, optimizer, {"note": "two"}, asynchronous=True)
    checkpoint.finalize_saves(blocking=True)
    return {"latest": (root / "latest").read_text().strip()}


def resume(root: Path, keep: Path) -> dict:
    model, optimizer = trainer(1, 2)
    path = checkpoint.latest(root)
    state = checkpoint.load(path, model, optimizer)
    out = {"resumed_from": path.name, "note": state["note"],
           "exact": same(torch.load(keep / f"rank{dist.get_rank()}.pt"), state_of(model, optimizer))}
    step(model, optimizer, 2)
    checkpoint.save(root, 2, model, optimizer, {"note": "two again"}, asynchronous=True)
    checkpoint.finalize_saves(blocking=True)
    out["latest_after"] = (root / "latest").read_text().strip()
    out["left_over"] = sorted(p.name for p in root.iterdir())
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["roundtrip", "train", "resume"])
    p.add_argument("--root", required=True)
    a = p.parse_args()
    root = Path(a.root)
    keep = root.parent / "kept"
    keep.mkdir(parents=True, exist_ok=True)
    out = {"roundtrip": lambda: roundtrip(root), "train": lambda: train(root, keep),
           "resume": lambda: resume(root, keep)}[a.mode]()
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(out), flush=True)
    distributed.shutdown()


if __name__ == "__main__":
    main()
