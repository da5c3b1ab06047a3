"""Held-out evaluation and `select` through a server engine: the teacher-forced entropy equals what
the in-process sampler reports for its own tokens (one process; TP2 and DP2 over 2 gloo
processes); evaluation through the SGLang-protocol test server scores the server's samples with
their entropy under the same weights; `select` with engine sglang (a server by URL, or one it
starts) gives the same table as the embedded sampler.

Megatron runs in worker processes (this file run as a module, below), the checks here."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from megatron_ring.data.chat_tokenizer import ChatTokenizer
from megatron_ring.data.rl_prompts import read_prompts
from megatron_ring.inference.sampling_params import SamplingParams
from megatron_ring.models.hf_checkpoint import HFReader
from megatron_ring.platform.distributed import free_port, torchrun
from megatron_ring.rewards.code_reward import CodeRewardSettings
from megatron_ring.rewards.reward_pool import score_one
from megatron_ring.rollout.sglang_client import SGLangClient
from megatron_ring.rollout.sglang_server import launch
from tests.conftest import ROOT, demo_data
from tests.hf_reference import hf_forward

TEST_SERVER = (sys.executable, str(Path(__file__).with_name("sglang_test_server.py")))  # as test_sglang_client's

PROMPTS = [[5, 17, 42, 7], [300, 2, 9], [77], [12, 13, 14, 15, 16, 17, 18], [400, 401]]
SAMPLES = 2  # per prompt
TEACHER = dict(max_new_tokens=10, temperature=0.7, seed=1)
EVAL = dict(max_new_tokens=8, temperature=0.8, seed=2)
SMALL = dict(n_sft=16, n_rl_math=8, n_rl_code_science=8, n_heldout=16, n_sft_heldout=8, n_eval=8)


def worker(*args, nproc: int = 1, timeout: int = 300):
    """This file as a worker: one plain process, or nproc under torchrun."""
    env = {"PYTHONPATH": str(ROOT)}
    if nproc == 1:
        cmd = [sys.executable, "-m", "tests.test_eval_engine", *map(str, args)]
        proc = subprocess.run(cmd, env={**os.environ, **env, "OMP_NUM_THREADS": "1"},
                              capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    else:
        proc = torchrun(nproc, ["-m", "tests.test_eval_engine", *map(str, args)], env=env,
                        capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


@pytest.fixture(scope="module")
def single(tiny_hf, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "tp1.json"
    worker("teacher", tiny_hf, 1, 1, out)
    return json.loads(out.read_text())


@pytest.mark.slow  # a model built and sampled in a worker process: ~18 s
def test_teacher_forced_entropy_is_the_samplers(single):
    r = single
    assert len(r["tokens"]) == len(PROMPTS) * SAMPLES and all(r["tokens"])
    assert r["counts"] == [len(t) for t in r["tokens"]]
    torch.testing.assert_close(torch.tensor(r["teacher"]), torch.tensor(r["sampler"]), rtol=1e-5, atol=1e-5)
    assert len(set(map(tuple, r["tokens"]))) > len(PROMPTS)  # real, varied samples


@pytest.mark.slow  # torchrun, 2 processes
@pytest.mark.parametrize("tp, ep", [(2, 1), (1, 2)])  # TP2 (sequence parallel), DP2 (MoE all-to-all)
def test_teacher_forced_entropy_two_ranks(single, tiny_hf, tmp_path, tp, ep):
    out = tmp_path / "r.json"
    worker("teacher", tiny_hf, tp, ep, out, nproc=2)
    r = json.loads(out.read_text())
    assert r["tokens"] == single["tokens"] and r["counts"] == single["counts"]
    torch.testing.assert_close(torch.tensor(r["teacher"]), torch.tensor(r["sampler"]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.tensor(r["teacher"]), torch.tensor(single["teacher"]), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return demo_data(tmp_path_factory, "eval_data", **SMALL)


@pytest.fixture(scope="module")
def server(tiny_hf, tmp_path_factory):
    s = launch(tiny_hf, tmp_path_factory.mktemp("eval_server") / "log", free_port(), command=TEST_SERVER,
               ready_timeout_s=60)
    yield s
    s.stop()


def reference_entropy(sd, config, prompt, tokens, temperature) -> float:
    """Sum over the sampled tokens of the entropy of softmax(logits / T), by the plain forward."""
    logits = hf_forward(sd, config, torch.tensor([prompt + tokens]))[0, len(prompt) - 1:len(prompt) - 1 + len(tokens)]
    logp = torch.log_softmax(logits / temperature, -1)
    return float(-(logp.exp() * logp).sum())


@pytest.mark.slow  # a server on the tiny model, evaluate in a worker process: ~20 s
def test_evaluate_through_an_engine(server, tiny_hf, data, tmp_path):
    out = tmp_path / "eval.json"
    worker("evaluate", tiny_hf, server.url, data, out)
    r = json.loads(out.read_text())
    assert set(r["engine"]) == set(r["here"])  # the same report either way
    tok = ChatTokenizer(data / "tokenizer")
    rows = eval_prompts(data)
    encoded = [tok.encode_prompt(x.messages()) for x in rows]
    samples = SGLangClient(server.url).generate(encoded, SAMPLES, SamplingParams(**EVAL), keys=list(range(len(rows))),
                                                stop_token_ids=[tok.eos_id])
    reader = HFReader(tiny_hf)
    config, sd = reader.config, {n: reader.read(n) for n in reader.file_of}
    correct = tokens = entropy = 0.0
    for row, prompt, group in zip(rows, encoded, samples):
        for c in group:
            correct += score_one(row.domain, tok.decode(c.tokens), row.row, CodeRewardSettings()).reward
            tokens += len(c.tokens)
            entropy += reference_entropy(sd, config, prompt, c.tokens, EVAL["temperature"])
    n = len(rows) * SAMPLES
    assert r["engine"]["accuracy"] == correct / n
    assert r["engine"]["response_len_mean"] == tokens / n
    assert r["engine"]["entropy"] == pytest.approx(entropy / tokens, rel=1e-4)


def eval_prompts(data):
    """A few held-out prompts without code (no sandbox needed to score them)."""
    return [r for r in read_prompts([str(data / "rl_heldout.jsonl")]) if r.domain != "code"][:3]


@pytest.mark.slow  # three `select` runs and two servers: 40-60 s on 2 busy cores
def test_select_through_an_engine(tiny_hf, data, tmp_path):
    """Two checkpoints (random init, tiny_hf) selected by the embedded sampler, through a server
    given by URL (each checkpoint pushed to it) and through a server select starts itself."""
    url_server = launch(tiny_hf, tmp_path / "server.log", free_port(), command=TEST_SERVER, ready_timeout_s=60)
    try:
        worker("select", tiny_hf, url_server.url, data, tmp_path / "run")
        assert SGLangClient(url_server.url).model_info()["weight_version"] == "1"  # the last checkpoint's step
    finally:
        url_server.stop()
    reports = json.loads((tmp_path / "run" / "reports.json").read_text())
    tables = {mode: rep["checkpoints"] for mode, rep in reports.items()}
    for mode, rows in tables.items():
        assert [x["step"] for x in rows] == [0, 1], mode
        assert [set(x) for x in rows] == [set(x) for x in tables["embedded"]], mode
        assert reports[mode]["chosen"] is not None
    for a, b in zip(tables["url"], tables["launched"]):  # one server program, the same weights
        assert (a["accuracy"], a["response_len_mean"]) == (b["accuracy"], b["response_len_mean"])
        assert a["entropy"] == pytest.approx(b["entropy"], rel=1e-5)
    assert all(not math.isnan(x["entropy"]) and x["entropy"] > 0 for rows in tables.values() for x in rows)
    assert (tmp_path / "run" / "selection" / "sglang_server.log").is_file()


# -- workers -----------------------------------------------------------------------------------

def _teacher_worker(hf, tp, ep, out):
    """Sample PROMPTS in-process at a layout, then teacher-force the samples; rank 0 writes the
    per-sample tokens, the sampler's entropy sums and the teacher-forced ones (key order)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_ring.inference.sampling import generate
    from megatron_ring.inference.teacher_forced import response_entropies
    from megatron_ring.models.builder import build_model
    from megatron_ring.models.weights import load_hf
    from megatron_ring.platform import distributed

    layout = distributed.init(int(tp), int(ep))
    reader = HFReader(hf)
    model = build_model(reader.arch, layout.validate(reader.arch))
    load_hf(model, reader)
    dp, rank, group = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank(), ps.get_data_parallel_group()
    keys = list(range(len(PROMPTS) * SAMPLES))
    mine = keys[rank::dp]
    samples = generate(model, [PROMPTS[k // SAMPLES] for k in mine], mine, SamplingParams(**TEACHER),
                       reader.arch.eos_token_id, batch_size=3)

    def gather(values):  # this rank's share -> every key's value, in key order
        parts = [None] * dp
        dist.all_gather_object(parts, list(zip(mine, values)), group=group)
        return [v for _, v in sorted(kv for part in parts for kv in part)]

    tokens = gather([s.tokens for s in samples])
    teacher = response_entropies(model, [(PROMPTS[k // SAMPLES], tokens[k]) for k in keys],
                                 TEACHER["temperature"], micro_batch=3)
    result = {"tokens": tokens, "sampler": gather([sum(s.entropies) for s in samples]),
              "teacher": gather([h for h, _ in teacher]), "counts": gather([n for _, n in teacher])}
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(result))
    distributed.shutdown()


def _evaluate_worker(hf, url, data, out):
    """evaluate() on tiny_hf's weights, through the engine at url and in-process."""
    from megatron_ring.inference.held_out import evaluate
    from megatron_ring.models.builder import build_model
    from megatron_ring.models.weights import load_hf
    from megatron_ring.platform import distributed
    from megatron_ring.rollout.sglang_engine import SGLangEngine

    layout = distributed.init(1, 1)
    reader = HFReader(hf)
    model = build_model(reader.arch, layout.validate(reader.arch))
    load_hf(model, reader)
    tok = ChatTokenizer(Path(data) / "tokenizer")
    engine = SGLangEngine.connect(url, weights_dir=Path(out).parent / "unused", stop_token_ids=[tok.eos_id])
    args = (model, tok, eval_prompts(Path(data)), SAMPLES, SamplingParams(**EVAL), 4, CodeRewardSettings())
    result = {"engine": evaluate(*args, engine=engine), "here": evaluate(*args)}
    Path(out).write_text(json.dumps(result))
    distributed.shutdown()


def _select_worker(hf, url, data, run_dir):
    """A run directory with two checkpoints, then `select` three ways; writes each report."""
    import shutil

    from megatron_ring.models.builder import build_model
    from megatron_ring.models.weights import load_hf
    from megatron_ring.platform import distributed
    from megatron_ring.recipe import load_recipe
    from megatron_ring.rollout.sglang_engine import SGLangEngine
    from megatron_ring.selection import select_run
    from megatron_ring.train import checkpoint

    run_dir = Path(run_dir)
    base = ["data.demo=null", f"data.train=[{data}/sft_train.jsonl]", f"data.tokenizer={data}/tokenizer",
            f"select.prompts={data}/rl_heldout.jsonl", "parallel.ep=1", "cluster.gpus_per_node=1",
            "select.max_prompts=4", "select.max_new_tokens=6", "select.entropy_low=0", "select.entropy_high=100"]

    def recipe(*extra):
        return load_recipe(ROOT / "recipes" / "tiny" / "distill.yaml", base + list(extra))

    layout = distributed.init(1, 1)
    arch = recipe().model.arch()
    model = build_model(arch, layout.validate(arch))
    checkpoint.save(run_dir / "checkpoints", 0, model, trainer_state={"epoch": 0.0})
    load_hf(model, HFReader(hf))
    checkpoint.save(run_dir / "checkpoints", 1, model, trainer_state={"epoch": 1.0})
    distributed.shutdown()

    launch = SGLangEngine.launch.__func__  # select starts the test server where it would start SGLang
    SGLangEngine.launch = classmethod(lambda cls, *a, **kw: launch(cls, *a, command=TEST_SERVER, **kw))
    reports = {}
    for mode, extra in (("embedded", []), ("url", ["select.engine=sglang", f"select.url={url}"]),
                        ("launched", ["select.engine=sglang", "select.server_args=[--dtype, float32]"])):
        if mode == "launched":
            shutil.rmtree(run_dir / "selection")  # sampled afresh, not read from the url run's results
        select_run.run(recipe(*extra), run_dir, as_json=True)
        reports[mode] = json.loads((run_dir / "selection.json").read_text())
    (run_dir / "reports.json").write_text(json.dumps(reports))


if __name__ == "__main__":
    {"teacher": _teacher_worker, "evaluate": _evaluate_worker, "select": _select_worker}[sys.argv[1]](*sys.argv[2:])
