"""The RL stage and the pipeline end to end on CPU (TP1/EP2, 2 gloo processes): distill ->
select -> RL math -> RL code + science, each from the previous stage's output; C3PO's exact
budget every step against grpo's varying token count; a killed RL run resuming exactly
(carried segments included)."""

import json
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow  # end to end: `make test` only, not `make test-fast`
PHI = 96  # per rank: 192 loss tokens a step at DP 2
RL_FIELDS = {"stage", "step", "loss_mode", "tokens_in_loss", "step_time_s", "entropy", "kl", "clip_frac",
             "grad_norm", "logprob_gap", "loss"}
DISTILL = ["data.demo_sft_rows=200", "data.seq_length=128", "train.epochs=1", "train.global_batch=8",
           "train.micro_batch=2", "train.save_every_steps=0", "logging.progress=false", "logging.wandb=disabled"]
SELECT = ["select.max_prompts=8", "select.max_new_tokens=24", "select.entropy_low=0.0", "select.entropy_high=100"]
RL = ["rollout.prompts_per_step=4", "rollout.samples_per_prompt=4", "rollout.max_new_tokens=24",
      f"rl.token_budget={PHI}", "rl.drop_zero_variance=false", "train.steps=2", "train.micro_batch=4", "eval.max_prompts=4",
      "eval.max_new_tokens=24", "logging.progress=false", "logging.wandb=disabled", "reward.timeout_s=20"]


def cli(*args, timeout=900):
    r = subprocess.run([sys.executable, "-m", "megatron_ring.cli", *map(str, args)], cwd=ROOT,
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    return r


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def stage_overrides(name, items):
    return [f"{name}.{o}" for o in items]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    r = cli("run", "recipes/tiny/pipeline.yaml", "--run-dir", root, *stage_overrides("distill", DISTILL),
            *stage_overrides("select", SELECT), *stage_overrides("rl_stage1_math", RL),
            *stage_overrides("rl_stage2_code_science", RL))
    return root, r.stdout


def test_pipeline_chains_the_stages(pipeline):
    root, out = pipeline
    chosen = json.loads((root / "distill" / "selection.json").read_text())["chosen"]
    assert chosen and chosen.startswith(str(root / "distill" / "checkpoints"))
    s1 = (root / "rl_stage1_math" / "recipe.yaml").read_text()
    assert f"init: {root / 'distill' / 'selection.json'}" in s1  # resolved to `chosen` when it starts
    assert f"resumed" not in out and f"init {chosen}" in out
    s2 = (root / "rl_stage2_code_science" / "recipe.yaml").read_text()
    assert f"init: {root / 'rl_stage1_math' / 'checkpoints'}\n" in s2  # its latest: iter_0000002
    report = json.loads((root / "pipeline.json").read_text())
    assert [r["stage"] for r in report] == ["distill", "select", "rl_stage1_math", "rl_stage2_code_science"]
    assert "rl_stage1_math" in out and "held-out" in out
    for stage, domains in (("rl_stage1_math", {"math"}), ("rl_stage2_code_science", {"code", "science"})):
        d = root / stage
        m = metrics(d)
        steps = [r for r in m if r["step"] > 0]
        assert [r["step"] for r in steps] == [1, 2]
        assert all(RL_FIELDS <= set(r) for r in steps)
        # c3po: exactly Phi per rank x DP 2 loss tokens every step.
        assert [r["tokens_in_loss"] for r in steps] == [2 * PHI, 2 * PHI]
        first = steps[0]
        assert {k[len("accuracy_"):] for k in first if k.startswith("accuracy_")} == domains
        assert "reward_mean" in first and "response_len_mean" in first
        assert "eval_accuracy" in m[0] and "eval_accuracy" in steps[-1]  # before and after
        assert (d / "plots" / "rl.png").stat().st_size > 1000
        assert (d / "checkpoints" / "iter_0000002").is_dir()


def rl_run(run_dir, init, *extra):
    return ["rl", "recipes/tiny/rl_stage1_math.yaml", "--run-dir", run_dir, f"model.init={init}",
            f"data.demo={init.parents[1] / 'data'}", f"data.tokenizer={init.parents[1] / 'data' / 'tokenizer'}",
            f"data.prompts=[{init.parents[1] / 'data' / 'rl_math.jsonl'}]", "eval.prompts=", *RL, *extra]


def test_grpo_on_the_same_rollouts(pipeline, tmp_path):
    """grpo replays stage 1's recorded rounds (the same prompts and samples, so the same rewards)
    and trains on every token of each, where c3po took exactly its budget."""
    root, _ = pipeline
    recorded = root / "rl_stage1_math" / "rollouts"
    rounds = sorted(recorded.glob("round_*.jsonl"))
    assert rounds and all({"tokens", "logprobs", "reward", "text"} <= set(json.loads(line))
                          for line in rounds[0].read_text().splitlines())
    init = next((root / "distill" / "checkpoints").glob("iter_*"))
    cli(*rl_run(tmp_path / "grpo", init, "rl.loss_mode=grpo", "rollout.engine=replay",
                f"rollout.replay_dir={recorded}", "rollout.record=false"))
    m = [r for r in metrics(tmp_path / "grpo") if r["step"] > 0]
    c3po = [r for r in metrics(root / "rl_stage1_math") if r["step"] > 0]
    assert m[0]["reward_mean"] == c3po[0]["reward_mean"] and m[0]["responses"] == c3po[0]["responses"] == 16
    for r in m:
        assert r["loss_mode"] == "grpo" and r["responses"] == 16
        assert r["tokens_in_loss"] == round(r["response_len_mean"] * r["responses"])
    assert not (tmp_path / "grpo" / "rollouts").exists()


def test_killed_rl_run_resumes_exactly(pipeline, tmp_path):
    """With rollout routing replay and a bf16 sampler: the carried segments keep their routed
    experts through the checkpoint, so the resumed steps replay the same routing."""
    root, _ = pipeline
    init = next((root / "distill" / "checkpoints").glob("iter_*"))
    args = ["train.steps=4", "train.save_every_steps=2", "rl.router_replay=r3", "rollout.sampler_dtype=bf16"]
    ref_dir = tmp_path / "ref"
    cli(*rl_run(ref_dir, init, *args))
    reference = metrics(ref_dir)
    assert any(r.get("rollout_rounds") == 0 for r in reference)  # a step trained on carried segments only

    run_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "megatron_ring.cli", *map(str, rl_run(run_dir, init, *args))],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline:  # kill once step 3 is logged: the latest checkpoint is step 2
        if (run_dir / "metrics.jsonl").is_file() and any(r["step"] == 3 for r in metrics(run_dir)):
            break
        time.sleep(0.05)
    import os

    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    cli(*rl_run(run_dir, init, *args))
    resumed = metrics(run_dir)
    assert [r["step"] for r in resumed] == [r["step"] for r in reference]  # nothing lost or repeated
    keys = ["loss", "tokens_in_loss", "grad_norm", "entropy", "kl", "carried_tokens", "reward_mean", "prob_error",
            "routing_agreement", "natural_routing_agreement"]
    for a, b in zip(resumed, reference):
        assert {k: a.get(k) for k in keys} == {k: b.get(k) for k in keys}, a["step"]
    assert all(r["routing_agreement"] == 1.0 for r in reference if r["step"] > 0)


def test_rl_with_an_sglang_server(pipeline, tmp_path, tiny_hf):
    """Rollouts from an SGLang-protocol server (the test server, started on random weights):
    the stage pushes its weights before the first rollout and after every step, so the server's
    logprobs match the trainer's (bf16 export: a small gap, not the nats of the random model).
    With routing replay: the server reports each token's experts (its own router's), and the
    training passes use exactly those.
    Then the server dies: the next run stops with an error naming it, the checkpoint intact."""
    from megatron_ring.platform.distributed import free_port
    from megatron_ring.rollout.sglang_client import SGLangClient
    from megatron_ring.rollout.sglang_server import launch
    from tests.test_sglang_client import TEST_SERVER

    root, _ = pipeline
    init = next((root / "distill" / "checkpoints").glob("iter_*"))
    server = launch(tiny_hf, tmp_path / "server.log", free_port(), command=TEST_SERVER, ready_timeout_s=60,
                    extra_args=["--enable-return-routed-experts"])
    run_dir = tmp_path / "sglang"
    args = rl_run(run_dir, init, "rollout.engine=sglang", f"rollout.url={server.url}", "rollout.weight_sync=disk",
                  "rl.router_replay=r3")
    try:
        cli(*args)
        assert SGLangClient(server.url).model_info().get("weight_version") == "2"
    finally:
        server.stop()
    steps = [r for r in metrics(run_dir) if r["step"] > 0]
    assert [r["tokens_in_loss"] for r in steps] == [2 * PHI] * 2
    assert all(0 < r["logprob_gap"] < 0.05 for r in steps), [r["logprob_gap"] for r in steps]
    assert all(r["routing_agreement"] == 1.0 and 0.5 < r["natural_routing_agreement"] <= 1.0 for r in steps)

    # A server given by URL may still be loading: the stage waits rollout.ready_timeout_s for it.
    r = subprocess.run([sys.executable, "-m", "megatron_ring.cli", *map(str, args), "train.steps=3",
                        "rollout.ready_timeout_s=3"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and f"{server.url}: not healthy after 3 s" in r.stderr
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "iter_0000002"
    assert [x["step"] for x in metrics(run_dir) if x["step"] > 0] == [1, 2]


def engine_events(log) -> list[list[dict]]:
    """The EVENT lines of a test server's log, per start of the server (a resumed run appends)."""
    runs = []
    for line in log.read_text().splitlines():
        if line.startswith("serving "):
            runs.append([])
        elif line.startswith("EVENT ") and runs:
            runs[-1].append(json.loads(line[len("EVENT "):]))
    return runs


def pushes(events) -> list[str]:
    """The versions pushed, in order (a push of several buckets is one)."""
    out = []
    for e in events:
        if e["op"] == "weights_updated" and (not out or out[-1] != e["version"]):
            out.append(e["version"])
    return out


def fleet_args(run_dir, init, *extra):
    from tests.test_sglang_client import TEST_SERVER

    return rl_run(run_dir, init, "rollout.engine=sglang", "rollout.engines=2", "rollout.weight_sync=auto",
                  "rollout.offload=true", f"rollout.server_command=[{','.join(TEST_SERVER)}]", "rollout.concurrency=8",
                  *extra)


def test_rl_with_a_started_fleet(pipeline, tmp_path):
    """The stage starts its own fleet, colocated: two engines (the test server, the trainer's
    export) behind the real sglang-router, each rank handing its engine the weights through shared
    memory (weight_sync auto -> tensor), verified by reading tensors back; with rollout.offload
    the engines release KV cache and weights for every update and take the weights back before
    the push, the KV cache after it, while the trainer's optimizer state and reference model are
    out during rollouts. Each prompt group is scored as it comes back; rank 1 receives only its
    own micro-batches. Everything stops with the stage."""
    root, _ = pipeline
    init = next((root / "distill" / "checkpoints").glob("iter_*"))
    run_dir = tmp_path / "fleet"
    cli(*fleet_args(run_dir, init))
    steps = [r for r in metrics(run_dir) if r["step"] > 0]
    assert [r["tokens_in_loss"] for r in steps] == [2 * PHI] * 2
    assert all(0 < r["logprob_gap"] < 0.05 for r in steps), [r["logprob_gap"] for r in steps]  # both pushed to
    assert all(0.0 <= r["reward_overlap_frac"] <= 1.0 for r in steps)
    assert all(r["push_verified"] == "by_name" and r["weight_staleness_max"] == 0 for r in steps)
    assert all(r["offload_bytes"] > 0 and r["push_bytes"] > 0 for r in steps)
    logs = run_dir / "logs"
    engines = sorted(logs.glob("sglang_engine_node0_*.log"))
    assert len(engines) == 2 and (logs / "sglang_router.log").is_file()
    for log in engines:
        text = log.read_text()
        assert "POST /generate" in text and "POST /update_weights_from_tensor" in text
        [events] = engine_events(log)
        assert pushes(events) == ["0", "1", "2"]  # before the first rollout, then after every step
        memory = [(e["op"], tuple(e["tags"])) for e in events if e["op"] in ("release", "resume")]
        assert memory == [("release", ("kv_cache", "weights")), ("resume", ("weights",)), ("resume", ("kv_cache",))] * 2
        for i, e in enumerate(events):  # no sample while released; each push between the two resumes
            if e["op"] == "release":
                back = next(j for j in range(i, len(events)) if events[j]["op"] == "resume" and events[j]["tags"] == ["kv_cache"])
                assert events[back]["generated"] == e["generated"]
                assert any(x["op"] == "weights_updated" for x in events[i:back])


def test_killed_fleet_run_pushes_the_checkpoint_first(pipeline, tmp_path):
    """SIGKILL of a colocated-fleet run takes its engines down with it (they die with the process
    that started them); the resumed run's new engines get the checkpoint's weights, tagged with
    its step, before they sample anything."""
    import os

    root, _ = pipeline
    init = next((root / "distill" / "checkpoints").glob("iter_*"))
    run_dir = tmp_path / "killed_fleet"
    args = fleet_args(run_dir, init, "train.steps=3", "train.save_every_steps=1")
    proc = subprocess.Popen([sys.executable, "-m", "megatron_ring.cli", *map(str, args)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "metrics.jsonl").is_file() and any(r["step"] == 2 for r in metrics(run_dir)):
            break
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

    def engines_alive():
        mine = str(run_dir / "rollout_weights").encode()
        return [p for p in os.listdir("/proc") if p.isdigit() and mine in _cmdline(p)]

    deadline = time.time() + 60
    while engines_alive() and time.time() < deadline:
        time.sleep(0.2)
    assert not engines_alive()
    saved = int((run_dir / "checkpoints" / "latest").read_text().strip().split("_")[-1])
    cli(*args)
    for log in sorted((run_dir / "logs").glob("sglang_engine_node0_*.log")):
        events = engine_events(log)[-1]  # the resumed run's engine
        first = next(e for e in events if e["op"] == "weights_updated")
        assert first["version"] == str(saved) and first["generated"] == 0
        assert pushes(events) == [str(s) for s in range(saved, 4)]
    assert [r["step"] for r in metrics(run_dir) if r["step"] > 0][-1] == 3


def _cmdline(pid: str) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""
