"""The entropy selection rule, the rewards it scores with, and sampling that does not depend on
how prompts are batched."""

import pytest

from megatron_ring.rewards.boxed import last_boxed
from megatron_ring.rewards.choice_reward import score_choice
from megatron_ring.rewards.math_reward import score_math
from megatron_ring.selection.entropy_rule import Candidate, NoCheckpointInRange, choose


def c(step, entropy, accuracy=0.0):
    return Candidate(f"ckpt/iter_{step:07d}", step / 10, step, entropy, accuracy)


def test_single_checkpoint_in_range():
    assert choose([c(10, 0.9), c(20, 0.45), c(30, 0.2)]).step == 20


def test_ties_go_to_accuracy_then_later_step():
    assert choose([c(10, 0.48, 0.5), c(20, 0.40, 0.7), c(30, 0.31, 0.6)]).step == 20
    assert choose([c(10, 0.48, 0.7), c(20, 0.40, 0.7), c(30, 0.29, 0.9)]).step == 20


def test_bounds_are_inclusive_and_configurable():
    assert choose([c(10, 0.3), c(20, 0.5001)]).step == 10
    assert choose([c(10, 0.9), c(20, 1.2)], low=1.0, high=1.5).step == 20


@pytest.mark.parametrize("entropies, nearest, side", [([0.9, 0.7, 0.55], 30, "above"), ([0.25, 0.1], 10, "below")])
def test_none_in_range_names_the_nearest(entropies, nearest, side):
    cands = [c(10 * (i + 1), e) for i, e in enumerate(entropies)]
    with pytest.raises(NoCheckpointInRange) as e:
        choose(cands)
    assert e.value.nearest.step == nearest
    assert f"iter_{nearest:07d}" in str(e.value) and side in str(e.value)


def test_rewards():
    assert last_boxed("a \\boxed{1} then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert last_boxed("cut off \\boxed{12") is None
    assert score_math("so \\boxed{\\frac{1}{2}}", "0.5") == 1.0
    assert score_math("\\boxed{132}", "132") == 1.0 and score_math("\\boxed{131}", "132") == 0.0
    assert score_math("132", "132") == 0.0  # no boxed answer, no reward
    assert score_choice("\\boxed{(c)}", "C") == 1.0 and score_choice("\\boxed{B}", "C") == 0.0
