"""The rollout side of an RL step: the prompt stream, the engine, rewards, GRPO advantages, the
token budget and the carried segments, ending in this rank's micro-batches.

A step's loss tokens: a mode that fills a budget (c3po) starts from the carried segments and
adds rollout rounds (at most rollout.max_rounds) until the budget is met, cutting the crossing
response; the others train on every response of one round. Rewards are scored on rank 0 (a
worker pool with hard timeouts, sandboxed code) and broadcast, so every rank holds the same
responses and each takes its own share of the balanced micro-batches."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from megatron_ring.data.rl_prompts import read_prompts
from megatron_ring.inference.sampling_params import SamplingParams
from megatron_ring.platform import distributed
from megatron_ring.recipe.schema import expand
from megatron_ring.rewards.code_reward import CodeRewardSettings
from megatron_ring.rewards.reward_pool import RewardPool
from megatron_ring.rl import rank_balance, rl_batch
from megatron_ring.rl.advantages import drop_zero_variance, group_advantages
from megatron_ring.rl.loss_modes import StepBudget
from megatron_ring.rl.prompt_stream import PromptStream
from megatron_ring.rl.responses import Response, Segment
from megatron_ring.rl.rl_batch import RLBatch
from megatron_ring.rl.token_budget import fill_buckets, tokens_of
from megatron_ring.rollout.factory import make_engine
from megatron_ring.rollout.replay import record_round


def code_settings(recipe, run_dir: Path) -> CodeRewardSettings:
    """How the stage scores code (rollouts and held-out evaluation alike): the run directory
    hidden from the sandbox, the recipe's float tolerance."""
    return CodeRewardSettings(hide=(str(Path(run_dir).resolve()),), float_tolerance=recipe.reward.float_tolerance)


@dataclass
class StepData:
    """One step's data for the actor, and what the step record reports about its rollouts."""

    batches: list[RLBatch]  # this rank's micro-batches (every rank has the same number)
    divisor: int  # the loss mode's D for the selected segments
    responses: list  # the step's new responses (all ranks)
    rounds: int
    reward_timeouts: int
    forward_tokens: int  # prompt + response tokens the update's forwards read, all ranks
    rollout_time_s: float


class Rollouts:
    def __init__(self, recipe, session, budget: StepBudget, saved: dict | None):
        """saved: the checkpoint's RL state (prompt cursor, carried segments), None on a fresh start."""
        self.recipe, self.session, self.budget = recipe, session, budget
        self.run_dir, self.tokenizer = session.run_dir, session.tokenizer
        rows = read_prompts([expand(p, self.run_dir) for p in recipe.data.prompts], recipe.data.domains,
                            recipe.data.bad_rows)
        self.prompts = PromptStream(rows, [self.tokenizer.encode_prompt(r.messages()) for r in rows],
                                    recipe.rollout.seed)
        self.cursor = saved["prompt_cursor"] if saved else 0
        self.pending = [Segment.from_json(s) for s in saved.get("pending", [])] if saved else []
        rw = recipe.reward  # the pool scores on rank 0 only; the others receive its rewards
        self.pool = RewardPool(rw.workers, rw.timeout_s, code_settings(recipe, self.run_dir)) if distributed.is_rank0() else None
        try:  # the pool first: it fails fast (no sandbox), before a server is started
            self.engine = make_engine(recipe, session.model, self.tokenizer, self.run_dir)
        except BaseException:
            if self.pool is not None:
                self.pool.close()
            raise

    def state_dict(self) -> dict:
        """What a checkpoint must hold to resume the prompt order and the carried tokens exactly."""
        return {"prompt_cursor": self.cursor, "pending": [s.to_json() for s in self.pending]}

    def push_weights(self, model, version: int) -> None:
        self.engine.push_weights(model, version)

    def close(self) -> None:
        """A server this stage started must not outlive it, even on an error."""
        try:
            self.engine.close()
        finally:
            if self.pool is not None:
                self.pool.close()

    # ---------------------------------------------------------------- one step

    def next_step(self, version: int) -> StepData:
        """Sample and score until the step is full, select its loss tokens (carrying the rest)
        and return this rank's micro-batches."""
        t0 = time.perf_counter()
        segments, fresh, rounds, timeouts = self._gather(version)
        buckets, self.pending = self._select(segments)
        selected = [s for b in buckets for s in b]
        mine = rank_balance.plan(buckets, self.session.dp, self.recipe.train.micro_batch,
                                 self.budget.per_rank)[self.session.dp_rank]
        per_response = self.budget.mode.per_response_weight
        batches = [distributed.to_device(rl_batch.build(mb, self.tokenizer.pad_id, self.session.layout.tp,
                                                        per_response_norm=per_response)) for mb in mine]
        return StepData(batches, self.budget.divisor(selected), fresh, rounds, timeouts,
                        sum(s.seq_len for s in selected), time.perf_counter() - t0)

    def _gather(self, version: int) -> tuple[list[Segment], list[Response], int, int]:
        """Carried segments first (budget modes), then rollout rounds until the budget is met
        (or max_rounds), or exactly one round. Returns (segments, new responses, rounds, timeouts)."""
        fills = self.budget.mode.fills_budget
        segments = list(self.pending) if fills else []
        fresh, rounds, timeouts = [], 0, 0
        while (not fills and rounds == 0) or (fills and tokens_of(segments) < self.budget.total
                                              and rounds < self.recipe.rollout.max_rounds):
            responses, timed_out = self._round(version)
            timeouts += timed_out
            rounds += 1
            stds = group_advantages(responses)  # on full groups, before anything is cut or dropped
            fresh += responses
            if self.recipe.rl.drop_zero_variance:
                responses = drop_zero_variance(responses, stds)
            segments += [Segment(x) for x in responses]
        return segments, fresh, rounds, timeouts

    def _select(self, segments: list[Segment]) -> tuple[list[list[Segment]], list[Segment]]:
        """(buckets to train on, segments carried to the next step)."""
        if not self.budget.mode.fills_budget:
            return [segments], []
        buckets, rest = fill_buckets(segments, self.budget.tokens, self.budget.buckets)
        return buckets, rest if self.recipe.rl.leftover == "carry" else []

    def _round(self, version: int) -> tuple[list[Response], int]:
        """One rollout round of prompts_per_step prompts x samples_per_prompt, scored. Returns
        the responses (rewards set) and how many rewards timed out."""
        ro = self.recipe.rollout
        first = self.cursor
        idx = self.prompts.take(first, ro.prompts_per_step)
        self.cursor += ro.prompts_per_step
        keys = list(range(first, first + len(idx)))
        out = self.engine.generate([self.prompts.token_ids[i] for i in idx], ro.samples_per_prompt,
                                   SamplingParams.of(ro), keys)
        responses, rows = [], {}
        for key, i, completions in zip(keys, idx, out):
            for s, c in enumerate(completions):
                if not c.tokens:
                    continue  # nothing to learn from (the prompt filled the context)
                uid = key * ro.samples_per_prompt + s
                responses.append(Response(uid, key, self.prompts.rows[i].domain, self.prompts.token_ids[i],
                                          c.tokens, c.logprobs, c.finish_reason, version=version))
                rows[uid] = self.prompts.rows[i]
        decode = self.tokenizer.decode
        results = distributed.rank0_then_broadcast(
            lambda: self.pool.score([(r.domain, decode(r.tokens), rows[r.uid].row) for r in responses]))
        for r, res in zip(responses, results):
            r.reward = res.reward
        if ro.record and distributed.is_rank0():
            rewards = {(r.group, r.uid - r.group * ro.samples_per_prompt): r.reward for r in responses}
            record_round(self.run_dir / "rollouts", keys, [self.prompts.token_ids[i] for i in idx], out, rewards,
                         decode)
        return responses, sum(x.timed_out for x in results)
