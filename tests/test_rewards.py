"""Verifiable rewards: math and multiple choice; the reward pool kills verifiers that hang and
scores every domain, code in the sandbox."""

import os
import random
import time
from pathlib import Path

from megatron_ring.data.demo_tasks import math_task, science_formula, science_units
from megatron_ring.rewards.choice_reward import score_choice
from megatron_ring.rewards.math_reward import score_math
from megatron_ring.rewards.reward_pool import RewardPool
from tests.sandbox_fixtures import demo_code_tasks, host_dir, needs_bwrap, run_dir  # noqa: F401


# ---------------------------------------------------------------- math and multiple choice

def test_math_reward():
    assert score_math("so the sum is \\boxed{132}", "132") == 1.0
    assert score_math("so the sum is \\boxed{131}", "132") == 0.0
    assert score_math("x = \\boxed{\\frac{1}{2}}", "0.5") == 1.0
    assert score_math("\\boxed{1/2}", "\\frac{1}{2}") == 1.0
    assert score_math("\\boxed{2x+2}", "2(x+1)") == 1.0
    assert score_math("the answer is 132", "132") == 0.0  # no \boxed{}: no answer
    assert score_math("\\boxed{13", "13") == 0.0  # cut off


def test_choice_reward():
    assert score_choice("option B. \\boxed{B}", "B") == 1.0
    assert score_choice("\\boxed{(c)}", "C") == 1.0
    assert score_choice("\\boxed{A}", "B") == 0.0
    assert score_choice("B", "B") == 0.0


# ---------------------------------------------------------------- the reward pool

def ok_reward(response, row):
    return 1.0


def hang_reward(response, row):
    time.sleep(1e6)


def raise_reward(response, row):
    raise ValueError("broken verifier")


def exit_reward(response, row):
    os._exit(3)


def test_pool_kills_hanging_verifiers():
    fns = {"ok": ok_reward, "hang": hang_reward, "raise": raise_reward, "exit": exit_reward}
    with RewardPool(workers=2, timeout_s=1.0, fns=fns) as pool:
        pool.score([("ok", "", {})] * 2)  # workers started
        pids = {w.process.pid for w in pool._workers}
        start = time.monotonic()
        results = pool.score([("ok", "", {}), ("hang", "", {}), ("raise", "", {}), ("exit", "", {}),
                              ("nope", "", {}), ("ok", "", {})])
        seconds = time.monotonic() - start
        assert [r.reward for r in results] == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]
        assert [r.timed_out for r in results] == [False, True, False, False, False, False]
        assert "ValueError: broken verifier" in results[2].error and "died" in results[3].error
        assert "no reward function" in results[4].error
        assert seconds < 4.0  # the hang cost about timeout_s, not forever
        for pid in pids - {w.process.pid for w in pool._workers}:  # the replaced workers are gone
            assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
        assert [r.reward for r in pool.score([("ok", "", {})] * 3)] == [1.0] * 3  # still serving
        workers = [w.process for w in pool._workers]
    assert not any(p.is_alive() for p in workers)


@needs_bwrap
def test_pool_scores_every_domain(run_dir, capsys):
    run, secret = run_dir
    rng = random.Random(1)
    maths = [math_task(rng) for _ in range(40)]
    science = [make(rng) for make in (science_units, science_formula) for _ in range(5)]
    code = demo_code_tasks(per_kind=2)
    items = [("math", t["solution"], t) for t in maths] + [("science", t["solution"], t) for t in science]
    items += [("math", "\\boxed{-1}", maths[0]), ("science", "\\boxed{Z}", science[0])]
    steal = {"code_test_cases": [{"input": "", "output": secret + "\n"}], "test_type": "stdio"}
    items += [("code", t["solution"], t) for t in code]
    items += [("code", f"```python\nprint(open({str(run / 'checkpoints' / 'model.txt')!r}).read())\n```", steal)]
    with RewardPool(workers=2, timeout_s=20.0, hide=[run]) as pool:
        pool.score(items[:2])  # workers started
        start = time.monotonic()
        results = pool.score(items[:len(maths)])
        math_rate = len(maths) / (time.monotonic() - start)
        start = time.monotonic()
        results = pool.score(items)
        seconds = time.monotonic() - start
    rewards = [r.reward for r in results]
    n_ok = len(maths) + len(science)
    assert rewards[:n_ok] == [1.0] * n_ok and rewards[n_ok:n_ok + 2] == [0.0, 0.0]
    assert rewards[n_ok + 2:-1] == [1.0] * len(code) and rewards[-1] == 0.0
    assert all(r.error is None and not r.timed_out for r in results)
    with capsys.disabled():
        print(f"\n  reward pool (2 workers): {math_rate:.0f} math rewards/s; {len(items)} mixed items "
              f"({len(code) + 1} code) in {seconds:.2f}s")
