"""The SGLang client, launcher and weight push against tests/sglang_test_server.py, a stand-in
that serves the model with the plain-PyTorch reference forward and really applies pushed
weights; plus a live test against a real SGLang server where sglang is installed."""

import importlib.util
import json
import os
import signal
import sys
import threading
import warnings
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from megatron_ring.platform.distributed import free_port
from megatron_ring.inference.sampling_params import SamplingParams
from megatron_ring.rollout.base import RolloutError
from megatron_ring.rollout.sglang_client import SGLangClient, parse_generate, sampling_seed
from megatron_ring.rollout.sglang_engine import SGLangEngine
from megatron_ring.rollout.sglang_server import launch
from megatron_ring.rollout.weight_buckets import Bucket
from megatron_ring.rollout.weight_sync import WeightGroup, push_from_disk
from tests.conftest import write_random_hf
from tests.hf_reference import hf_forward

TEST_SERVER = (sys.executable, str(Path(__file__).with_name("sglang_test_server.py")))
PROMPTS = [[5, 17, 42, 7], [300, 2, 9], [77]]


def read_hf(path):
    config = json.loads((Path(path) / "config.json").read_text())
    sd = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return config, sd


def reference_logprobs(sd, config, prompt, tokens, temperature):
    """The logprob of each sampled token under the reference forward (after temperature)."""
    logits = hf_forward(sd, config, torch.tensor([prompt + tokens]))[0]
    logits = logits[len(prompt) - 1:len(prompt) - 1 + len(tokens)]
    logp = torch.log_softmax(logits / temperature if temperature > 1e-5 else logits, -1)
    return logp.gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)


def assert_served(client, weights, temperature=1.0, seed=0):
    """Samples of the server have the logprobs of `weights` (config, state dict)."""
    config, sd = weights
    params = SamplingParams(max_new_tokens=5, temperature=temperature, seed=seed)
    out = client.generate(PROMPTS, 2, params, keys=[10, 11, 12])
    for prompt, samples in zip(PROMPTS, out):
        for c in samples:
            ref = reference_logprobs(sd, config, prompt, c.tokens, temperature)
            torch.testing.assert_close(torch.tensor(c.logprobs), ref, rtol=0, atol=2e-4)
    return out


@pytest.fixture(scope="module")
def served(tiny_hf, tmp_path_factory):
    """A test server on tiny_hf; `weights` is what it serves now (tests that push update it)."""
    log = tmp_path_factory.mktemp("sglang_run") / "sglang_server.log"
    server = launch(tiny_hf, log, free_port(), command=TEST_SERVER, ready_timeout_s=60)
    state = {"server": server, "client": SGLangClient(server.url, attempts=2, backoff_s=0.05),
             "weights": read_hf(tiny_hf)}
    yield state
    server.stop()


def test_generate_fields_shapes_and_logprobs(served, tiny_arch):
    client = served["client"]
    out = assert_served(client, served["weights"])
    assert [len(s) for s in out] == [2, 2, 2]
    for samples in out:
        for c in samples:
            assert c.finish_reason in ("stop", "length")
            assert len(c.tokens) == len(c.logprobs) and 1 <= len(c.tokens) <= 5
            assert all(0 <= t < tiny_arch.vocab_size for t in c.tokens)
            if c.finish_reason == "length":
                assert len(c.tokens) == 5
    # Seeded per (seed, key, sample): reproducible, and the two samples of a prompt differ.
    assert assert_served(client, served["weights"]) == out
    assert all(s[0].tokens != s[1].tokens for s in out)
    assert assert_served(client, served["weights"], seed=1) != out
    assert_served(client, served["weights"], temperature=0.7)  # logprobs after temperature


def test_greedy_and_stop_tokens(served):
    client = served["client"]
    config, sd = served["weights"]
    greedy = SamplingParams(max_new_tokens=6, temperature=0.0)
    c = client.generate([PROMPTS[0]], 1, greedy)[0][0]
    seq = list(PROMPTS[0])
    for _ in range(6):  # the reference's own greedy continuation
        seq.append(int(hf_forward(sd, config, torch.tensor([seq]))[0, -1].argmax()))
    assert c.tokens == seq[len(PROMPTS[0]):] and c.finish_reason == "length"
    torch.testing.assert_close(torch.tensor(c.logprobs),
                               reference_logprobs(sd, config, PROMPTS[0], c.tokens, 0.0), rtol=0, atol=2e-4)
    stop = client.generate([PROMPTS[0]], 1, greedy, stop_token_ids=[c.tokens[2]])[0][0]
    assert stop.finish_reason == "stop" and stop.tokens == c.tokens[:3]


def test_push_weights_from_disk(served, tiny_arch, tmp_path):
    client = served["client"]
    new = write_random_hf(tmp_path / "step5", tiny_arch, seed=2)
    before = client.generate(PROMPTS, 1, SamplingParams(max_new_tokens=3), keys=[0, 1, 2])
    push_from_disk(client, new, version=5)
    served["weights"] = read_hf(new)
    assert client.model_info()["weight_version"] == "5"
    after = assert_served(client, served["weights"])
    assert before != client.generate(PROMPTS, 1, SamplingParams(max_new_tokens=3), keys=[0, 1, 2])
    assert after


def flat_buckets(named, bucket_bytes: int) -> list[Bucket]:
    """bf16 buckets of about bucket_bytes, in order."""
    out, current = [], []
    for name, t in named:
        current.append((name, t.bfloat16()))
        if sum(x.numel() * 2 for _, x in current) >= bucket_bytes:
            out.append(Bucket.of(current))
            current = []
    return out + ([Bucket.of(current)] if current else [])


def test_push_weights_by_broadcast_in_buckets(served, tiny_arch, tmp_path):
    client = served["client"]
    config, sd = read_hf(write_random_hf(tmp_path / "step6", tiny_arch, seed=3))
    named = sorted(sd.items())
    assert len(flat_buckets(named, 200_000)) > 3  # several HTTP calls, one broadcast each
    sender = WeightGroup([(client.url, 1)], "127.0.0.1", backend="gloo", timeout_s=60)
    try:
        sent = sender.push(flat_buckets(named, 200_000), version=6)
        assert sent["bytes"] == sum(v.numel() * 2 for v in sd.values())
        served["weights"] = (config, {k: v.bfloat16().float() for k, v in sd.items()})
        assert client.model_info()["weight_version"] == "6"
        assert_served(client, served["weights"])
        # The group stays up: a second push reuses it.
        doubled = [(k, v * 2 if k.endswith("lm_head.weight") else v) for k, v in named]
        sender.push(flat_buckets(doubled, 200_000), version=7)
        assert sender.generation == 1
        served["weights"] = (config, {k: v.bfloat16().float() for k, v in doubled})
        assert_served(client, served["weights"])
    finally:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # the server must have left the group
            sender.close()
    with pytest.raises(RolloutError, match="/update_weights_from_distributed.*begin_weight_update"):
        client.update_weights_from_distributed(["lm_head.weight"], ["float32"], [[1000, 128]])


def test_refused_group_join_fails_fast(served):
    import time

    client = served["client"]
    first = WeightGroup([(client.url, 1)], "127.0.0.1", timeout_s=60)
    first.connect()
    try:
        second = WeightGroup([(client.url, 1)], "127.0.0.1", timeout_s=5)
        start = time.monotonic()
        with pytest.raises(RolloutError, match="init_weights_update_group refused: HTTP 400.*already exists"):
            second.connect()  # the server answers at once; rank 0 must not wait out its rendezvous
        assert time.monotonic() - start < 4
        time.sleep(6)  # rank 0's side of the refused group gives up now, not while the process exits
    finally:
        first.close()


def test_bad_disk_path_is_refused_and_server_survives(served, tmp_path):
    client = served["client"]
    with pytest.raises(RolloutError, match=r"/update_weights_from_disk refused: HTTP 400.*no config.json"):
        client.update_weights_from_disk(tmp_path / "missing", version=9)
    assert client.health()
    assert_served(client, served["weights"])


def test_engine_generate_single_process(served, tmp_path):
    engine = SGLangEngine.connect(served["server"].url, weights_dir=tmp_path / "rollout_weights")
    assert engine.health()
    out = engine.generate(PROMPTS, 2, SamplingParams(max_new_tokens=5), keys=[10, 11, 12])
    assert out == assert_served(served["client"], served["weights"])


def test_dead_server_raises_naming_the_url(tiny_hf, tmp_path):
    server = launch(tiny_hf, tmp_path / "log", free_port(), command=TEST_SERVER, ready_timeout_s=60)
    client = SGLangClient(server.url, attempts=3, backoff_s=0.01)
    os.killpg(server.proc.pid, signal.SIGKILL)
    server.stop()
    assert not client.health()
    with pytest.raises(RolloutError, match=rf"POST {server.url}/generate failed after 3 attempt\(s\): cannot connect"):
        client.generate(PROMPTS, 1, SamplingParams(max_new_tokens=2))
    engine = SGLangEngine(client, weights_dir=tmp_path / "w")
    with pytest.raises(RolloutError, match=server.url):
        engine.generate(PROMPTS, 1, SamplingParams(max_new_tokens=2))


def test_waiting_for_a_server_given_by_url(served):
    """A dedicated server may still be loading when the trainer starts: the wait returns once
    /health answers, and gives up naming the URL and the recipe key."""
    served["client"].wait_healthy(5.0)
    silent = SGLangClient(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(RolloutError, match=r"127\.0\.0\.1:\d+: not healthy after 0\.3 s \(rollout\.ready_timeout_s\)"):
        silent.wait_healthy(0.3, poll_s=0.05)


def test_server_that_cannot_start_reports_its_log(tmp_path):
    with pytest.raises(RolloutError, match=r"(?s)exited with code 1 .*no config.json"):
        launch(tmp_path / "nothing", tmp_path / "log", free_port(), command=TEST_SERVER, ready_timeout_s=60)


# -- malformed answers -----------------------------------------------------------------------

def good(tokens=(4, 5), finish=None):
    return {"text": "", "output_ids": list(tokens),
            "meta_info": {"finish_reason": finish or {"type": "length", "length": len(tokens)},
                          "output_token_logprobs": [[-1.5, t, None] for t in tokens]}}


def broken(edit):
    item = good()
    edit(item)
    return item


MALFORMED = {
    "not a list": ({"output_ids": []}, "expected a list of 1 results"),
    "missing output_ids": (broken(lambda i: i.pop("output_ids")), "missing field output_ids"),
    "missing logprobs": (broken(lambda i: i["meta_info"].pop("output_token_logprobs")),
                         "missing field meta_info.output_token_logprobs"),
    "count mismatch": (broken(lambda i: i["meta_info"]["output_token_logprobs"].pop()),
                       "output_token_logprobs has 1 entries for 2 output_ids"),
    "token mismatch": (broken(lambda i: i["meta_info"]["output_token_logprobs"][1].__setitem__(1, 9)),
                       r"output_token_logprobs\[1\]\[1\] is token 9 but output_ids\[1\] is 5"),
    "null logprob": (broken(lambda i: i["meta_info"]["output_token_logprobs"][0].__setitem__(0, None)),
                     r"output_token_logprobs\[0\]\[0\] \(logprob\) is None"),
    "no finish reason": (broken(lambda i: i["meta_info"].pop("finish_reason")), "meta_info.finish_reason"),
    "abort": (good(finish={"type": "abort", "message": "out of memory", "status_code": 500}),
              "aborted the request.*out of memory"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_answer_names_the_field(case):
    body, message = MALFORMED[case]
    answer = body if case == "not a list" else [body]
    with pytest.raises(RolloutError, match=message):
        parse_generate(answer, 1, "http://x/generate")


class FakeServer:
    """Answers each POST with the next (status, body) of a script, then repeats the last; a
    callable body is called with the request's JSON. Every request's JSON is kept in `bodies`."""

    def __init__(self, script):
        self.script, self.calls, self.bodies = list(script), 0, []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                request = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or "null")
                fake.bodies.append(request)
                status, body = fake.script[min(fake.calls, len(fake.script) - 1)]
                fake.calls += 1
                if callable(body):
                    body = body(request)
                raw = body.encode() if isinstance(body, str) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, args=(0.02,), daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def test_http_answers_retried_refused_or_malformed():
    params = SamplingParams(max_new_tokens=2)
    cases = [  # (script, expected error or None, calls)
        ([(503, "starting"), (200, [good(), good()])], None, 2),  # 5xx is retried
        ([(500, {"error": {"message": "boom"}})], r"failed after 3 attempt\(s\): HTTP 500.*boom", 3),
        ([(400, {"error": {"message": "bad sampling_params"}})], "refused: HTTP 400.*bad sampling_params", 1),
        ([(200, "<html>not json</html>")], "expected a list of 2 results, got str", 1),
        ([(200, [good(), broken(lambda i: i["meta_info"].pop("output_token_logprobs"))])],
         r"result\[1\]: missing field meta_info.output_token_logprobs", 1),
    ]
    for script, error, calls in cases:
        fake = FakeServer(script)
        client = SGLangClient(fake.url, attempts=3, backoff_s=0.01)
        try:
            if error is None:
                out = client.generate([[1, 2]], 2, params, keys=[3])
                assert [c.tokens for c in out[0]] == [[4, 5], [4, 5]]
            else:
                with pytest.raises(RolloutError, match=error) as e:
                    client.generate([[1, 2]], 2, params, keys=[3])
                assert f"{fake.url}/generate" in str(e.value)
            assert fake.calls == calls
        finally:
            fake.close()


def test_sampling_seeds_are_distinct_per_sample_and_key():
    seeds = {sampling_seed(s, k, j) for s in range(3) for k in range(50) for j in range(8)}
    assert len(seeds) == 3 * 50 * 8 and all(0 <= x < 2**31 for x in seeds)


# -- a real SGLang server --------------------------------------------------------------------

@pytest.mark.skipif(importlib.util.find_spec("sglang") is None, reason="sglang not installed")
def test_live_sglang_server(tiny_hf, tiny_arch, tmp_path):
    extra = ["--skip-tokenizer-init", "--dtype", "float32", "--max-total-tokens", "4096",
             "--mem-fraction-static", "0.1", "--skip-server-warmup"]
    env = None
    if not torch.cuda.is_available():  # the CPU settings the notes record
        extra += ["--device", "cpu", "--attention-backend", "torch_native",
                  "--sampling-backend", "pytorch", "--disable-cuda-graph"]
        env = {"SGLANG_USE_CPU_ENGINE": "1"}
    server = launch(tiny_hf, tmp_path / "sglang.log", free_port(), extra_args=extra, env=env,
                    ready_timeout_s=600)
    try:
        client = SGLangClient(server.url)
        weights = read_hf(tiny_hf)
        greedy = SamplingParams(max_new_tokens=4, temperature=0.0)
        for weights_now in (weights, None):
            if weights_now is None:  # now push new weights from disk
                new = write_random_hf(tmp_path / "step1", tiny_arch, seed=5)
                client.update_weights_from_disk(new, version=1)
                weights_now = read_hf(new)
            config, sd = weights_now
            out = client.generate(PROMPTS, 1, greedy)
            for prompt, [c] in zip(PROMPTS, out):
                assert len(c.tokens) == len(c.logprobs) > 0
                ref = reference_logprobs(sd, config, prompt, c.tokens, 0.0)
                torch.testing.assert_close(torch.tensor(c.logprobs), ref, rtol=0, atol=2e-2)
    finally:
        server.stop()


# -- the engine on a 2-rank trainer (TP1/EP2: experts are gathered before they are sent) ----

@pytest.mark.slow  # torchrun, 2 processes
def test_engine_push_weights_two_ranks(served, tiny_arch, tmp_path):
    from tests.conftest import ROOT
    from megatron_ring.platform.distributed import torchrun

    disk = write_random_hf(tmp_path / "disk", tiny_arch, seed=7)
    bcast = write_random_hf(tmp_path / "bcast", tiny_arch, seed=8)
    proc = torchrun(2, ["-m", "tests.test_sglang_client", served["server"].url, disk, bcast, tmp_path],
                    env={"PYTHONPATH": str(ROOT), "ROLLOUT_MASTER_ADDR": "127.0.0.1"}, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]  # every rank got rank 0's completions, and the same error
    assert "no rollout engine is left: http://127.0.0.1:" in ranks[0]["dead_error"]  # named, on both ranks
    for mode, path, version in (("disk", disk, 8), ("distributed", bcast, 9)):
        config, sd = read_hf(path)
        weights = (config, {k: v.bfloat16().float() for k, v in sd.items()})  # sent as bf16
        for prompt, samples in zip(PROMPTS, ranks[0][mode]):
            for tokens, logprobs in samples:
                ref = reference_logprobs(weights[1], config, prompt, tokens, 1.0)
                torch.testing.assert_close(torch.tensor(logprobs), ref, rtol=0, atol=2e-4)
    assert served["client"].model_info()["weight_version"] == "9"
    served["weights"] = weights


def _engine_worker(url, disk_hf, bcast_hf, out):
    """Under torchrun: push two checkpoints through SGLangEngine, disk then broadcast."""
    import torch.distributed as dist

    from megatron_ring.models.builder import build_model
    from megatron_ring.models.hf_checkpoint import HFReader
    from megatron_ring.models.weights import load_hf
    from megatron_ring.platform import distributed

    layout = distributed.init(1, 2)
    rank = dist.get_rank()
    arch = HFReader(disk_hf).arch
    model = build_model(arch, layout.validate(arch))
    params = SamplingParams(max_new_tokens=4, seed=3)
    result = {}

    def samples(engine):  # rank 0 asks the server; every rank gets its answer
        return distributed.rank0_then_broadcast(lambda: [[(c.tokens, c.logprobs) for c in s] for s in
                                                         engine.generate(PROMPTS, 2, params, keys=[0, 1, 2])])

    disk = SGLangEngine.connect(url, weights_dir=Path(out) / "rollout_weights")
    load_hf(model, HFReader(disk_hf))
    disk.push_weights(model, version=8)
    result["disk"] = samples(disk)

    from types import SimpleNamespace

    from megatron_ring.recipe.rl_schema import RLRecipe, RLSection, RolloutSection

    recipe = RLRecipe(rollout=RolloutSection(engine="sglang", url=url, weight_sync="distributed", ready_timeout_s=30.0),
                      rl=RLSection(kl_beta=0.0))
    engine = SGLangEngine.from_recipe(recipe, model, SimpleNamespace(eos_id=arch.eos_token_id), out)
    assert engine.weight_mode == "distributed" and (engine.sync is not None) == (rank == 0)
    load_hf(model, HFReader(bcast_hf))
    engine.push_weights(model, version=9)
    result["distributed"] = samples(engine)
    engine.close()

    dead = SGLangEngine(SGLangClient(f"http://127.0.0.1:{free_port()}", attempts=2, backoff_s=0.01),
                        weights_dir=Path(out) / "unused")
    try:
        distributed.rank0_then_broadcast(lambda: dead.generate(PROMPTS, 1, params), RolloutError)
    except RolloutError as e:
        result["dead_error"] = str(e)
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(result))
    distributed.shutdown()


if __name__ == "__main__":
    _engine_worker(*sys.argv[1:5])
