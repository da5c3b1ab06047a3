"""The rollout fleet with real parts: SGLang-protocol test servers (synthetic mode: seeded
samples with a simulated per-token decode latency) behind the real sglang-router binary, the
asyncio client, rewards streamed into the reward pool, and the control plane between trainer
ranks (a rank waits on the gloo control group, never under the short default timeout, and
receives only its own micro-batches)."""

import os
import signal
import threading

import pytest

from megatron_ring.inference.sampling_params import SamplingParams
from megatron_ring.rewards.reward_pool import RewardPool
from megatron_ring.rl import batch_transfer, rl_batch
from megatron_ring.rl.responses import Response, Segment
from megatron_ring.rollout.base import RolloutError
from megatron_ring.rollout.fleet import Fleet
from megatron_ring.rollout.fleet_client import FleetClient
from megatron_ring.rollout.fleet_plan import FleetPlan
from megatron_ring.rollout.sglang_client import SGLangClient
from megatron_ring.rollout.streamed_rewards import generate_scored
from tests.conftest import read_json, run_workers
from tests.reward_fns import slow_reward
from tests.test_sglang_client import TEST_SERVER

CONTEXT = 512
PARAMS = SamplingParams(max_new_tokens=64, temperature=1.0, seed=5)


def synthetic(latency_s: float, median_len: int = 24) -> list[str]:
    return ["--synthetic-vocab", "1000", "--synthetic-median-len", str(median_len), "--decode-latency-s",
            str(latency_s), "--context-length", str(CONTEXT)]


def start_fleet(tmp_path, engines: int, latency_s: float, median_len: int = 24) -> Fleet:
    plan = FleetPlan(url=None, placement="colocated", engine_tp=1, engines=engines, engines_per_node=engines, hosts=1,
                     base_gpu_ids=list(range(engines)), router=engines > 1, context_length=CONTEXT,
                     server_args=synthetic(latency_s, median_len))
    return Fleet.start(plan, "synthetic-model", tmp_path, command=TEST_SERVER, ready_timeout_s=60)


def prompts(n: int, length: int = 8) -> list[list[int]]:
    return [[2 + (i * 7 + j) % 900 for j in range(length)] for i in range(n)]


def flat(groups):
    return [(c.tokens, c.logprobs, c.finish_reason) for g in groups for c in g]


@pytest.fixture(scope="module")
def fleet3(tmp_path_factory):
    fleet = start_fleet(tmp_path_factory.mktemp("fleet3"), 3, latency_s=0.002)
    yield fleet
    fleet.close()


def test_fleet_starts_engines_behind_the_router(fleet3):
    assert len(fleet3.engines) == 3 and fleet3.router is not None
    assert sorted(fleet3.router.workers()) == sorted(fleet3.engines)
    assert fleet3.url == fleet3.router.url and fleet3.url not in fleet3.engines
    assert sorted(Fleet.connect(fleet3.url).engines) == sorted(fleet3.engines)  # a router given by URL
    assert Fleet.connect(fleet3.engines[0]).engines == [fleet3.engines[0]]  # a server given by URL


def test_every_sample_once_seeded_as_from_one_engine(fleet3):
    """One request per prompt group through the router: the samples are those a single engine
    gives for the same seeds, every one exactly once, in prompt order."""
    ps, keys = prompts(24), list(range(100, 124))
    client = FleetClient(fleet3.url, concurrency=8, context_length=CONTEXT)
    seen = []
    out = client.generate(ps, 4, PARAMS, keys, on_group=lambda i, g: seen.append(i))
    assert sorted(seen) == list(range(24)) and all(len(g) == 4 for g in out)
    direct = SGLangClient(fleet3.engines[1]).generate(ps, 4, PARAMS, keys)
    assert flat(out) == flat(direct)
    assert all(c.tokens and len(c.logprobs) == len(c.tokens) for g in out for c in g)
    assert client.stats["requests"] == 24 * 4 and client.stats["retries"] == 0


def test_requests_clamped_to_the_context(fleet3):
    """max_new_tokens = min(recipe, context - prompt - 1): a long prompt is not refused (the
    server refuses prompt + max_new > context), and one that fills the context is skipped."""
    long_prompt, full = prompts(1, CONTEXT - 20)[0], prompts(1, CONTEXT)[0]
    with pytest.raises(RolloutError, match="refused"):  # what an unclamped request gets
        SGLangClient(fleet3.engines[0]).generate([long_prompt], 1, PARAMS)
    client = FleetClient(fleet3.url, concurrency=4, context_length=CONTEXT)
    out = client.generate([long_prompt, full, prompts(1)[0]], 2, PARAMS, [0, 1, 2])
    assert all(0 < len(c.tokens) <= 19 for c in out[0])
    assert out[1] == [c for c in out[1] if not c.tokens] and len(out[1]) == 2
    assert out[2][0].tokens
    assert client.stats["clamped_rows"] == 2 and client.stats["skipped_prompts"] == 1


def test_rewards_of_early_groups_finish_before_the_last_group(fleet3):
    """Groups are scored as they come back: with 2 requests in flight, generation runs in waves,
    and most rewards are done before the last group is generated."""
    ps = prompts(16)
    client = FleetClient(fleet3.url, concurrency=2, context_length=CONTEXT)
    with RewardPool(2, 30.0, fns={"math": slow_reward}) as pool:
        pool.score([("math", "warm", {})] * 2)  # workers started (in a run: at stage start)
        scored = generate_scored(lambda on_group: client.generate(ps, 2, PARAMS, list(range(16)), on_group),
                                 pool, lambda i, g: [("math", " ".join(map(str, c.tokens)), {}) for c in g])
    assert sorted(scored.rewards) == list(range(16)) and all(len(r) == 2 for r in scored.rewards.values())
    assert scored.overlap_frac > 0.5, scored
    assert scored.scored_s - scored.generated_s < scored.generated_s / 2


def test_engine_killed_mid_round_loses_no_sample(tmp_path):
    """SIGKILL one of three engines while its requests are in flight: every sample still comes
    back exactly once, as seeded (its requests went to the others)."""
    fleet = start_fleet(tmp_path, 3, latency_s=0.02)
    try:
        ps, keys = prompts(18), list(range(18))
        reference = SGLangClient(fleet.engines[0]).generate(ps[:3], 2, PARAMS, keys[:3])
        client = FleetClient(fleet.url, concurrency=6, context_length=CONTEXT, backoff_s=0.1,
                             on_failure=fleet.prune)
        victim = fleet.servers[1]
        killer = threading.Timer(0.5, lambda: os.killpg(victim.proc.pid, signal.SIGKILL))
        killer.start()
        out = client.generate(ps, 2, PARAMS, keys)
        killer.join()
        assert not victim.alive()
        assert all(len(g) == 2 and all(c.tokens for c in g) for g in out)
        assert flat(out[:3]) == flat(reference)
        assert len({tuple(c.tokens) for g in out for c in g}) == 36  # no sample twice
    finally:
        fleet.close()


def test_round_fails_naming_the_engines_when_none_is_left(tmp_path):
    fleet = start_fleet(tmp_path, 2, latency_s=0.0)
    try:
        for server in fleet.servers:
            os.killpg(server.proc.pid, signal.SIGKILL)
            server.proc.wait()
        client = FleetClient(fleet.url, attempts=3, backoff_s=0.05, on_failure=fleet.prune)
        with pytest.raises(RolloutError, match="no rollout engine is left") as e:
            client.generate(prompts(2), 1, PARAMS, [0, 1])
        assert all(url in str(e.value) for url in (s.url for s in fleet.servers))
    finally:
        fleet.close()


def test_packed_rows_rebuild_the_same_batch():
    """What a rank receives (flat tensors) rebuilds exactly the micro-batch rank 0 planned."""
    r1 = Response(1, 0, "math", [5, 6, 7], [8, 9, 10, 11], [-0.1, -0.2, -0.3, -0.4], advantage=0.5)
    r2 = Response(2, 0, "math", [5, 6], [12, 13, 14], [-1.0, -2.0, -3.0], advantage=-1.5)
    mbs = [[Segment(r1, 1, 3), Segment(r2)], []]
    rows = [rl_batch.rows_of(mb, per_response_norm=True) for mb in mbs]
    back, divisor = batch_transfer.unpack(batch_transfer.pack(rows, 11))
    assert divisor == 11 and [[r.ids for r in mb] for mb in back] == [[r.ids for r in mb] for mb in rows]
    for mb, got in zip(mbs, back):
        want, have = rl_batch.build(mb, 1, 4, True), rl_batch.from_rows(got, 1, 4)
        for field in ("input_ids", "labels", "weights", "advantages", "rollout_logp"):
            assert getattr(have, field).equal(getattr(want, field)), field


@pytest.mark.slow  # torchrun, 2 processes, twice
def test_ranks_wait_on_the_control_group_and_get_only_their_rows(tmp_path, monkeypatch):
    """The default group's timeout is 3 s; rank 0 works 6 s while rank 1 waits: the wait is on
    the control group (its own timeout) and survives; with a control timeout of 2 s it fails.
    Then each data-parallel rank receives its own rows only."""
    monkeypatch.setenv("MEGATRON_RING_COLLECTIVE_TIMEOUT_S", "3")
    run_workers("control_plane", 2, tmp_path, 6, 120)
    got = [read_json(tmp_path / f"rank{r}.json") for r in range(2)]
    assert all(g["waited_s"] >= 5.5 and g["divisor"] == 7 and g["dp_of"] == [0, 1] for g in got)
    for d, g in enumerate(got):
        assert g["mine"] == [[{"ids": [1, 2, 3 + d, 4], "lo": 1, "hi": 3, "weight": 0.5, "advantage": 1.0 + d,
                               "logp": [-0.25, -0.5 - d], "routing": None}], []]
    short = tmp_path / "short"
    short.mkdir()
    with pytest.raises(pytest.fail.Exception, match="Timed out"):
        run_workers("control_plane", 2, short, 6, 2)
    assert not any(short.iterdir())
