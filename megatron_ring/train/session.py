"""The training session both stages share: the layout and process groups, the recipe saved in
the run directory, demo data, tokenizer, model (+ a frozen reference when asked), Megatron DDP,
optimizer and scheduler from the recipe's optimizer section, resume from the latest checkpoint,
save, the run log, one optimizer step, and the close. Distillation and RL differ only in what
they feed `optimizer_step` and what they save besides the weights."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable

from megatron.core import parallel_state as ps

from megatron_ring.platform import distributed
from megatron_ring.recipe.schema import check_layout
from megatron_ring.train import checkpoint, stage_setup
from megatron_ring.train.engine import build_optimizer, build_scheduler, wrap_ddp
from megatron_ring.train.run_log import RunLog


class Session:
    def __init__(self, recipe, run_dir: str | Path, stage: str):
        """Everything a stage needs before it reads its data: process groups, the run directory
        (recipe saved, demo data generated) and the tokenizer checked against the model."""
        self.recipe, self.run_dir, self.stage = recipe, Path(run_dir), stage
        self.layout = check_layout(recipe, world_size=distributed.launched_world_size())
        rollout = getattr(recipe, "rollout", None)  # RL: ranks wait on the control group while rank 0 samples
        distributed.init(self.layout.tp, self.layout.ep, seed=recipe.train.seed,
                         **({"control_timeout_s": rollout.control_timeout_s} if rollout else {}))
        stage_setup.save_recipe(recipe, self.run_dir)
        stage_setup.ensure_demo_data(recipe, self.run_dir)
        self.tokenizer = stage_setup.load_tokenizer(recipe, self.run_dir, recipe.model.arch())
        self.dp, self.dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        self.ckpt_root = self.run_dir / "checkpoints"
        self.resumed_from: Path | None = None

    def build_trainer(self, total_updates: int, *, reference: bool = False, resume_step0: bool = True) -> dict | None:
        """The model from model.init (or the latest checkpoint), a frozen copy of the initial
        model as reference when asked, DDP, optimizer and scheduler over `total_updates`
        optimizer steps. Returns the resumed checkpoint's trainer state, None on a fresh start.
        resume_step0=False: a step-0 checkpoint (the untrained baseline) is rebuilt, not resumed."""
        last = checkpoint.latest(self.ckpt_root)
        if last is not None and not resume_step0 and checkpoint.saved_step(last) == 0:
            last = None
        recipe, o = self.recipe, self.recipe.optimizer
        self.model = stage_setup.build_initial_model(recipe, self.layout, self.run_dir, load_init=last is None)
        self.reference = None
        if reference:
            self.reference = stage_setup.build_initial_model(recipe, self.layout, self.run_dir, load_init=True)
            self.reference.requires_grad_(False)
        self.ddp = wrap_ddp(self.model)
        self.optimizer = build_optimizer(self.ddp, lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
                                         clip_grad=o.clip_grad, adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2)
        self.scheduler = build_scheduler(self.optimizer, lr=o.lr, min_lr=o.min_lr, total_steps=total_updates,
                                         warmup_steps=math.ceil(o.warmup_frac * total_updates),
                                         style=o.lr_schedule, weight_decay=o.weight_decay)
        self.resumed_from = last
        if last is None:
            return None
        state = checkpoint.load(last, self.model, self.optimizer)
        self.scheduler.load_state_dict(state["scheduler"])
        return state

    def optimizer_step(self, forward_backward: Callable) -> dict:
        """One update: zero the gradients, forward_backward(ddp) -> metrics, optimizer and
        scheduler step. Adds the gradient norm to the metrics."""
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        out = forward_backward(self.ddp)
        _, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        out["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        return out

    def save(self, step: int, state: dict, with_optimizer: bool = True, files: dict[str, bytes] | None = None) -> None:
        """A checkpoint of the weights (and optimizer), the scheduler and the stage's own state
        (files: name -> bytes, rank 0's), in the background under train.async_save, with the
        recipe's retention (train.keep_last)."""
        state = {"stage": self.stage, **state, "scheduler": self.scheduler.state_dict(),
                 "hf_source": self.model.hf_source}
        t = self.recipe.train
        checkpoint.save(self.ckpt_root, step, self.model, self.optimizer if with_optimizer else None, state,
                        files=files, asynchronous=t.async_save, keep_last=t.keep_last)

    def open_log(self, total_steps: int, start_step: int) -> RunLog:
        lg = self.recipe.logging
        return RunLog(self.run_dir, self.stage, total_steps=total_steps, start_step=start_step,
                      wandb_mode=lg.wandb, wandb_project=lg.wandb_project, config=dataclasses.asdict(self.recipe),
                      progress=lg.progress, active=distributed.is_rank0())

    def close(self, log: RunLog, plot_keys: list[str]) -> None:
        checkpoint.finalize_saves(blocking=True)  # an asynchronous save still writing is published first
        plot = log.close(plot_keys)
        if plot is not None:
            log.message(f"{self.stage}: metrics in {self.run_dir / 'metrics.jsonl'}, plot {plot}")
        distributed.shutdown()
