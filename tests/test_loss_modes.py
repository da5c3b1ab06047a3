"""The loss-mode table: each mode's per-token weight, divisor D, budget filling and bucket count,
read once from the recipe; and D's integer shares over ranks and micro-batches, which Megatron
adds back up to D. Pure Python, no processes."""

import random
from types import SimpleNamespace

import pytest
import torch

from megatron_ring.rl import rl_batch
from megatron_ring.rl.loss_modes import MODES, StepBudget
from megatron_ring.rl.policy_loss import LossConfig, divisor_shares
from megatron_ring.rl.responses import Segment
from megatron_ring.rl.token_budget import fill_buckets
from tests.test_c3po_batching import make


def rl(mode, scope="per_rank", phi=10):
    return SimpleNamespace(loss_mode=mode, budget_scope=scope, token_budget=phi)


def segments():
    """Three responses of 6, 4 and 9 tokens; the 9-token one cut into a prefix of 5 and a rest."""
    a, b, c = make(0, 6), make(1, 4), make(2, 9)
    return [Segment(a), Segment(b), Segment(c, 0, 5), Segment(c, 5, 9)]


@pytest.mark.parametrize("mode, expected", [("c3po", 10 * 4), ("grpo", 3), ("token_mean", 6 + 4 + 9)])
def test_each_mode_has_its_divisor(mode, expected):
    budget = StepBudget.of(rl(mode), dp=4)
    assert budget.divisor(segments()) == expected


def test_c3po_divides_by_the_budget_even_when_fewer_tokens_came():
    assert StepBudget.of(rl("c3po", "global", phi=1000), dp=4).divisor(segments()) == 1000
    assert StepBudget.of(rl("c3po", "per_rank", phi=1000), dp=4).divisor(segments()) == 4000


def test_budget_scope_is_read_once_into_buckets():
    assert (StepBudget.of(rl("c3po", "per_rank"), 4).buckets, StepBudget.of(rl("c3po", "per_rank"), 4).per_rank) == (4, True)
    assert (StepBudget.of(rl("c3po", "global"), 4).buckets, StepBudget.of(rl("c3po", "global"), 4).per_rank) == (1, False)
    for mode in ("grpo", "token_mean"):  # no budget: one bucket of everything, spread over the ranks
        b = StepBudget.of(rl(mode, "per_rank"), 4)
        assert (b.buckets, b.per_rank, b.mode.fills_budget) == (1, False, False)
    assert MODES["c3po"].fills_budget


@pytest.mark.parametrize("mode", sorted(MODES))
def test_per_token_weight_of_each_mode(mode):
    """grpo weighs each token 1/|y| of its whole response (also on a cut segment); the others 1."""
    r = make(0, 8, prompt=2)
    b = rl_batch.build([Segment(r, 2, 6)], pad_id=1, multiple=1, per_response_norm=MODES[mode].per_response_weight)
    w = b.weights[b.weights != 0]
    assert len(w) == 4
    assert torch.allclose(w, torch.full((4,), 1 / 8 if mode == "grpo" else 1.0))


def test_every_mode_explains_its_divisor():
    for m in MODES.values():
        assert "D" in m.why and len(m.why.split()) > 10


@pytest.mark.parametrize("seed", range(20))
def test_divisor_shares_add_up_to_d(seed):
    rng = random.Random(seed)
    d, dp, n = rng.randint(1, 10 ** 6), rng.choice([1, 2, 3, 8]), rng.randint(1, 7)
    shares = [divisor_shares(d, dp, r, n) for r in range(dp)]
    assert all(len(s) == n and all(isinstance(x, int) and x >= 0 for x in s) for s in shares)
    assert sum(map(sum, shares)) == d


def test_divisor_must_be_a_positive_integer():
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError, match="divisor"):
            LossConfig(bad)


def test_per_rank_budget_fills_one_bucket_per_rank():
    budget = StepBudget.of(rl("c3po", "per_rank", phi=7), dp=2)
    buckets, rest = fill_buckets(segments(), budget.tokens, budget.buckets)
    assert [sum(s.n_tokens for s in b) for b in buckets] == [7, 7] and sum(s.n_tokens for s in rest) == 5
