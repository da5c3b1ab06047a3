"""Stage one: long chain-of-thought distillation (SFT) on Megatron-Core.

Megatron DDP and distributed optimizer, AdamW with the paper's weight decay, cosine schedule
with linear warmup, global batch by gradient accumulation, loss per response token normalised
over the global batch (engine.py), gradient clipping, a checkpoint at every epoch end (and
every N steps), exact resume from the latest one."""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

import torch
from megatron.core import parallel_state as ps

from megatron_ring.data.packing import document_attention_mask
from megatron_ring.models.spec import te_by_default
from megatron_ring.platform import distributed
from megatron_ring.recipe import RecipeError
from megatron_ring.recipe.schema import check_layout
from megatron_ring.train import checkpoint, preemption, stage_setup
from megatron_ring.train.engine import Batch, build_optimizer, build_scheduler, train_step, wrap_ddp
from megatron_ring.train.run_log import RunLog
from megatron_ring.train.sft_data import Schedule, load_rows, rank_share

PLOT_KEYS = ["loss", "entropy", "grad_norm", "lr", "tokens_per_s", "step_time_s"]


def micro_batch(rows, idx: torch.Tensor, packed: bool) -> Batch:
    doc_ids = rows.doc_ids[idx]
    return Batch(rows.input_ids[idx], rows.labels[idx], rows.loss_mask[idx],
                 position_ids=rows.position_ids[idx] if packed else None,
                 attention_mask=document_attention_mask(doc_ids) if packed else None)


def run(recipe, run_dir: str | Path) -> dict:
    """Train (or resume) the distillation stage of a recipe; returns the last step's metrics."""
    run_dir = Path(run_dir)
    t = recipe.train
    layout = check_layout(recipe, world_size=distributed.launched_world_size())
    if recipe.data.pack and te_by_default():
        raise RecipeError("data.pack: packed rows need a per-document attention mask, which the "
                          "transformer-engine attention path does not take yet; set data.pack=false")
    distributed.init(layout.tp, layout.ep, seed=t.seed)
    stage_setup.save_recipe(recipe, run_dir)
    stage_setup.ensure_demo_data(recipe, run_dir)
    arch = recipe.model.arch()
    tokenizer = stage_setup.load_tokenizer(recipe, run_dir, arch)
    rows, report = load_rows(recipe, run_dir, tokenizer)
    schedule = Schedule(len(rows), t.global_batch, t.epochs, t.seed)

    ckpt_root = run_dir / "checkpoints"
    last = checkpoint.latest(ckpt_root)
    if last is not None and checkpoint.saved_step(last) == 0:
        last = None  # the initial weights are rebuilt from the recipe
    model = stage_setup.build_initial_model(recipe, layout, run_dir, load_init=last is None)
    ddp = wrap_ddp(model)
    optimizer = build_optimizer(ddp, lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay, clip_grad=t.clip_grad,
                                adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2)
    warmup = math.ceil(t.warmup_frac * schedule.total_steps)
    scheduler = build_scheduler(optimizer, lr=t.lr, min_lr=t.min_lr, total_steps=schedule.total_steps,
                                warmup_steps=warmup, style=t.lr_schedule, weight_decay=t.weight_decay)

    def save(step):
        # Step 0 has no optimizer state yet; it is the baseline for `select`, never resumed from.
        state = {"stage": "distill", "epoch": schedule.epoch_of(step), "epoch_end": schedule.is_epoch_end(step),
                 "rows": len(rows), "steps_per_epoch": schedule.steps_per_epoch, "scheduler": scheduler.state_dict(),
                 "hf_source": model.hf_source}
        checkpoint.save(ckpt_root, step, model, optimizer if step else None, state)

    start = 0
    if last is not None:
        state = checkpoint.load(last, model, optimizer)
        if state.get("rows") != len(rows):
            raise RecipeError(f"data.train: {last} was trained on {state.get('rows')} rows, the data now has "
                              f"{len(rows)}; resume with the same data or start a new run directory")
        start = state["step"]
        scheduler.load_state_dict(state["scheduler"])
    elif t.save_initial and checkpoint.latest(ckpt_root) is None:
        save(0)

    log = RunLog(run_dir, "distill", total_steps=schedule.total_steps, start_step=start,
                 wandb_mode=recipe.logging.wandb, wandb_project=recipe.logging.wandb_project,
                 config=dataclasses.asdict(recipe), progress=recipe.logging.progress,
                 active=stage_setup.is_logging_rank())
    log.message(f"distill: {report['documents']} documents in {len(rows)} rows of {recipe.data.seq_length} "
                f"(packing efficiency {report['packing_efficiency']:.1%}, {report['bad']} bad rows skipped); "
                f"{schedule.steps_per_epoch} steps/epoch x {t.epochs} epochs"
                + (f"; resumed from {last}" if last is not None else ""))
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    record: dict = {}
    for step in range(start + 1, schedule.total_steps + 1):
        t0 = time.perf_counter()
        global_rows = schedule.rows_of_step(step)
        micro = [micro_batch(rows, idx, recipe.data.pack) for idx in rank_share(global_rows, dp, dp_rank, t.micro_batch)]
        out = train_step(ddp, optimizer, scheduler, micro)
        elapsed = time.perf_counter() - t0
        real_tokens = int((rows.doc_ids[global_rows] >= 0).sum())
        record = {"step": step, "epoch": round(schedule.epoch_of(step), 4), "loss": out["loss"],
                  "entropy": out["entropy"], "grad_norm": out["grad_norm"], "lr": optimizer.param_groups[0]["lr"],
                  "tokens": out["tokens"], "tokens_total": real_tokens,
                  "tokens_per_s": round(real_tokens / elapsed, 1), "step_time_s": round(elapsed, 4)}
        log.log(record)
        due = schedule.is_epoch_end(step) or bool(t.save_every_steps and step % t.save_every_steps == 0)
        if preemption.save_or_stop(run_dir, step, schedule.total_steps, due, save, log, "distill"):
            break
    plot = log.close(PLOT_KEYS)
    if plot is not None:
        log.message(f"distill: metrics in {run_dir / 'metrics.jsonl'}, plot {plot}")
    distributed.shutdown()
    return record

