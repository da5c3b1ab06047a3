"""Stage one: long chain-of-thought distillation (SFT) on Megatron-Core.

Megatron DDP and distributed optimizer, AdamW with the paper's weight decay, cosine schedule
with linear warmup, global batch by gradient accumulation, loss per response token normalised
over the global batch (engine.py), gradient clipping, a checkpoint at every epoch end (and
every N steps), exact resume from the latest one. The shared parts are the Session's."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from megatron_ring.recipe import RecipeError
from megatron_ring.train import checkpoint, preemption
from megatron_ring.train.engine import Batch, forward_backward
from megatron_ring.train.session import Session
from megatron_ring.train.sft_data import Schedule, load_rows, rank_share, row_capacity

PLOT_KEYS = ["loss", "entropy", "grad_norm", "lr", "tokens_per_s", "step_time_s"]


def micro_batch(data, idx: torch.Tensor, packed: bool) -> Batch:
    """One micro-batch's tensors, read from the memory-mapped documents now."""
    t = data.batch(idx.tolist())
    return Batch(t["input_ids"], t["labels"], t["loss_mask"],
                 position_ids=t["position_ids"] if packed else None,
                 doc_ids=t["doc_ids"] if packed else None)


def run(recipe, run_dir: str | Path) -> dict:
    """Train (or resume) the distillation stage of a recipe; returns the last step's metrics."""
    t = recipe.train
    row_capacity(recipe)  # keys that do not fit together: said before the model is built
    session = Session(recipe, run_dir, "distill")
    rows = load_rows(recipe, session.run_dir, session.tokenizer)
    report = rows.report
    schedule = Schedule(len(rows), t.global_batch, t.epochs, t.seed)
    # A step-0 checkpoint is the untrained baseline for `select`, rebuilt from the recipe, never resumed.
    state = session.build_trainer(schedule.total_steps, resume_step0=False)

    def save(step):
        session.save(step, {"epoch": schedule.epoch_of(step), "epoch_end": schedule.is_epoch_end(step),
                            "rows": len(rows), "steps_per_epoch": schedule.steps_per_epoch},
                     with_optimizer=step > 0)  # step 0 has no optimizer state yet

    start = 0
    if state is not None:
        if state.get("rows") != len(rows):
            raise RecipeError(f"data.train: {session.resumed_from} was trained on {state.get('rows')} rows, the data "
                              f"now has {len(rows)}; resume with the same data or start a new run directory")
        start = state["step"]
    elif t.save_initial and checkpoint.latest(session.ckpt_root) is None:
        save(0)

    log = session.open_log(schedule.total_steps, start)
    log.message(f"distill: {report['documents']} documents in {len(rows)} rows of {report['row_length']} "
                f"(packing efficiency {report['packing_efficiency']:.1%}, {report['bad']} bad rows skipped; "
                f"{report['prepared']}); "
                f"{schedule.steps_per_epoch} steps/epoch x {t.epochs} epochs"
                + (f"; resumed from {session.resumed_from}" if session.resumed_from is not None else ""))
    record: dict = {}
    for step in range(start + 1, schedule.total_steps + 1):
        t0 = time.perf_counter()
        global_rows = schedule.rows_of_step(step)
        micro = [micro_batch(rows, idx, recipe.data.pack)
                 for idx in rank_share(global_rows, session.dp, session.dp_rank, t.micro_batch)]
        out = session.optimizer_step(lambda ddp: forward_backward(ddp, micro))
        elapsed = time.perf_counter() - t0
        real_tokens = rows.tokens(global_rows.tolist())
        record = {"step": step, "epoch": round(schedule.epoch_of(step), 4), "loss": out["loss"],
                  "entropy": out["entropy"], "grad_norm": out["grad_norm"],
                  "lr": session.optimizer.param_groups[0]["lr"], "tokens": out["tokens"], "tokens_total": real_tokens,
                  "tokens_per_s": round(real_tokens / elapsed, 1), "step_time_s": round(elapsed, 4)}
        log.log(record)
        due = schedule.is_epoch_end(step) or bool(t.save_every_steps and step % t.save_every_steps == 0)
        if preemption.save_or_stop(session.run_dir, step, schedule.total_steps, due, save, log, "distill"):
            break
    session.close(log, PLOT_KEYS)
    return record
