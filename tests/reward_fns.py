"""Reward functions for pool tests, in a module a spawned worker imports quickly (no torch)."""

import time


def slow_reward(response: str, row: dict, settings) -> float:
    """A verifier that takes 20 ms: long enough to see rewards overlap generation."""
    time.sleep(0.02)
    return float(len(response) % 2)


def bench_reward(response: str, row: dict, settings) -> float:
    """A cheap verifier for tools/bench_rollout.py: parses the response's token ids (real work,
    ~20 us for 200 ids) and waits row["wait_s"] (a verifier's latency without taking the CPU
    the benchmark measures)."""
    ids = [int(t) for t in response.split()]
    time.sleep(float(row.get("wait_s", 0.002)))
    return float(sum(ids) % 2)
