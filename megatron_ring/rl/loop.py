"""The RL stage as the algorithm reads: each step gets its data from the rollout side (rollout ->
reward -> GRPO advantage -> token budget -> this rank's micro-batches), the actor updates on it,
the new weights go to the rollout engine, held-out evaluation runs when due, and a checkpoint is
saved (exact resume: weights, optimizer, scheduler, prompt cursor, carried segments)."""

from __future__ import annotations

import time

from megatron_ring.platform import distributed
from megatron_ring.recipe.schema import expand
from megatron_ring.rl import carried_segments
from megatron_ring.rl.actor import Actor
from megatron_ring.rl.loss_modes import StepBudget
from megatron_ring.rl.rl_eval import Evaluator
from megatron_ring.rl.rollouts import Rollouts, StepData
from megatron_ring.rl.token_budget import tokens_of
from megatron_ring.train import preemption
from megatron_ring.train.init_source import resolve_selection
from megatron_ring.train.session import Session

PLOT_KEYS = ["reward_mean", "eval_accuracy", "tokens_in_loss", "response_len_mean", "step_time_s", "entropy",
             "kl", "clip_frac", "grad_norm", "logprob_gap", "prob_error", "routing_agreement", "loss", "tokens_per_s"]


def run(recipe, run_dir) -> dict:
    """Train (or resume) an RL stage; returns the last step's metrics."""
    t = recipe.train
    session = Session(recipe, run_dir, "rl")
    saved = session.build_trainer(t.steps * recipe.rl.ppo_epochs, reference=recipe.rl.kl_beta > 0)
    saved = saved["rl"] if saved else None
    budget = StepBudget.of(recipe.rl, session.dp)
    actor = Actor(session, recipe.rl, recipe.rollout.temperature)
    rollouts = Rollouts(recipe, session, budget, saved)
    try:
        record = _loop(recipe, session, actor, rollouts, Evaluator(recipe, session.run_dir, session.tokenizer),
                       start=saved["step"] if saved else 0)
    finally:
        rollouts.close()
    return record


def _loop(recipe, session, actor, rollouts, evaluator, start: int) -> dict:
    steps = recipe.train.steps
    log = session.open_log(steps, start)
    init = f"; init {resolve_selection(expand(recipe.model.init, session.run_dir))}" if recipe.model.init else ""
    log.message(f"rl ({recipe.name}): {len(rollouts.prompts.rows)} prompts, {recipe.describe_batch(session.layout)}"
                + (f"; resumed from {session.resumed_from}" if session.resumed_from else init))
    # A server given by URL (or restarted with a resumed run) serves other weights until told.
    rollouts.push_weights(session.model, start)
    if start == 0:
        log.log({"step": 0, **evaluator.run(session.model, rollouts.engine)}, show=("eval_accuracy",))

    def save(step):
        state = rollouts.state_dict()
        pending = state.pop("pending")  # rank 0's are the real ones (every rank reads them on resume)
        carried = carried_segments.encode(pending) if distributed.is_rank0() else b""
        with rollouts.trainer_state():
            session.save(step, {"rl": {"step": step, **state}}, files={carried_segments.FILE: carried})

    record: dict = {}
    for step in range(start + 1, steps + 1):
        t0 = time.perf_counter()
        data = rollouts.next_step(version=step - 1)
        swap = rollouts.to_training()  # colocated: the engines make room, the trainer's state returns
        out = actor.update(data.batches, data.divisor)
        push = rollouts.push_weights(session.model, step)
        record = step_record(recipe, step, data, {**out, **swap, **push}, rollouts, session,
                             time.perf_counter() - t0)
        if evaluator.due(step, steps):
            record.update(evaluator.run(session.model, rollouts.engine))
        log.log(record, show=("reward_mean", "tokens_in_loss"))
        due = step == steps or bool(recipe.train.save_every_steps and step % recipe.train.save_every_steps == 0)
        if preemption.save_or_stop(session.run_dir, step, steps, due, save, log, "rl"):
            break
    session.close(log, PLOT_KEYS)
    return record


def step_record(recipe, step: int, data: StepData, out: dict, rollouts, session, step_time: float) -> dict:
    """The step's metrics: rewards and lengths of its new responses, per-domain accuracy, the
    rollout and update times, and the update's own metrics."""
    rec = {"step": step, "loss_mode": recipe.rl.loss_mode}
    fresh = data.responses
    if fresh:
        # Steps between the weights that sampled a response and the weights it trains (0: on-policy).
        rec["weight_staleness_max"] = step - 1 - min(x.version for x in fresh)
        rec["reward_mean"] = sum(x.reward for x in fresh) / len(fresh)
        rec["response_len_mean"] = sum(len(x.tokens) for x in fresh) / len(fresh)
        rec["truncated_frac"] = sum(x.finish_reason == "length" for x in fresh) / len(fresh)
        for d in sorted({x.domain for x in fresh}):
            mine = [x.reward for x in fresh if x.domain == d]
            rec[f"accuracy_{d}"] = sum(mine) / len(mine)
    rec.update(responses=len(fresh), rollout_rounds=data.rounds, reward_timeouts=data.reward_timeouts,
               reward_overlap_frac=round(data.reward_overlap_frac, 4),
               carried_tokens=tokens_of(rollouts.pending), step_time_s=round(step_time, 4),
               rollout_time_s=round(data.rollout_time_s, 4), train_time_s=round(step_time - data.rollout_time_s, 4),
               lr=session.optimizer.param_groups[0]["lr"], tokens_per_s=round(data.forward_tokens / step_time, 1))
    rec.update(out)
    return rec
