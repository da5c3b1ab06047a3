"""The rollout side of an RL step: the prompt stream, the engine, rewards, GRPO advantages, the
token budget and the carried segments, ending in this rank's micro-batches.

A step's loss tokens: a mode that fills a budget (c3po) starts from the carried segments and
adds rollout rounds (at most rollout.max_rounds) until the budget is met, cutting the crossing
response; the others train on every response of one round.

Rank 0 alone holds the step's responses: it talks to the engine, scores each prompt group in a
worker pool (hard timeouts, sandboxed code) as soon as the group is back, selects the loss
tokens and plans every rank's micro-batches; each rank then receives only its own, as flat
tensors (rl/batch_transfer.py). Meanwhile the other ranks wait on the control group (gloo, its
own rollout.control_timeout_s), never inside an NCCL collective. Only the embedded engine, whose
sampler is the trainer's own model, has every rank generate."""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

from megatron_ring.data.rl_prompts import read_prompts
from megatron_ring.inference.sampling_params import SamplingParams
from megatron_ring.platform import distributed
from megatron_ring.recipe.schema import expand
from megatron_ring.rewards.code_reward import CodeRewardSettings
from megatron_ring.rewards.reward_pool import RewardPool
from megatron_ring.rl import batch_transfer, carried_segments, rank_balance, rl_batch
from megatron_ring.rl.advantages import drop_zero_variance, group_advantages
from megatron_ring.rl.loss_modes import StepBudget
from megatron_ring.rl.prompt_stream import PromptStream
from megatron_ring.rl.responses import Response, Segment
from megatron_ring.rl.rl_batch import RLBatch
from megatron_ring.rl.token_budget import fill_buckets, tokens_of
from megatron_ring.rollout.base import RolloutError
from megatron_ring.rollout.factory import make_engine
from megatron_ring.rollout.replay import record_round
from megatron_ring.rollout.routed_experts import rows_of
from megatron_ring.rollout.streamed_rewards import generate_scored, handed_over
from megatron_ring.train.offload import TrainerOffload


def code_settings(recipe, run_dir: Path) -> CodeRewardSettings:
    """How the stage scores code (rollouts and held-out evaluation alike): the run directory
    hidden from the sandbox, the recipe's float tolerance."""
    return CodeRewardSettings(hide=(str(Path(run_dir).resolve()),), float_tolerance=recipe.reward.float_tolerance)


def sampled_by(c, pushed: int) -> int:
    """The step whose weights sampled c: what the engine reported (SGLang's weight_version, set by
    every push), else the last push's."""
    try:
        return int(c.weight_version)
    except (TypeError, ValueError):
        return pushed


def checked_routing(c, prompt: list[int], shape: tuple[int, int] | None):
    """The completion's routed experts when the recipe wants them: one row per position the
    engine read, [layers, top_k] each (an engine that answers otherwise is named here, before a
    wrong routing reaches a replayed forward)."""
    if shape is None:
        return None
    want = (rows_of(len(prompt), len(c.tokens)), *shape)
    if c.routing is None or tuple(c.routing.shape) != want:
        got = None if c.routing is None else tuple(c.routing.shape)
        raise RolloutError(f"the rollout engine returned routed experts of shape {got}, expected {want} "
                           "(prompt + response tokens - 1, MoE layers, top-k)")
    return c.routing


@dataclass
class StepData:
    """One step's data for the actor, and what the step record reports about its rollouts."""

    batches: list[RLBatch]  # this rank's micro-batches (every rank has the same number)
    divisor: int  # the loss mode's D for the selected segments
    rounds: int
    rollout_time_s: float
    # Rank 0 only (empty or 0 elsewhere): what the step record reports.
    responses: list  # the step's new responses
    reward_timeouts: int = 0
    forward_tokens: int = 0  # prompt + response tokens the update's forwards read, all ranks
    reward_overlap_frac: float = 0.0  # share of prompt groups scored before their round's generation ended


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
        self.pending = carried_segments.read(session.resumed_from, saved) if saved else []
        self.dp_rank_of = batch_transfer.dp_ranks()
        arch = session.model.arch  # each response's routing: [positions, layers, top_k]
        self.routing_shape = (arch.num_layers, arch.moe_topk) if recipe.routed_experts else None
        rw = recipe.reward  # the pool scores on rank 0 only
        self.pool = RewardPool(rw.pool_size(recipe.cluster.gpus_per_node), rw.timeout_s,
                               code_settings(recipe, self.run_dir)) if distributed.is_rank0() else None
        self.offload = None
        if recipe.offload:  # before the engines start: they size their KV cache by the free memory
            self.offload = TrainerOffload(session.ddp, session.optimizer, session.reference)
            self.offload.offload()
        try:  # the pool first: it fails fast (no sandbox), before a server is started
            self.engine = make_engine(recipe, session.model, self.tokenizer, self.run_dir)
        except BaseException:
            if self.pool is not None:
                self.pool.close()
            raise

    def state_dict(self) -> dict:
        """What a checkpoint must hold to resume the prompt order and the carried tokens exactly
        (rank 0's: it writes the trainer state). `pending`: the carried segments as they are now
        (a copy of the list), which the checkpoint keeps in a binary file (rl/carried_segments.py)."""
        return {"prompt_cursor": self.cursor, "pending": list(self.pending)}

    def push_weights(self, model, version: int) -> dict:
        """Collective: the engines serve the model's weights of step `version` (colocated with
        rollout.offload: the trainer's training-only state leaves the GPU first). Returns the
        push's figures for the step record."""
        figures = self.offload.offload() if self.offload is not None else {}
        return {**figures, **(self.engine.push_weights(model, version) or {})}

    def to_training(self) -> dict:
        """Collective, after a step's rollouts: the engines free their GPU memory and the
        trainer's state comes back (rollout.offload; nothing otherwise)."""
        self.engine.release_memory()
        return self.offload.reload() if self.offload is not None else {}

    @contextlib.contextmanager
    def trainer_state(self):
        """The trainer's whole state on the GPU for a while (a checkpoint save), then offloaded again."""
        back = self.offload is not None and self.offload.offloaded
        if back:
            self.offload.reload()
        try:
            yield
        finally:
            if back:
                self.offload.offload()

    def close(self) -> None:
        """A server this stage started must not outlive it, even on an error."""
        try:
            self.engine.close()
        finally:
            if self.pool is not None:
                self.pool.close()

    # ---------------------------------------------------------------- one step

    def next_step(self, version: int) -> StepData:
        """Collective. Sample and score until the step is full, select its loss tokens (carrying
        the rest) and return this rank's micro-batches."""
        t0 = time.perf_counter()
        stats = {"responses": [], "reward_timeouts": 0, "overlap": []}
        segments = list(self.pending) if self.budget.mode.fills_budget else []
        rounds = 0
        while distributed.rank0_then_broadcast(lambda: self._more(segments, rounds)):
            request = self._round_prompts()
            out = self.engine.generate(*request) if self.engine.collective else None
            distributed.rank0_then_barrier(lambda: self._score_round(version, request, out, segments, stats))
            rounds += 1
        plan = distributed.rank0_then_barrier(lambda: self._plan(segments))
        mine, divisor = batch_transfer.scatter(plan and plan[0], plan[1] if plan else 0, self.dp_rank_of)
        packed = self.recipe.train.max_tokens_per_micro_batch > 0
        batches = [distributed.to_device(rl_batch.from_rows(mb, self.tokenizer.pad_id, self.session.layout.tp, packed))
                   for mb in mine]
        overlap = stats["overlap"]  # per round
        return StepData(batches, divisor, rounds, time.perf_counter() - t0, stats["responses"],
                        stats["reward_timeouts"], plan[2] if plan else 0,
                        sum(overlap) / len(overlap) if overlap else 0.0)

    def _more(self, segments: list[Segment], rounds: int) -> bool:
        """Another rollout round? Budget modes: until the budget is met (or max_rounds); the
        others: exactly one."""
        if not self.budget.mode.fills_budget:
            return rounds == 0
        return tokens_of(segments) < self.budget.total and rounds < self.recipe.rollout.max_rounds

    def _round_prompts(self) -> tuple:
        """(prompts, K, sampling, keys) of the next round; every rank advances the cursor."""
        ro = self.recipe.rollout
        idx = self.prompts.take(self.cursor, ro.prompts_per_step)
        keys = list(range(self.cursor, self.cursor + len(idx)))
        self.cursor += ro.prompts_per_step
        return [self.prompts.token_ids[i] for i in idx], ro.samples_per_prompt, SamplingParams.of(ro), keys

    def _score_round(self, version: int, request: tuple, generated, segments: list, stats: dict) -> None:
        """Rank 0: generate (unless the collective engine already has) with every prompt group
        scored as it arrives; GRPO advantages; the round's segments appended."""
        prompts, k, params, keys = request
        rows = [self.prompts.rows[self.prompts.index(key)] for key in keys]
        decode = self.tokenizer.decode

        def items_of(i: int, completions) -> list:
            return [(rows[i].domain, decode(c.tokens), rows[i].row) for c in completions if c.tokens]

        def generate(on_group):
            if generated is not None:
                return handed_over(generated, on_group)
            return self.engine.generate(prompts, k, params, keys, on_group=on_group)

        scored = generate_scored(generate, self.pool, items_of)
        generated = scored.groups
        stats["overlap"].append(scored.overlap_frac)
        responses = []
        for i, (key, completions) in enumerate(zip(keys, generated)):
            results = iter(scored.rewards[i])
            for s, c in enumerate(completions):
                if not c.tokens:
                    continue  # nothing to learn from (the prompt filled the context)
                res = next(results)
                responses.append(Response(key * k + s, key, rows[i].domain, prompts[i], c.tokens, c.logprobs,
                                          c.finish_reason, reward=res.reward, version=sampled_by(c, version),
                                          routing=checked_routing(c, prompts[i], self.routing_shape)))
                stats["reward_timeouts"] += res.timed_out
        if self.recipe.rollout.record:
            rewards = {(r.group, r.uid - r.group * k): r.reward for r in responses}
            record_round(self.run_dir / "rollouts", keys, prompts, generated, rewards, decode)
        group_stds = group_advantages(responses)  # on full groups, before anything is cut or dropped
        stats["responses"] += responses
        if self.recipe.rl.drop_zero_variance:
            responses = drop_zero_variance(responses, group_stds)
        segments += [Segment(x) for x in responses]

    def _plan(self, segments: list[Segment]) -> tuple[list, int, int]:
        """Rank 0: the step's loss tokens in buckets (the rest carried), planned into every
        data-parallel rank's micro-batches of rows. Returns (rows per dp rank, D, forward tokens)."""
        if self.budget.mode.fills_budget:
            buckets, rest = fill_buckets(segments, self.budget.tokens, self.budget.buckets)
            self.pending = rest if self.recipe.rl.leftover == "carry" else []
        else:
            buckets = [segments]
        selected = [s for b in buckets for s in b]
        t = self.recipe.train
        plan = rank_balance.plan(buckets, self.session.dp, t.micro_batch, self.budget.per_rank,
                                 t.max_tokens_per_micro_batch)
        per_response = self.budget.mode.per_response_weight
        rows = [[rl_batch.rows_of(mb, per_response) for mb in mbs] for mbs in plan]
        return rows, self.budget.divisor(selected), sum(s.seq_len for s in selected)
