"""The real sglang-router (rollout/router.py) in front of synthetic test servers
(tests/sglang_test_server.py --synthetic-vocab), and the synthetic mode itself (in process).

One router and three servers are shared by the module; a test that changes the worker list
puts it back. Each server is started with its own --model-path, which its answers report
(meta_info.model_path), so a test can tell which server answered."""

import os
import signal
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

import pytest

from megatron_ring.platform.distributed import free_port
from megatron_ring.rollout.base import RolloutError
from megatron_ring.rollout.router import Router, router_argv, version
from megatron_ring.rollout.sglang_client import SGLangClient
from megatron_ring.rollout.sglang_server import launch
from tests.sglang_test_server import BadRequest, State, SyntheticModel, handle

TEST_SERVER = (sys.executable, str(Path(__file__).with_name("sglang_test_server.py")))
LATENCY_S = 0.002  # per decoded token: a 500-token answer takes 1 s
SYNTHETIC = ["--synthetic-vocab", "1000", "--decode-latency-s", str(LATENCY_S), "--base-gpu-id", "3"]


def start_server(name, tmp, extra=()):
    return launch(f"/models/{name}", tmp / f"{name}.log", free_port(), command=TEST_SERVER,
                  extra_args=[*SYNTHETIC, *extra], ready_timeout_s=30)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("router")
    servers, router = [], None
    try:
        servers = [start_server(f"s{i}", tmp) for i in range(3)]
        router = Router.start([s.url for s in servers], tmp / "router.log", ready_timeout_s=60)
        yield {"router": router, "servers": servers, "tmp": tmp,
               "client": SGLangClient(router.url, attempts=1)}
    finally:
        if router is not None:
            router.stop()
        for s in servers:
            s.stop()


def served_by(client, n=3, max_new=3, seed=None):
    """Which server (model path) answered each of n sequential one-row requests."""
    sp = {"max_new_tokens": max_new, **({} if seed is None else {"sampling_seed": seed})}
    return [client.request("POST", "/generate", {"input_ids": [5, 6], "sampling_params": sp},
                           retry=False)["meta_info"]["model_path"] for _ in range(n)]


def test_registers_all_workers_and_routes_round_robin(fleet):
    router, servers = fleet["router"], fleet["servers"]
    assert sorted(router.workers()) == sorted(s.url for s in servers)
    assert sorted(router.workers(healthy_only=True)) == sorted(s.url for s in servers)
    got = served_by(fleet["client"], n=6)
    assert sorted(got) == sorted([f"/models/s{i}" for i in range(3)] * 2)
    assert got[:3] == got[3:] and len(set(got[:3])) == 3  # a fixed cycle over all three
    assert version().startswith("0.")


def test_refusal_passes_through_the_router(fleet):
    """A row that does not fit the context: SGLang's 400 and wording, not retried elsewhere."""
    body = {"input_ids": [5, 6, 7], "sampling_params": {"max_new_tokens": 32765}}
    with pytest.raises(RolloutError, match=r"refused: HTTP 400.*maximum context length of 32768 tokens"
                                           r".*total of 32768 tokens: 3 tokens .* 32765 tokens"):
        fleet["client"].request("POST", "/generate", body, retry=False)


def test_remove_and_add_worker(fleet):
    router, victim = fleet["router"], fleet["servers"][2]
    router.remove_worker(victim.url)
    try:
        assert victim.url not in router.workers()
        assert "/models/s2" not in served_by(fleet["client"], n=4)
        router.remove_worker(victim.url)  # not registered: nothing to do
    finally:
        router.add_worker(victim.url)
    assert sorted(router.workers()) == sorted(s.url for s in fleet["servers"])
    router.add_worker(victim.url)  # registered already: nothing to do
    assert len(router.workers()) == 3
    assert "/models/s2" in served_by(fleet["client"], n=3)


def test_sigkilled_worker_costs_no_request(fleet):
    """What the fleet relies on: requests in flight on a worker that is SIGKILLed are retried on
    another worker (the client sees only 200s), later ones are not sent to it, and it is
    reported unhealthy within seconds (then the fleet removes it)."""
    router, client = fleet["router"], fleet["client"]
    victim = start_server("victim", fleet["tmp"])
    router.add_worker(victim.url)
    try:
        results, threads = [], []

        def one():  # 500 tokens: 1 s
            body = {"input_ids": [5, 6], "sampling_params": {"max_new_tokens": 500, "ignore_eos": True}}
            try:
                results.append(client.request("POST", "/generate", body, retry=False)["meta_info"]["model_path"])
            except RolloutError as e:
                results.append(e)

        for _ in range(8):  # two on each of the four workers
            threads.append(threading.Thread(target=one))
            threads[-1].start()
        time.sleep(0.4)
        os.killpg(victim.proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        for t in threads:
            t.join(30)
        assert len(results) == 8 and not [r for r in results if not isinstance(r, str)], results
        assert "/models/victim" not in results  # its two were answered by the others
        assert "/models/victim" not in served_by(client, n=6)
        while victim.url in router.workers(healthy_only=True):
            assert time.monotonic() - killed < 10, "the router still reports the dead worker healthy"
            time.sleep(0.2)
        assert victim.url in router.workers()  # listed until removed
    finally:
        router.remove_worker(victim.url)
        victim.stop()
    assert sorted(router.workers()) == sorted(s.url for s in fleet["servers"])


@pytest.mark.slow  # a router of its own that fails to start: ~4 s
def test_start_failure_names_the_router_and_its_log(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RolloutError, match=rf"(?s)sglang-router http://127\.0\.0\.1:{port} exited with code .*router\.log "
                                               r"ends with:.*Address already in use"):
            Router.start([], tmp_path / "router.log", port=port, ready_timeout_s=30)


def test_router_argv():
    argv = router_argv(["http://a:1", "http://b:2"], "127.0.0.1", 30000, extra_args=["--log-level", "info"])
    assert argv[argv.index("--worker-urls") + 1:argv.index("--worker-urls") + 3] == ["http://a:1", "http://b:2"]
    assert argv[argv.index("--retry-max-retries") + 1] == "3"
    assert argv[argv.index("--prometheus-port") + 1] != "29000"  # a second router would panic on it
    assert argv[-2:] == ["--log-level", "info"]  # extra_args come last: argparse lets them win


# -- the synthetic mode of the test server, in process ------------------------------------------

def synthetic(**kw):
    return State(SyntheticModel("/models/syn", vocab=1000, eos=1, median_len=200, sigma=0.8),
                 context_length=kw.pop("context_length", 32768), **kw)


def generate(state, rows, max_new, seed0=0):
    body = {"input_ids": [[7, 8, 9]] * rows, "return_logprob": True,
            "sampling_params": [{"max_new_tokens": max_new, "sampling_seed": seed0 + i} for i in range(rows)]}
    status, answer = handle(state, "POST", "/generate", body)
    assert status == 200
    return answer


def test_synthetic_rows_are_seeded_and_well_formed():
    state = synthetic()
    a, b = generate(state, 300, 400), generate(state, 300, 400)
    strip = [(r["output_ids"], r["meta_info"]["output_token_logprobs"], r["meta_info"]["finish_reason"]) for r in a]
    assert strip == [(r["output_ids"], r["meta_info"]["output_token_logprobs"],
                      r["meta_info"]["finish_reason"]) for r in b]  # bit for bit
    lengths = []
    for r in a:
        ids, meta = r["output_ids"], r["meta_info"]
        lengths.append(len(ids))
        assert [t for _, t, _ in meta["output_token_logprobs"]] == ids
        assert all(-5.0 <= lp < 0.0 for lp, _, _ in meta["output_token_logprobs"])
        if meta["finish_reason"]["type"] == "stop":
            assert len(ids) < 400 and ids[-1] == 1 == meta["finish_reason"]["matched"]
            assert all(2 <= t < 1000 for t in ids[:-1])
        else:
            assert meta["finish_reason"] == {"type": "length", "length": 400} and len(ids) == 400
            assert all(2 <= t < 1000 for t in ids)
        assert meta["model_path"] == "/models/syn" and meta["completion_tokens"] == len(ids)
    # lognormal, median 200, sigma 0.8: P(len >= 400) = 19%; the sample median of 300 is
    # within 15% of 200 at 4 standard errors
    assert 170 < statistics.median(lengths) < 235
    assert 0.1 < sum(n == 400 for n in lengths) / 300 < 0.3
    short = generate(state, 300, 20)  # the same seeds, capped lower: a prefix of each row
    for r, s in zip(a, short):
        assert r["output_ids"][:len(s["output_ids"])][:-1] == s["output_ids"][:-1]


def test_synthetic_info_context_and_weight_updates():
    state = synthetic(context_length=64, max_running_requests=8)
    assert handle(state, "GET", "/server_info", {}) == (200, {
        "tp_size": 1, "dp_size": 1, "model_path": "/models/syn", "context_length": 64,
        "max_running_requests": 8})
    assert handle(state, "GET", "/get_server_info", {})[1]["context_length"] == 64
    info = handle(state, "GET", "/model_info", {})[1]
    assert info["is_generation"] is True and info["tp_size"] == info["dp_size"] == 1
    generate(state, 1, 60)  # 3 + 60 < 64
    with pytest.raises(BadRequest, match="maximum context length of 64 tokens.*total of 64 tokens: "
                                         "3 tokens from the input messages and 61 tokens"):
        generate(state, 1, 61)  # SGLang refuses prompt + max_new_tokens >= context length
    status, answer = handle(state, "POST", "/update_weights_from_disk",
                            {"model_path": "/nowhere", "weight_version": "7"})
    assert status == 200 and answer["success"]
    assert generate(state, 1, 5)[0]["meta_info"]["weight_version"] == "7"


def test_decode_latency_and_running_capacity():
    """Rows of a request decode together (max length x latency); requests overlap up to
    max_running_requests rows; a request larger than that runs alone."""
    state = synthetic(decode_latency_s=0.01, max_running_requests=4)
    body = {"input_ids": [[7, 8]] * 2, "sampling_params": {"max_new_tokens": 30, "ignore_eos": True}}

    def timed(bodies):
        t0 = time.monotonic()
        threads = [threading.Thread(target=handle, args=(state, "POST", "/generate", b)) for b in bodies]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return time.monotonic() - t0

    assert 0.29 < timed([body]) < 0.55  # 30 tokens x 10 ms
    assert timed([body, body]) < 0.55  # 4 rows fit together
    assert 0.59 < timed([body, body, body]) < 1.0  # the third waits for a slot
    big = {**body, "input_ids": [[7, 8]] * 6}
    assert 0.59 < timed([big, body]) < 1.0  # 6 rows > 4: alone, then the other
    assert state.running == 0
