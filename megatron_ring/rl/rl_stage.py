"""The RL stage: rollout -> reward -> GRPO advantage -> C3PO token budget -> update -> weight push,
with metrics, evaluation on held-out prompts, checkpoints and exact resume.

A step's loss tokens: c3po fills the budget from the carried segments and new rollout rounds
(at most rollout.max_rounds) and cuts the crossing response; grpo and token_mean train on every
response of one round. Old logprobs are recomputed by the trainer on the selected segments just
before the update (PPO's pi_old is then exactly the weights being updated); the gap to the rollout
engine's logprobs is logged, and corrected by truncated importance sampling when rl.tis_cap > 0."""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

from megatron.core import parallel_state as ps

from megatron_ring.platform import distributed
from megatron_ring.recipe.schema import check_layout, expand
from megatron_ring.rl import policy_loss, rank_balance, rewards_step, rl_batch
from megatron_ring.rl.advantages import drop_zero_variance, group_advantages
from megatron_ring.rl.prompt_stream import PromptStream, read_prompts
from megatron_ring.rl.responses import Response, Segment
from megatron_ring.rl.rl_eval import Evaluator
from megatron_ring.rl.token_budget import fill_buckets, tokens_of
from megatron_ring.rollout.base import SamplingParams
from megatron_ring.rollout.replay import record_round
from megatron_ring.train import checkpoint, preemption, stage_setup
from megatron_ring.train.engine import build_optimizer, build_scheduler, wrap_ddp
from megatron_ring.train.init_source import resolve_selection
from megatron_ring.train.run_log import RunLog

PLOT_KEYS = ["reward_mean", "eval_accuracy", "tokens_in_loss", "response_len_mean", "step_time_s", "entropy",
             "kl", "clip_frac", "grad_norm", "logprob_gap", "loss", "tokens_per_s"]


@dataclasses.dataclass
class StepState:
    """What a checkpoint must hold besides weights and optimizer to resume exactly."""

    step: int = 0
    prompt_cursor: int = 0
    pending: list[Segment] = dataclasses.field(default_factory=list)  # carried to the next step

    def to_json(self) -> dict:
        return {"step": self.step, "prompt_cursor": self.prompt_cursor, "pending": [s.to_json() for s in self.pending]}

    @classmethod
    def from_json(cls, d: dict) -> "StepState":
        return cls(d["step"], d["prompt_cursor"], [Segment.from_json(s) for s in d.get("pending", [])])


def budget_total(recipe, dp: int) -> int:
    r = recipe.rl
    return r.token_budget * (dp if r.budget_scope == "per_rank" else 1)


def divisor(recipe, dp: int, segments: list[Segment]) -> float:
    """The loss mode's constant D (policy_loss explains each)."""
    mode = recipe.rl.loss_mode
    if mode == "c3po":
        return float(budget_total(recipe, dp))  # Phi, even when fewer tokens were available
    if mode == "grpo":
        return float(len({s.response.uid for s in segments}))
    return float(tokens_of(segments))


class RLStage:
    def __init__(self, recipe, run_dir: Path):
        self.recipe, self.run_dir = recipe, Path(run_dir)
        t = recipe.train
        self.layout = check_layout(recipe, world_size=distributed.launched_world_size())
        distributed.init(self.layout.tp, self.layout.ep, seed=t.seed)
        stage_setup.save_recipe(recipe, self.run_dir)
        stage_setup.ensure_demo_data(recipe, self.run_dir)
        arch = recipe.model.arch()
        self.tokenizer = stage_setup.load_tokenizer(recipe, self.run_dir, arch)
        rows = read_prompts([expand(p, self.run_dir) for p in recipe.data.prompts], recipe.data.domains,
                            recipe.data.bad_rows)
        self.prompts = PromptStream(rows, [self.tokenizer.encode_prompt(r.messages()) for r in rows],
                                    recipe.rollout.seed)
        self.ckpt_root = self.run_dir / "checkpoints"
        last = checkpoint.latest(self.ckpt_root)
        self.model = stage_setup.build_initial_model(recipe, self.layout, self.run_dir, load_init=last is None)
        self.reference = None
        if recipe.rl.kl_beta > 0:
            self.reference = stage_setup.build_initial_model(recipe, self.layout, self.run_dir, load_init=True)
            self.reference.requires_grad_(False)
        self.ddp = wrap_ddp(self.model)
        self.optimizer = build_optimizer(self.ddp, lr=t.lr, min_lr=t.min_lr, weight_decay=t.weight_decay,
                                         clip_grad=t.clip_grad, adam_beta1=t.adam_beta1, adam_beta2=t.adam_beta2)
        updates = t.steps * recipe.rl.ppo_epochs
        self.scheduler = build_scheduler(self.optimizer, lr=t.lr, min_lr=t.min_lr, total_steps=updates,
                                         warmup_steps=math.ceil(t.warmup_frac * updates), style=t.lr_schedule,
                                         weight_decay=t.weight_decay)
        self.state = StepState()
        if last is not None:
            saved = checkpoint.load(last, self.model, self.optimizer)
            self.scheduler.load_state_dict(saved["scheduler"])
            self.state = StepState.from_json(saved["rl"])
        from megatron_ring.rollout.factory import make_engine

        self.engine = make_engine(recipe, self.model, self.tokenizer, self.run_dir)
        self.evaluator = Evaluator(recipe, self.run_dir, self.tokenizer)
        self.dp, self.dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        self.resumed_from = last

    # ---------------------------------------------------------------- one step

    def rollout_round(self, pool, version: int) -> tuple[list[Response], list[dict]]:
        ro = self.recipe.rollout
        first = self.state.prompt_cursor
        idx = self.prompts.take(first, ro.prompts_per_step)
        self.state.prompt_cursor += ro.prompts_per_step
        params = SamplingParams.of(ro)
        keys = list(range(first, first + len(idx)))
        out = self.engine.generate([self.prompts.token_ids[i] for i in idx], ro.samples_per_prompt, params, keys)
        responses, rows = [], {}
        for key, i, completions in zip(keys, idx, out):
            for s, c in enumerate(completions):
                if not c.tokens:
                    continue  # nothing to learn from (the prompt filled the context)
                uid = key * ro.samples_per_prompt + s
                responses.append(Response(uid, key, self.prompts.rows[i].domain, self.prompts.token_ids[i],
                                          c.tokens, c.logprobs, c.finish_reason, version=version))
                rows[uid] = self.prompts.rows[i]
        results = rewards_step.score(pool, responses, rows, self.tokenizer.decode)
        if ro.record and stage_setup.is_logging_rank():
            rewards = {(r.group, r.uid - r.group * ro.samples_per_prompt): r.reward for r in responses}
            record_round(self.run_dir / "rollouts", keys, [self.prompts.token_ids[i] for i in idx], out, rewards,
                         self.tokenizer.decode)
        return responses, results

    def gather_segments(self, pool, version: int) -> tuple[list[Segment], list[Response], int, int]:
        """Fill the step: carried segments first, then rollout rounds until the budget is met
        (c3po) or one round (grpo, token_mean). Returns (segments, new responses, rounds, timeouts)."""
        r = self.recipe.rl
        segments = list(self.state.pending) if r.loss_mode == "c3po" else []
        need = budget_total(self.recipe, self.dp) if r.loss_mode == "c3po" else 0
        fresh, rounds, timeouts = [], 0, 0
        while (rounds == 0 and r.loss_mode != "c3po") or (tokens_of(segments) < need and rounds < self.recipe.rollout.max_rounds):
            responses, results = self.rollout_round(pool, version)
            timeouts += sum(x.timed_out for x in results)
            rounds += 1
            stds = group_advantages(responses)  # on full groups, before anything is cut or dropped
            fresh += responses
            if r.drop_zero_variance:
                responses = drop_zero_variance(responses, stds)
            segments += [Segment(x) for x in responses]
        return segments, fresh, rounds, timeouts

    def select(self, segments: list[Segment]) -> tuple[list[list[Segment]], list[Segment]]:
        r = self.recipe.rl
        if r.loss_mode != "c3po":
            return [segments], []
        buckets, rest = fill_buckets(segments, r.token_budget, self.dp if r.budget_scope == "per_rank" else 1)
        return buckets, rest if r.leftover == "carry" else []

    def update(self, buckets: list[list[Segment]]) -> dict:
        r, tok = self.recipe.rl, self.tokenizer
        selected = [s for b in buckets for s in b]
        mine = rank_balance.plan(buckets, self.dp, self.recipe.train.micro_batch)[self.dp_rank]
        batches = [distributed.to_device(rl_batch.build(mb, tok.pad_id, self.layout.tp,
                                                        per_response_norm=r.loss_mode == "grpo")) for mb in mine]
        temp = self.recipe.rollout.temperature
        for b, old in zip(batches, policy_loss.token_logprobs(self.ddp, batches, temp)):
            b.old_logp = old
        if self.reference is not None:
            for b, ref in zip(batches, policy_loss.token_logprobs(self.reference, batches, temp)):
                b.ref_logp = ref
        if r.tis_cap > 0:
            for b in batches:
                rl_batch.truncate_importance(b, r.tis_cap)
        cfg = policy_loss.LossConfig(divisor(self.recipe, self.dp, selected), r.eps_low, r.eps_high, r.kl_beta,
                                     r.entropy_coef, temp)
        for _ in range(r.ppo_epochs):
            self.ddp.zero_grad_buffer()
            self.optimizer.zero_grad()
            out = policy_loss.forward_backward(self.ddp, batches, cfg)
            ok, grad_norm, _ = self.optimizer.step()
            self.scheduler.step(increment=1)
        out["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        out["forward_tokens"] = sum(s.seq_len for s in selected)
        return out

    def step_record(self, step, fresh, rounds, timeouts, out, t_roll, t_all) -> dict:
        rec = {"step": step, "loss_mode": self.recipe.rl.loss_mode}
        if fresh:
            rec["reward_mean"] = sum(x.reward for x in fresh) / len(fresh)
            rec["response_len_mean"] = sum(len(x.tokens) for x in fresh) / len(fresh)
            rec["truncated_frac"] = sum(x.finish_reason == "length" for x in fresh) / len(fresh)
            for d in sorted({x.domain for x in fresh}):
                mine = [x.reward for x in fresh if x.domain == d]
                rec[f"accuracy_{d}"] = sum(mine) / len(mine)
        rec.update(responses=len(fresh), rollout_rounds=rounds, reward_timeouts=timeouts,
                   carried_tokens=tokens_of(self.state.pending), step_time_s=round(t_all, 4),
                   rollout_time_s=round(t_roll, 4), train_time_s=round(t_all - t_roll, 4),
                   lr=self.optimizer.param_groups[0]["lr"], tokens_per_s=round(out.pop("forward_tokens") / t_all, 1))
        rec.update(out)
        return rec

    def save(self, step: int) -> None:
        state = {"stage": "rl", "scheduler": self.scheduler.state_dict(), "rl": self.state.to_json(),
                 "hf_source": self.model.hf_source}
        checkpoint.save(self.ckpt_root, step, self.model, self.optimizer, state)

    # ---------------------------------------------------------------- the loop

    def run(self) -> dict:
        try:
            return self._loop()
        finally:
            self.engine.close()  # a server this stage started must not outlive it, even on an error

    def _loop(self) -> dict:
        from megatron_ring.rewards.reward_pool import RewardPool

        recipe, t = self.recipe, self.recipe.train
        start = self.state.step
        log = RunLog(self.run_dir, "rl", total_steps=t.steps, start_step=start, wandb_mode=recipe.logging.wandb,
                     wandb_project=recipe.logging.wandb_project, config=dataclasses.asdict(recipe),
                     progress=recipe.logging.progress, active=stage_setup.is_logging_rank())
        log.message(f"rl ({recipe.name}): {len(self.prompts.rows)} prompts, {self.recipe.describe_batch(self.layout)}"
                    + (f"; resumed from {self.resumed_from}" if self.resumed_from else
                       f"; init {resolve_selection(expand(recipe.model.init, self.run_dir))}" if recipe.model.init else ""))
        # A server given by URL (or restarted with a resumed run) serves other weights until told.
        self.engine.push_weights(self.model, start)
        if start == 0:
            log.log({"step": 0, **self.evaluator.run(self.model)}, show=("eval_accuracy",))
        record: dict = {}
        hide = [str(self.run_dir.resolve())]
        with RewardPool(workers=recipe.reward.workers, timeout_s=recipe.reward.timeout_s, hide=hide,
                        float_tolerance=recipe.reward.float_tolerance) as pool:
            for step in range(start + 1, t.steps + 1):
                t0 = time.perf_counter()
                segments, fresh, rounds, timeouts = self.gather_segments(pool, version=step - 1)
                t_roll = time.perf_counter() - t0
                buckets, self.state.pending = self.select(segments)
                out = self.update(buckets)
                self.engine.push_weights(self.model, step)
                self.state.step = step
                record = self.step_record(step, fresh, rounds, timeouts, out, t_roll, time.perf_counter() - t0)
                if self.evaluator.due(step, t.steps):
                    record.update(self.evaluator.run(self.model))
                log.log(record, show=("reward_mean", "tokens_in_loss"))
                due = step == t.steps or bool(t.save_every_steps and step % t.save_every_steps == 0)
                if preemption.save_or_stop(self.run_dir, step, t.steps, due, self.save, log, "rl"):
                    break
        plot = log.close(PLOT_KEYS)
        if plot is not None:
            log.message(f"rl: metrics in {self.run_dir / 'metrics.jsonl'}, plot {plot}")
        distributed.shutdown()
        return record

def run(recipe, run_dir) -> dict:
    return RLStage(recipe, run_dir).run()
