"""Rollout routing replay (R3): the experts the embedded engine chose while sampling are exactly
the ones the training passes use when replayed, at one process and over 2 gloo processes at
TP2/EP2 (sequence-parallel shards, all-to-all dispatch) and with packed rows; with both sides in
fp32 the replayed training forward gives the engine's log-probs; a bf16 sampler is what makes
them differ. Also the routing's path to the trainer (rows, the rank transfer, checkpoints)."""

import numpy as np
import pytest
import torch

from megatron_ring.models.router_replay import UNKNOWN
from megatron_ring.rl import batch_transfer, carried_segments, rl_batch
from megatron_ring.rl.responses import Response, Segment
from tests.conftest import read_json, run_workers


@pytest.mark.parametrize("nproc,tp,ep,max_tokens,bf16", [
    (1, 1, 1, 0, 0),
    (2, 2, 2, 0, 0),
    pytest.param(2, 2, 2, 40, 0, marks=pytest.mark.slow),
    pytest.param(2, 1, 2, 0, 1, marks=pytest.mark.slow),
    (1, 1, 1, 40, 1)],
    ids=["1proc", "tp2ep2", "tp2ep2-packed", "tp1ep2-bf16", "1proc-packed-bf16"])
def test_replayed_routing_is_the_rollouts(tiny_hf, tmp_path, nproc, tp, ep, max_tokens, bf16):
    out = tmp_path / "replay.json"
    run_workers("router_replay", nproc, "--hf", tiny_hf, "--tp", tp, "--ep", ep, "--max-tokens", max_tokens,
                "--bf16", bf16, "--out", out)
    got = read_json(out)
    assert got["tokens"] > 40 and got["known"] > 0
    assert got["exact"], "a replayed forward used other experts than the engine reported"
    assert got["r2_exact"], "the old pass's routing replayed (r2) changed the experts or the log-probs"
    replay, natural = got["metrics"]["replay"], got["metrics"]["natural"]
    assert replay["routing_agreement"] == 1.0 and replay["routing_agreement_min"] == 1.0 == replay["dummy_min"]
    # Without replay the trainer's experts are its own: the routing used is the natural one.
    assert natural["routing_agreement"] == natural["natural_routing_agreement"]
    if not bf16:  # the same numbers on both sides: the routers agree and the logprobs match
        assert natural["natural_routing_agreement"] == 1.0
        assert got["lp_gap"]["replay"] < 2e-4 and replay["prob_error"] < 1e-4
        assert replay["tight_masked_frac"] == 0.0 and replay["is_masked_frac"] == 0.0
    else:  # bf16 sampling: the routers disagree on some (token, layer), the logprobs differ by
        # bf16 rounding, the mismatch metrics see it, and replay removes the routing part of it
        assert natural["natural_routing_agreement"] < 1.0 and natural["routing_agreement_min"] < 1.0
        assert got["lp_gap"]["natural"] > 1e-3 and natural["prob_error"] > 1e-4 and natural["rollout_kl"] > 0
        assert replay["prob_error"] < natural["prob_error"] and replay["rollout_kl"] < natural["rollout_kl"]
        assert 0 < natural["tight_masked_frac"] < 1  # masked IS (sequence level) drops some responses


def _response(uid, p, n, layers=3, k=2, routed=True):
    rng = np.random.default_rng(uid)
    routing = rng.integers(0, 8, (p + n - 1, layers, k)).astype(np.uint8) if routed else None
    return Response(uid, uid, "math", list(range(2, 2 + p)), list(range(10, 10 + n)), [-0.5] * n, routing=routing)


@pytest.mark.parametrize("packed", [False, True])
def test_rows_carry_each_positions_routing(packed):
    """Row i's position t holds the routing of the token read there; the last token of a whole
    response (never read by the engine) and padding are UNKNOWN; a carried remainder keeps the
    routing of its whole context."""
    a, b = _response(1, 3, 5), _response(2, 2, 6)
    segs = [Segment(a), Segment(b, 2, 6)]
    batch = rl_batch.build(segs, 1, 4, per_response_norm=False, packed=packed)
    starts = [0, len(a.prompt_ids) + 5] if packed else [0, 0]
    rows = [0, 0] if packed else [0, 1]
    for seg, row, at in zip(segs, rows, starts):
        r = seg.response
        n = len(r.prompt_ids) + seg.end
        got = batch.routing[row, at:at + n].numpy()
        assert (got[:n - 1] == r.routing[:n - 1]).all()
        assert (got[n - 1] == UNKNOWN).all()
    width = batch.routing.shape[1]
    used = starts[-1] + len(b.prompt_ids) + 6 if packed else len(a.prompt_ids) + 5
    if used < width:
        assert (batch.routing[0, used:] == UNKNOWN).all()


def test_routing_survives_the_rank_transfer_and_a_checkpoint(tmp_path):
    segs = [Segment(_response(1, 3, 5)), Segment(_response(2, 2, 6), 1, 4)]
    rows = rl_batch.rows_of(segs, per_response_norm=False)
    (got,), d = batch_transfer.unpack(batch_transfer.pack([rows], 7))
    assert d == 7 and all((x.routing == y.routing).all() for x, y in zip(got, rows))
    plain = rl_batch.rows_of([Segment(_response(3, 2, 4, routed=False))], per_response_norm=False)
    (back,), _ = batch_transfer.unpack(batch_transfer.pack([plain], 1))
    assert back[0].routing is None
    path = tmp_path / carried_segments.FILE
    path.write_bytes(carried_segments.encode(segs + [Segment(_response(3, 2, 4, routed=False))]))
    again = carried_segments.decode(path)
    assert [(s.start, s.end) for s in again] == [(s.start, s.end) for s in segs] + [(0, 4)]
    assert all(np.array_equal(x.response.routing, y.response.routing) for x, y in zip(again, segs))
    assert again[0].response.routing.dtype == np.uint8 and again[2].response.routing is None


def test_mismatch_metrics_by_hand():
    """d = log pi_train - log pi_rollout = (0.1, -0.2, 0.5 (not live)): gap (0.1 + 0.2) / 2,
    probability error (e^0.1 - 1 + e^0.2 - 1) / 2, k3 KL (e^0.1 - 1.1 + e^-0.2 - 0.8) / 2."""
    import math

    from megatron_ring.rl.policy_loss import mismatch_terms

    t = mismatch_terms(torch.tensor([-1.0, -2.2, -0.5]), torch.tensor([-1.1, -2.0, -1.0]), torch.tensor([1.0, 1.0, 0.0]))
    mean = t.sum(-1) / 2
    assert mean[0].item() == pytest.approx(0.15, abs=1e-6)
    assert mean[1].item() == pytest.approx((math.exp(0.1) + math.exp(0.2) - 2) / 2, abs=1e-6)
    assert mean[2].item() == pytest.approx((math.exp(0.1) - 1.1 + math.exp(-0.2) - 0.8) / 2, abs=1e-6)
    assert (t[:, 2] == 0).all()


def test_agreement_counts_by_hand():
    """Two layers, top-2, three positions with loss, the third's second layer unknown: of the 5
    known (position, layer) pairs the used experts agree on 4, the natural on 3; order within the
    top-k does not count."""
    from megatron_ring.models.router_replay import LayerRouting, ModelRouting

    routing = ModelRouting.__new__(ModelRouting)
    routing.sequence_parallel, routing.topk = False, 2
    routing.layers = [LayerRouting(), LayerRouting()]
    # router token order is [s, b] with b = 1: rows are positions 0..3
    routing.layers[0].used = torch.tensor([[1, 2], [3, 0], [5, 4], [6, 7]])
    routing.layers[0].natural = torch.tensor([[1, 2], [3, 1], [5, 4], [6, 7]])
    routing.layers[1].used = torch.tensor([[2, 1], [0, 3], [4, 5], [6, 7]])
    routing.layers[1].natural = torch.tensor([[2, 1], [0, 2], [4, 5], [6, 7]])
    rollout = torch.tensor([[[[1, 2], [1, 2]], [[0, 3], [0, 4]], [[4, 5], [UNKNOWN, UNKNOWN]], [[6, 7], [6, 7]]]],
                           dtype=torch.uint8)
    mask = torch.tensor([[1, 1, 1, 0]])
    assert routing.agreement(rollout, mask).tolist() == [5, 4, 3]


def test_unknown_rows_are_routed_by_the_router():
    """A target row of UNKNOWN takes the router's own top-k; a known row replaces it, and the
    weights are the router's scores at the replayed experts."""
    from megatron_ring.models.router_replay import LayerRouting

    scores = torch.tensor([[0.1, 0.9, 0.3, 0.2], [0.5, 0.1, 0.2, 0.7]])
    layer = LayerRouting()
    layer.target = torch.tensor([[2, 0], [UNKNOWN, UNKNOWN]])
    probs, idx = layer.get_replay_topk(scores, 2, default_compute_topk=lambda s, k, **_: torch.topk(s, k, dim=1))
    assert idx.tolist() == [[2, 0], [3, 0]]
    assert torch.equal(probs, torch.tensor([[0.3, 0.1], [0.7, 0.5]]))
    assert layer.natural.tolist() == [[1, 2], [3, 0]]
