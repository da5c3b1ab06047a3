"""tools/bench_stability.py: the per-mode summary from metrics records (fields a run does not
report are null), and the tool end to end at tiny settings (its own distilled checkpoint, 2 RL
steps of grpo, c3po and c3po+r3 on 2 gloo processes)."""

import importlib.util
import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT

spec = importlib.util.spec_from_file_location("bench_stability", ROOT / "tools" / "bench_stability.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)

FIELDS = {"mode", "tokens_per_step_mean", "tokens_per_step_cv", "grad_norm_median", "grad_norm_max",
          "grad_norm_max_over_median", "reward", "entropy", "routing_agreement", "natural_routing_agreement",
          "prob_error", "rollout_kl", "heldout_accuracy_before", "heldout_accuracy_after", "steps", "seconds"}
PHI = 96  # per rank: 192 loss tokens a step at DP 2
DISTILL = ["data.demo_sft_rows=200", "data.seq_length=128", "train.global_batch=8", "train.micro_batch=2"]
RL = ["rollout.prompts_per_step=4", "rollout.samples_per_prompt=4", "rollout.max_new_tokens=24",
      f"rl.token_budget={PHI}", "rl.drop_zero_variance=false", "train.micro_batch=4", "eval.max_new_tokens=24",
      "reward.timeout_s=20"]


def test_summary_of_records():
    rows = [{"step": 0, "eval_accuracy": 0.25},
            {"step": 1, "tokens_in_loss": 100, "grad_norm": 1.0, "reward_mean": 0.5, "entropy": 1.0,
             "routing_agreement": 0.9, "prob_error": 0.1},
            {"step": 2, "tokens_in_loss": 300, "grad_norm": 3.0, "entropy": 2.0, "routing_agreement": 0.7},
            {"step": 3, "tokens_in_loss": 200, "grad_norm": 2.0, "reward_mean": 0.25, "entropy": 3.0,
             "routing_agreement": 0.8, "eval_accuracy": 0.5}]
    s = bench.summarize("grpo", rows, 12.345)
    assert FIELDS <= set(s)
    assert s["tokens_per_step_mean"] == 200 and s["tokens_per_step_cv"] == round((20000 / 3) ** 0.5 / 200, 4)
    assert (s["grad_norm_median"], s["grad_norm_max"], s["grad_norm_max_over_median"]) == (2.0, 3.0, 1.5)
    assert s["reward"] == [0.5, None, 0.25]  # step 2: carried segments only, no fresh responses
    assert s["entropy"] == [1.0, 2.0, 3.0] and s["entropy_mean"] == 2.0
    assert s["routing_agreement"] == 0.8 and s["prob_error"] == 0.1
    assert s["natural_routing_agreement"] is None and s["rollout_kl"] is None  # not reported: null
    assert (s["heldout_accuracy_before"], s["heldout_accuracy_after"]) == (0.25, 0.5)
    assert (s["steps"], s["seconds"]) == (3, 12.3)
    assert "grpo" in bench.table([s]) and "-" in bench.table([s])


@pytest.mark.slow  # three 2-step RL runs and a small distillation: ~3 minutes on 2 cores
def test_bench_end_to_end(tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, "tools/bench_stability.py", "--steps", "2", "--out", str(out), "--eval-prompts", "4",
           "--distill-epochs", "1", *(f"--distill-arg={d}" for d in DISTILL), "--json", *RL]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
    result = {s["mode"]: s for s in json.loads(r.stdout)}
    assert list(result) == ["grpo", "c3po", "c3po+r3"]
    for mode, s in result.items():
        assert FIELDS <= set(s), mode
        assert s["steps"] == 2 and len(s["reward"]) == len(s["entropy"]) == 2
        assert s["heldout_accuracy_before"] is not None and s["heldout_accuracy_after"] is not None
        assert s["routing_agreement"] is not None and s["natural_routing_agreement"] is not None
        assert s["prob_error"] is not None and s["rollout_kl"] is not None
    for mode in ("c3po", "c3po+r3"):  # exactly Phi x DP loss tokens every step
        assert result[mode]["tokens_per_step_mean"] == 2 * PHI and result[mode]["tokens_per_step_cv"] == 0
    assert result["c3po+r3"]["routing_agreement"] == 1.0  # the rollout's routing, replayed
    assert (out / "plots" / "stability.png").stat().st_size > 1000
