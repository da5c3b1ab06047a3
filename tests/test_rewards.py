"""Verifiable rewards: math and multiple choice; the reward pool kills verifiers that hang, gives
code the sandbox's own deadline and scores every domain, code in the sandbox; Math-Verify's log
lines stay short."""

import logging
import os
import random
import time
from pathlib import Path

import pytest

from megatron_ring.data.demo_tasks import math_task, science_formula, science_units
from megatron_ring.rewards.choice_reward import score_choice
from megatron_ring.rewards.code_reward import CodeRewardSettings
from megatron_ring.rewards.math_reward import LOG_CHARS, score_math
from megatron_ring.rewards.reward_pool import CODE_MARGIN_S, RewardPool, score_one
from megatron_ring.rewards.sandbox import SandboxLimits
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

def ok_reward(response, row, settings):
    return 1.0


def hang_reward(response, row, settings):
    time.sleep(1e6)


def raise_reward(response, row, settings):
    raise ValueError("broken verifier")


def exit_reward(response, row, settings):
    os._exit(3)


def tolerance_reward(response, row, settings):
    return settings.float_tolerance


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
    with RewardPool(workers=2, timeout_s=20.0, settings=CodeRewardSettings(hide=(run,))) as pool:
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
    assert all(r.error is None and not r.timed_out for r in results[:-1])
    assert "No such file" in results[-1].error and secret not in results[-1].error  # why the theft scored 0
    with capsys.disabled():
        print(f"\n  reward pool (2 workers): {math_rate:.0f} math rewards/s; {len(items)} mixed items "
              f"({len(code) + 1} code) in {seconds:.2f}s")


# ---------------------------------------------------------------- deadlines of code items

SLOW_CASES = SandboxLimits(cpu_s=1, case_timeout_s=1.0)


@needs_bwrap
def test_code_deadline_is_the_sandbox_budget():
    """A correct program slower than reward.timeout_s in all (3 cases of 0.4 s, or 60 fast cases:
    before, killed at the flat timeout and scored 0) gets the sandbox's own budget + a margin."""
    slow = {"domain": "code", "test_type": "stdio",
            "code_test_cases": [{"input": f"{i}\n", "output": f"{i}\n"} for i in range(3)]}
    many = {**slow, "code_test_cases": [{"input": f"{i}\n", "output": f"{i}\n"} for i in range(60)]}
    with RewardPool(workers=1, timeout_s=0.5, settings=CodeRewardSettings(limits=SLOW_CASES)) as pool:
        assert pool.deadline_s("code", slow) == SLOW_CASES.total_timeout_s(3) + CODE_MARGIN_S
        assert pool.deadline_s("code", many) == SLOW_CASES.total_timeout_s(60) + CODE_MARGIN_S
        assert pool.deadline_s("code", {"test": "def check(c): pass", "entry_point": "f"}) == \
            SLOW_CASES.total_timeout_s(1) + CODE_MARGIN_S
        assert pool.deadline_s("math", {"answer": "1"}) == 0.5
        for program, row in (("import time\ntime.sleep(0.4)\nprint(input())", slow), ("print(input())", many)):
            start = time.monotonic()
            [result] = pool.score([("code", f"```python\n{program}\n```", row)])
            seconds = time.monotonic() - start
            assert (result.reward, result.timed_out, result.error) == (1.0, False, None)
            assert seconds > pool.timeout_s  # the flat timeout would have killed it
        [late] = pool.score([("code", "```python\nimport time\ntime.sleep(5)\n```", slow)])
        assert (late.reward, late.timed_out, late.error) == (0.0, False, "case 0: timeout")  # the sandbox's clock


@needs_bwrap
def test_recipe_float_tolerance_reaches_the_workers():
    row = {"domain": "code", "test_type": "function", "fn_name": "f",
           "code_test_cases": [{"input": "[]", "output": "0.3"}]}
    near = "```python\ndef f():\n    return 0.1 + 0.2\n```"
    with RewardPool(workers=1, settings=CodeRewardSettings(float_tolerance=1e-9)) as pool:
        assert [r.reward for r in pool.score([("code", near, row), ("code", near, {**row, "float_tolerance": 0})])] \
            == [1.0, 0.0]  # a row's own tolerance wins
        [wrong] = pool.score([("code", "```python\ndef f():\n    return 1\n```", row)])
        assert wrong.error == "case 0: wrong result '1'"  # the pool says why code scored 0
        # in-process scoring (held-out evaluation) takes the same settings explicitly
        assert score_one("code", near, row, pool.settings).reward == 1.0
        assert score_one("code", near, row, CodeRewardSettings()).reward == 0.0


def test_settings_are_bound_per_pool():
    """Two pools in one process score with their own settings: nothing is configured process-wide."""
    fns = {"tol": tolerance_reward}
    with RewardPool(workers=1, settings=CodeRewardSettings(float_tolerance=0.25), fns=fns) as a, \
            RewardPool(workers=1, settings=CodeRewardSettings(float_tolerance=0.5), fns=fns) as b:
        assert [r.reward for r in a.score([("tol", "", {})] * 2)] == [0.25, 0.25]
        assert [r.reward for r in b.score([("tol", "", {})] * 2)] == [0.5, 0.5]
        assert [r.reward for r in a.score([("tol", "", {})])] == [0.25]
    assert score_one("tol", "", {}, CodeRewardSettings(float_tolerance=0.75), fns).reward == 0.75
    assert "no reward function" in score_one("nope", "", {}, CodeRewardSettings(), fns).error
    assert score_one("math", "\\boxed{2}", {"answer": "2"}, CodeRewardSettings()).reward == 1.0
    with pytest.raises(ValueError, match="float tolerance"):
        CodeRewardSettings(float_tolerance=-1)
    assert CodeRewardSettings(hide=[Path("/x")]).hide == ("/x",)


# ---------------------------------------------------------------- Math-Verify's log lines

def test_math_verify_timeouts_log_one_short_line(caplog):
    """Math-Verify logs the whole expression it gave up on: 43 KB on one line before."""
    huge = "+".join(f"x^{{{i}}}" for i in range(5000))
    with caplog.at_level(logging.WARNING):
        assert score_math(f"so \\boxed{{{huge}}}", "1", timeout_s=1) == 0.0
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("math_verify")]
    assert any(m.startswith("Timeout during parsing: \\boxed{x^{0}+x^{1}") for m in messages), messages
    whole = len(f"Timeout during parsing: \\boxed{{{huge}}}")
    assert all(len(m) <= LOG_CHARS + 40 for m in messages) and any(f"({whole} characters)" in m for m in messages)
