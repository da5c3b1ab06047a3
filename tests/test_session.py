"""The training session both stages share (train/session.py), in one process: the optimizer and
scheduler come from the recipe's optimizer section, the reference stays frozen at the initial
weights, and a new session on the same run directory resumes bit-exactly from the checkpoint
(both sessions in one lone process, whose process group re-forms in place)."""

import subprocess
import sys

import pytest
import torch

from megatron_ring.data.demo_data import write_demo_data
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_hf):
    root = tmp_path_factory.mktemp("session")
    write_demo_data(root / "data", n_sft=16, n_rl_math=4, n_rl_code_science=4, n_heldout=4, n_sft_heldout=4, n_eval=4)
    r = subprocess.run([sys.executable, "-m", "tests.workers.session", "--data", root / "data", "--init", tiny_hf,
                        "--run-dir", root / "run", "--out", root / "out.pt"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-5000:]
    out = torch.load(root / "out.pt", weights_only=False)
    return out["train"], out["resume"]


def test_schedule_and_reference_follow_the_recipe(runs):
    train, _ = runs
    # optimizer.lr 1e-2 with 2 warmup steps of 4: 5e-3 then 1e-2, then cosine towards min_lr 1e-3
    assert train["lrs"][:2] == pytest.approx([5e-3, 1e-2])
    assert 1e-3 < train["lrs"][2] < 1e-2
    assert train["reference_frozen"]  # the initial weights (model.init), untouched by two updates
    assert train["model_moved"]  # every parameter of the policy was updated
    assert all(train[f"metrics_{n}"]["grad_norm"] > 0 for n in (1, 2, 3))


def test_a_new_session_resumes_exactly(runs):
    train, resume = runs
    assert resume["state"] == {"stage": "distill", "step": 2, "marker": "two"}
    assert resume["resumed_from"].endswith("iter_0000002")
    assert resume["lrs"] == train["lrs"][2:]
    assert resume["metrics_3"]["loss"] == train["metrics_3"]["loss"]
    assert all(torch.equal(resume["weights"][n], w) for n, w in train["weights"].items())
