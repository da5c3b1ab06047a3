"""Megatron DDP + distributed optimizer training at TP1/EP2: the loss falls, and a run resumed
from its last checkpoint continues exactly as an uninterrupted one."""

import json
import subprocess
import sys

from tests.conftest import ROOT


def demo(run_dir, steps, save_every, *layout):
    r = subprocess.run([sys.executable, "-m", "megatron_ring.cli", "demo", "--run-dir", str(run_dir),
                        "--steps", str(steps), "--save-every", str(save_every), *map(str, layout)],
                       cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_loss_falls_and_resume_is_exact(tmp_path):
    full = demo(tmp_path / "full", 8, 0, "--tp", 1, "--ep", 2)
    assert [m["step"] for m in full] == list(range(1, 9))
    assert full[-1]["loss"] < full[0]["loss"] - 1.0, [m["loss"] for m in full]
    assert all(m["tokens"] == 8 * 32 for m in full)

    interrupted = tmp_path / "resumed"
    demo(interrupted, 4, 4, "--tp", 1, "--ep", 2)  # stops after saving step 4, as if killed
    resumed = demo(interrupted, 8, 4, "--tp", 1, "--ep", 2)
    assert [m["step"] for m in resumed] == list(range(1, 9))  # nothing lost or repeated
    for a, b in zip(full[4:], resumed[4:]):
        assert a["loss"] == b["loss"] and a["grad_norm"] == b["grad_norm"], (a, b)
    assert (interrupted / "checkpoints" / "latest").read_text().strip() == "iter_0000008"


def test_tp2_ep2_trains(tmp_path):
    metrics = demo(tmp_path / "tp2", 5, 0, "--tp", 2, "--ep", 2)
    assert metrics[-1]["loss"] < metrics[0]["loss"]
