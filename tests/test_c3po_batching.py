"""GRPO advantages, the C3PO token budget (cut exactness, carry, per-rank buckets), rank balance
and the micro-batch tensors: pure Python, no processes."""

import math
import random

import pytest
import torch

from megatron_ring.ops.c3po_objective import C3POCoefficients, c3po_objective
from megatron_ring.rl import rank_balance, rl_batch
from megatron_ring.rl.advantages import drop_zero_variance, group_advantages
from megatron_ring.rl.responses import Response, Segment
from megatron_ring.rl.token_budget import assert_partition, fill_buckets, tokens_of


def make(uid, n_tokens, group=0, reward=0.0, prompt=3):
    return Response(uid, group, "math", list(range(100, 100 + prompt)), list(range(n_tokens)),
                    [-0.1 * (i + 1) for i in range(n_tokens)], reward=reward)


def test_group_advantages_normalise_within_each_group():
    rs = [make(0, 4, 0, 1.0), make(1, 4, 0, 0.0), make(2, 4, 0, 0.0), make(3, 4, 0, 1.0),
          make(4, 4, 1, 1.0), make(5, 4, 1, 1.0)]
    stds = group_advantages(rs)
    assert [round(r.advantage, 4) for r in rs[:4]] == [1.0, -1.0, -1.0, 1.0]  # mean .5, std .5
    assert rs[4].advantage == rs[5].advantage == 0.0
    assert stds == {0: 0.5, 1: 0.0}
    assert [r.uid for r in drop_zero_variance(rs, stds)] == [0, 1, 2, 3]


def test_budget_takes_whole_responses_and_cuts_the_crossing_one():
    segs = [Segment(make(i, n)) for i, n in enumerate([5, 7, 6, 9])]
    (bucket,), rest = fill_buckets(segs, 15)
    assert tokens_of(bucket) == 15
    assert [(s.response.uid, s.start, s.end) for s in bucket] == [(0, 0, 5), (1, 0, 7), (2, 0, 3)]
    assert [(s.response.uid, s.start, s.end) for s in rest] == [(2, 3, 6), (3, 0, 9)]
    # The carried remainder is consumed first next step; nothing counted twice across steps.
    (nxt,), rest2 = fill_buckets(rest, 15)
    assert [(s.response.uid, s.start, s.end) for s in nxt] == [(2, 3, 6), (3, 0, 9)] and rest2 == []
    assert_partition(segs, bucket + nxt)


@pytest.mark.parametrize("seed", range(20))
def test_budget_is_exact_for_random_lengths(seed):
    rng = random.Random(seed)
    segs = [Segment(make(i, rng.randint(1, 40))) for i in range(rng.randint(5, 40))]
    budget, n = rng.randint(1, 120), rng.choice([1, 2, 4])
    buckets, rest = fill_buckets(segs, budget, n)
    total = tokens_of(segs)
    full = min(n, total // budget)
    assert all(tokens_of(b) == budget for b in buckets[:full])  # exactly Phi while data lasts
    assert tokens_of([s for b in buckets for s in b]) == min(total, budget * n)
    assert_partition(segs, [s for b in buckets for s in b] + rest)


def test_partition_check_catches_a_lost_or_doubled_token():
    segs = [Segment(make(0, 10))]
    with pytest.raises(AssertionError):
        assert_partition(segs, [Segment(segs[0].response, 0, 9)])
    with pytest.raises(AssertionError):
        assert_partition(segs, [Segment(segs[0].response, 0, 6), Segment(segs[0].response, 5, 10)])


@pytest.mark.parametrize("seed", range(10))
def test_rank_balance_equal_micro_batch_counts_and_every_segment_once(seed):
    rng = random.Random(seed)
    segs = [Segment(make(i, rng.randint(1, 50))) for i in range(rng.randint(1, 30))]
    dp, mb = rng.choice([1, 2, 4]), rng.choice([1, 2, 3])
    plan = rank_balance.plan([segs], dp, mb, per_rank=False)
    assert len(plan) == dp and len({len(p) for p in plan}) == 1
    flat = [s for p in plan for m in p for s in m]
    assert sorted(s.response.uid for s in flat) == sorted(s.response.uid for s in segs)
    assert all(len(m) <= mb for p in plan for m in p)
    counts = [sum(len(m) for m in p) for p in plan]
    assert max(counts) - min(counts) <= 1
    loads = [sum(s.seq_len for m in p for s in m) for p in plan]
    if len(segs) >= 4 * dp:  # longest-first greedy keeps loads within the longest segment
        assert max(loads) - min(loads) <= max(s.seq_len for s in segs)


def test_per_rank_buckets_stay_on_their_rank():
    segs = [Segment(make(i, 10)) for i in range(6)]
    buckets, _ = fill_buckets(segs, 25, 2)
    plan = rank_balance.plan(buckets, 2, 2, per_rank=True)
    assert [tokens_of([s for m in p for s in m]) for p in plan] == [25, 25]


def test_micro_batch_tensors_put_loss_on_the_segment_only():
    r = make(7, 6, prompt=3)
    r.advantage = 0.5
    b = rl_batch.build([Segment(r, 2, 5)], pad_id=1, multiple=4, per_response_norm=False)
    assert b.input_ids.shape == (1, 12)  # 3 + 5 tokens + 1, rounded up to a multiple of 4
    w = b.weights[0]
    # position t predicts token t+1: response token j sits at 3+j, predicted from 2+j.
    assert w.nonzero().flatten().tolist() == [4, 5, 6]
    assert b.labels[0, 4:7].tolist() == r.tokens[2:5]
    assert torch.allclose(b.rollout_logp[0, 4:7], torch.tensor(r.rollout_logp[2:5]))
    assert b.advantages[0, 4:7].tolist() == [0.5] * 3 and b.advantages[0, :4].abs().sum() == 0
    g = rl_batch.build([Segment(r)], pad_id=1, multiple=1, per_response_norm=True)
    assert torch.allclose(g.weights.sum(), torch.tensor(1.0))  # GRPO: 1/|y| on each of |y| tokens
    dummy = rl_batch.build([], pad_id=1, multiple=2, per_response_norm=False)
    assert not dummy.weights.any() and dummy.input_ids.shape == (1, 2)


def test_truncated_importance_weights():
    """Each live token's weight is multiplied by min(exp(old - rollout), cap); with no old pass
    (one PPO epoch) the current logprobs are the old ones."""
    logp = torch.tensor([-1.0, -1.0, -1.0, -1.0], requires_grad=True)
    rollout = torch.tensor([-1.0, -6.0, 0.0, -9.0])
    adv, mask = torch.ones(4), torch.tensor([1.0, 1.0, 1.0, 0.0])
    coef = C3POCoefficients(1.0, 0.2, 0.2)
    for old in (None, logp.detach().clone()):
        out = c3po_objective(logp, torch.zeros(4), adv, mask, old, None, coef, rollout, tis_cap=2.0)
        (grad,) = torch.autograd.grad(out.loss, logp)
        # on-policy ratio 1: d loss / d logp_t = -w_t * A_t, w_t = min(exp(-1 - rollout_t), 2)
        assert torch.allclose(grad, -torch.tensor([1.0, 2.0, math.exp(-1.0), 0.0]))
        assert torch.equal(out.ratio, torch.ones(4))


def test_token_sized_micro_batches_pack_segments_into_one_row():
    segs = [Segment(make(i, n, prompt=2)) for i, n in enumerate([9, 3, 5, 2, 14])]
    plan = rank_balance.plan([segs], 2, 1, per_rank=False, max_tokens=12)
    assert len({len(p) for p in plan}) == 1
    mbs = [m for p in plan for m in p if m]
    assert sorted(s.response.uid for m in mbs for s in m) == list(range(5))
    # within the cap, except a segment longer than it (16 tokens), alone
    assert all(sum(s.seq_len for s in m) <= 12 or len(m) == 1 for m in mbs)
    both = [m for m in mbs if len(m) > 1][0]
    b = rl_batch.build(both, pad_id=1, multiple=4, per_response_norm=False, packed=True)
    one = [rl_batch.build([s], pad_id=1, multiple=1, per_response_norm=False) for s in both]
    assert b.input_ids.shape[0] == 1 and b.input_ids.shape[1] % 4 == 0
    at = 0
    for d, (seg, o) in enumerate(zip(both, one)):
        n = seg.seq_len
        assert b.input_ids[0, at:at + n].tolist() == o.input_ids[0, :n].tolist()
        assert b.labels[0, at:at + n - 1].tolist() == o.labels[0, :n - 1].tolist()
        assert b.position_ids[0, at:at + n].tolist() == list(range(n))
        assert (b.doc_ids[0, at:at + n] == d).all()
        assert torch.equal(b.weights[0, at:at + n], o.weights[0, :n])
        assert torch.equal(b.rollout_logp[0, at:at + n], o.rollout_logp[0, :n])
        at += n
    assert (b.doc_ids[0, at:] == -1).all() and b.weights[0, at:].abs().sum() == 0