"""Rewards that overlap generation: every prompt group goes to the reward pool the moment the
engine hands it over (on_group), and the pool (RewardPool.score_stream, in a thread of its own)
scores it while later groups are still being generated. What is left after the last group is
only the rewards of the groups that came back last."""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass


@dataclass
class ScoredRound:
    groups: list  # per prompt: its completions, as the engine returned them
    rewards: dict  # prompt index -> RewardResults of its completions with tokens, in order
    overlap_frac: float  # share of groups whose rewards were done before the last group was generated
    generated_s: float  # seconds until the last group was back
    scored_s: float  # seconds until the last reward was done


def generate_scored(generate, pool, items_of) -> ScoredRound:
    """generate(on_group) -> groups runs the engine; items_of(i, completions) -> the pool's
    (domain, response text, row) items of group i's completions that have tokens."""
    start = time.monotonic()
    inbox, done_at, scored = queue.SimpleQueue(), {}, {}

    def on_group(i: int, completions) -> None:
        done_at[i] = time.monotonic()
        inbox.put((i, items_of(i, completions)))

    def score() -> None:
        try:
            scored.update(pool.score_stream(inbox))
        except BaseException as e:  # raised again below, in the caller's thread
            scored[None] = e

    scorer = threading.Thread(target=score, name="reward-stream", daemon=True)
    scorer.start()
    try:
        groups = generate(on_group)
    finally:
        inbox.put(None)  # the pool finishes what it has, then returns
        scorer.join()
    if None in scored:
        raise scored[None]
    missing = [i for i in range(len(groups)) if i not in scored]
    assert not missing, f"the engine handed over no group for prompts {missing[:10]}"
    end = max(done_at.values(), default=start)
    finished = [t for _, t in scored.values()]
    return ScoredRound(groups, {i: results for i, (results, _) in scored.items()},
                       sum(t <= end for t in finished) / max(1, len(finished)),
                       end - start, max(finished, default=start) - start)


def handed_over(groups: list, on_group) -> list:
    """For groups generated before scoring started (the embedded engine): each handed to
    on_group in order; returns them."""
    for i, completions in enumerate(groups):
        on_group(i, completions)
    return groups
