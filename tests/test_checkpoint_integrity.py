"""Checkpoints that never restart silently: a damaged `latest` stops the run naming the newest
complete checkpoint (and leaves metrics and checkpoints alone), a truncated file is named, a
load error names the path, the cause and the previous good checkpoint, and a save that fails on
a full disk removes its .tmp, keeps the previous checkpoint the latest and says so in words.
Real Megatron checkpoints come from one lone process (tests/workers/checkpoint_faults.py)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_ring.data.demo_data import write_demo_data
from megatron_ring.models.hf_config import CheckpointError
from megatron_ring.train import checkpoint, checkpoint_dir
from tests.conftest import ROOT


@pytest.fixture(scope="module")
def faults(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults") / "checkpoints"
    r = subprocess.run([sys.executable, "-m", "tests.workers.checkpoint_faults", str(root)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    lines = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    assert r.returncode == 0 and lines, r.stdout[-3000:] + r.stderr[-5000:]
    return root, json.loads(lines[-1][len("RESULT "):])


@pytest.mark.slow  # the fault worker builds and saves a model
def test_full_disk_save_removes_its_tmp_and_says_so(faults):
    root, out = faults
    assert out["saved"] == ["iter_0000001", "iter_0000002", "latest"]
    for key in ("writer_enospc", "manifest_enospc"):  # in Megatron's writer processes; in our files after them
        msg = out[key]
        assert msg.startswith(f"{root}/iter_0000003: saving the checkpoint failed: [Errno 28] no space left on device"), msg
        assert f"removed {root}/iter_0000003.tmp" in msg and f"latest checkpoint is still {root}/iter_0000002" in msg
        assert out["after_" + key] == ["iter_0000001", "iter_0000002", "latest"]
    assert out["latest"] == "iter_0000002" and out["complete"] == ["iter_0000001", "iter_0000002"]


@pytest.mark.slow  # the fault worker builds and saves a model
def test_unreadable_checkpoint_names_path_cause_and_previous(faults):
    root, out = faults
    garbled = root.parent / "garbled"
    msg = out["garbled_load"]
    assert msg.startswith(f"{garbled}/iter_0000002: Megatron could not load it (UnpicklingError: "), msg
    assert msg.endswith(f"the previous complete checkpoint is {garbled}/iter_0000001"), msg


def fake_checkpoint(root: Path, step: int) -> Path:
    """A checkpoint directory as save() leaves it (files of the right names, sealed, published)."""
    tmp = root / f"iter_{step:07d}.tmp"
    tmp.mkdir(parents=True)
    for name, size in ((".metadata", 300), ("__0_0.distcp", 5000), ("common.pt", 100)):
        (tmp / name).write_bytes(bytes(range(256)) * (size // 256) + b"x" * (size % 256))
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step}))
    checkpoint_dir.seal(tmp, step)
    checkpoint_dir.publish(tmp, checkpoint_dir.iter_dir(root, step))
    return checkpoint_dir.iter_dir(root, step)


@pytest.fixture
def ckpts(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (85, 88):
        fake_checkpoint(root, step)
    return root


def test_latest_pointer_and_its_absence(ckpts, tmp_path):
    assert checkpoint.latest(ckpts) == ckpts / "iter_0000088"
    (ckpts / "latest").unlink()  # killed between its first checkpoint's rename and the pointer
    assert checkpoint.latest(ckpts) == ckpts / "iter_0000088"
    assert checkpoint.latest(tmp_path / "new") is None
    for step in (85, 88):  # directories, none complete: not a new run either
        (ckpts / f"iter_{step:07d}" / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match="holds iter_0000085, iter_0000088 but no `latest` and no complete"):
        checkpoint.latest(ckpts)


def damage_latest(root: Path, how: str) -> None:
    pointer = root / "latest"
    if how == "missing directory":
        pointer.write_text("iter_0000091\n")
    elif how == "empty file":
        pointer.write_text("")
    elif how == "incomplete directory":
        fake_checkpoint(root, 91)
        (root / "iter_0000091" / "manifest.json").unlink()
    elif how == "truncated shard":
        fake_checkpoint(root, 91)
        with open(root / "iter_0000091" / "__0_0.distcp", "r+b") as f:
            f.truncate(1000)


@pytest.mark.parametrize("how", ["missing directory", "empty file", "incomplete directory", "truncated shard"])
def test_damaged_latest_names_the_newest_complete_checkpoint(ckpts, how):
    damage_latest(ckpts, how)
    with pytest.raises(CheckpointError) as e:
        checkpoint.latest(ckpts)
    msg = str(e.value)
    assert msg.startswith(f"{ckpts}/latest ") and "not restarting from step 0" in msg
    assert f"newest complete checkpoint is {ckpts}/iter_0000088" in msg
    assert f"echo iter_0000088 > {ckpts}/latest" in msg
    if how == "truncated shard":
        assert f"{ckpts}/iter_0000091/__0_0.distcp has 1000 bytes, its manifest says 5000" in msg


@pytest.mark.parametrize("name", ["__0_0.distcp", ".metadata", "trainer_state.json", "manifest.json"])
def test_truncated_file_is_named_at_load(ckpts, name):
    path = ckpts / "iter_0000088" / name
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    with pytest.raises(CheckpointError) as e:
        checkpoint.load(ckpts / "iter_0000088", model=None)  # refused before any tensor is read
    msg = str(e.value)
    assert msg.startswith(f"{ckpts}/iter_0000088: not a complete checkpoint: ")
    assert (str(path) if name != "manifest.json" else f"{path} is unreadable") in msg
    assert msg.endswith(f"the previous complete checkpoint is {ckpts}/iter_0000085")
    with pytest.raises(CheckpointError, match="the newest complete checkpoint is .*iter_0000085"):
        checkpoint.latest(ckpts)


@pytest.mark.slow  # the fault worker builds and saves a model
def test_distill_refuses_a_damaged_latest_and_touches_nothing(tmp_path, faults):
    """`latest` names a missing directory (the reproduced case; the other damages take the same
    path): the launcher stops before torchrun, and the run directory is left as it was."""
    data = tmp_path / "data"
    write_demo_data(data, n_sft=16, n_rl_math=2, n_rl_code_science=2, n_heldout=2, n_sft_heldout=2, n_eval=2)
    run_dir = tmp_path / "run"
    shutil.copytree(faults[0], run_dir / "checkpoints", ignore=shutil.ignore_patterns("*.tmp"))
    records = "".join(json.dumps({"stage": "distill", "step": s, "loss": 1.0}) + "\n" for s in (1, 2))
    (run_dir / "metrics.jsonl").write_text(records)
    damage_latest(run_dir / "checkpoints", "missing directory")
    before = sorted(p.relative_to(run_dir) for p in run_dir.rglob("*"))
    r = subprocess.run([sys.executable, "-m", "megatron_ring.cli", "distill", "recipes/tiny/distill.yaml",
                        "--run-dir", str(run_dir), "data.demo=null", f"data.train=[{data}/sft_train.jsonl]",
                        f"data.tokenizer={data}/tokenizer", "data.seq_length=128", "logging.wandb=disabled"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr[-3000:]
    ckpts = run_dir / "checkpoints"
    assert r.stderr.startswith(f"megatron-ring distill: error: {ckpts}/latest "), r.stderr
    assert f"the newest complete checkpoint is {ckpts}/iter_0000002" in r.stderr
    assert (run_dir / "metrics.jsonl").read_text() == records
    assert sorted(p.relative_to(run_dir) for p in run_dir.rglob("*") if p.name != "trainer.lock") == before
