"""Checkpoints at scale (train/checkpoint.py): dp_reshardable optimizer state through Megatron's
fully parallel strategies, asynchronous saves, keep_last retention, the RL carried segments in
a binary file. The Megatron parts run ling-tiny at TP1/EP2 on 2 gloo processes
(tests/workers/checkpoint_async.py)."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

from megatron_ring.models.hf_config import CheckpointError
from megatron_ring.platform import parent_death
from megatron_ring.platform.distributed import free_port
from megatron_ring.rl import carried_segments
from megatron_ring.rl.responses import Response, Segment
from megatron_ring.train import checkpoint_dir
from tests.conftest import ROOT
from tests.test_checkpoint_integrity import fake_checkpoint


# ------------------------------------------------------------------ keep_last


def checkpoints(root, steps, epoch_ends=()):
    for step in steps:
        path = fake_checkpoint(root, step)
        if step in epoch_ends:  # as sft.py saves them; resealed, as a save would have
            state = json.loads((path / "trainer_state.json").read_text())
            (path / "trainer_state.json").write_text(json.dumps(dict(state, epoch_end=True)))
            tmp = path.with_name(path.name + ".tmp")
            path.rename(tmp)
            checkpoint_dir.seal(tmp, step)
            checkpoint_dir.publish(tmp, path)


def names(root):
    return sorted(p.name for p in root.iterdir())


def test_keep_last_deletes_only_old_periodic_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    checkpoints(root, [0, 3, 6, 8, 9, 12, 15, 16], epoch_ends={8, 16})
    (root / "latest").write_text("iter_0000012\n")  # e.g. a run resumed from 12 that re-saved 15 and 16
    deleted = checkpoint_dir.retain(root, 2)
    # periodic: 3, 6, 9, 12, 15 -> the newest two (12, 15) kept; 12 is also `latest`
    assert [p.name for p in deleted] == ["iter_0000003", "iter_0000006", "iter_0000009"]
    assert names(root) == ["iter_0000000", "iter_0000008", "iter_0000012", "iter_0000015", "iter_0000016", "latest"]
    (root / "latest").write_text("iter_0000016\n")
    checkpoint_dir.retain(root, 1)  # `latest` is an epoch end: only the newest periodic one stays
    assert names(root) == ["iter_0000000", "iter_0000008", "iter_0000015", "iter_0000016", "latest"]
    assert checkpoint_dir.retain(root, 0) == []  # 0: keep all


def test_keep_last_never_deletes_latest_nor_incomplete(tmp_path):
    root = tmp_path / "checkpoints"
    checkpoints(root, [2, 4, 6])
    (root / "latest").write_text("iter_0000002\n")
    (root / "iter_0000006" / "manifest.json").unlink()  # not complete: not ours to judge
    checkpoint_dir.retain(root, 1)
    assert names(root) == ["iter_0000002", "iter_0000004", "iter_0000006", "latest"]  # 4 is the newest complete
    checkpoints(root, [8])  # published: `latest` moves to 8
    checkpoint_dir.retain(root, 1)
    assert names(root) == ["iter_0000006", "iter_0000008", "latest"]
    assert not list(root.glob("*.tmp"))


# ------------------------------------------------------------------ carried segments


def segments():
    a = Response(uid=7, group=3, domain="math", prompt_ids=[5, 6, 7], tokens=[9, 10, 11, 12],
                 rollout_logp=[-0.1, -(2 ** -40), -math.pi, -1e-300], finish_reason="stop", reward=1.0,
                 advantage=0.1 + 0.2, version=4)
    b = Response(uid=2 ** 40, group=0, domain="science ünï", prompt_ids=[1], tokens=[126081],
                 rollout_logp=[-float("inf")], reward=0.0, advantage=-1 / 3, version=0)
    c = Response(uid=1, group=1, domain="code", prompt_ids=[], tokens=[3, 4], rollout_logp=[-1.5, -2.5])
    return [Segment(a, 1, 3), Segment(b), Segment(c, 1)]


def test_carried_segments_round_trip_exactly(tmp_path):
    path = tmp_path / carried_segments.FILE
    for segs in (segments(), []):
        path.write_bytes(carried_segments.encode(segs))
        back = carried_segments.decode(path)
        assert back == segs  # dataclass equality: every field, floats bit for bit
        assert [type(x) for s in back for x in s.response.rollout_logp] == [float] * sum(
            len(s.response.tokens) for s in segs)
    assert not path.read_bytes().lstrip().startswith(b"{")  # binary, not JSON


def test_carried_segments_from_old_checkpoints_and_bad_files(tmp_path):
    legacy = {"pending": [s.to_json() for s in segments()]}  # trainer_state.json before the file
    assert carried_segments.read(tmp_path, legacy) == segments()
    (tmp_path / carried_segments.FILE).write_bytes(carried_segments.encode(segments()[:1]))
    assert carried_segments.read(tmp_path, legacy) == segments()[:1]  # the file wins
    (tmp_path / carried_segments.FILE).write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(CheckpointError, match=f"{tmp_path / carried_segments.FILE}: not a readable"):
        carried_segments.read(tmp_path, legacy)


# ------------------------------------------------------------------ Megatron, 2 processes


def torchrun(mode, root, env=None, **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--nnodes=1",
           f"--master-port={free_port()}", "-m", "tests.workers.checkpoint_async", mode, "--root", str(root)]
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    full_env.pop(parent_death.PARENT_ENV, None)
    return subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=parent_death.preexec(), **kw)


def result(proc, timeout=600):
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the workers die with torchrun
        raise
    lines = [x for x in out.splitlines() if x.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, out[-3000:] + err[-6000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.fixture(scope="module")
def roundtrip(tmp_path_factory):
    root = tmp_path_factory.mktemp("roundtrip") / "checkpoints"
    return root, result(torchrun("roundtrip", root))


@pytest.mark.slow  # one 2-process run, about 70 s on 2 cores
def test_dp_reshardable_round_trip_and_async_equal_sync(roundtrip):
    root, out = roundtrip
    assert out["layout"] == {"tp": 1, "ep": 2, "dp": 2, "world": 2, "optimizer_sharding": "dp_reshardable",
                             "files": []}
    assert out["sync_exact"] and out["sync_note"] == "sync"  # weights and every optimizer tensor
    # The async save was scheduled, the next step ran (and changed the weights) before it was
    # published, and it still holds the state it was asked to save: the sync checkpoint's.
    assert not out["published_before_finalize"] and out["moved_on"]
    assert out["async_exact"] and out["async_note"] == "async" and out["async_latest"] == "iter_0000002"
    assert checkpoint_dir.incomplete(root / "async" / "iter_0000002") is None


@pytest.mark.slow  # the same run
def test_layout_change_is_refused_then_converted(roundtrip):
    root, out = roundtrip
    path = root / "sync" / "iter_0000002"
    msg = out["other_layout_error"]
    assert msg.startswith(f"{path}: its optimizer state is dp_reshardable, saved at TP1/EP2/DP2 on 2 processes; "
                          "this run is TP2/EP2/DP1 on 2 processes"), msg
    assert f"torchrun --nproc-per-node 2 -m megatron_ring.train.reshard {path}" in msg
    assert out["model_only_other_layout"]  # select / model.init load weights at any layout
    # converted in place, loaded with its optimizer at TP2/EP2, saved there, loaded back at TP1/EP2:
    assert out["resharded"] == "fully_reshardable" and out["tp2_back_exact"]
    assert checkpoint_dir.latest(root / "sync") == path


@pytest.mark.slow  # two 2-process runs, about 60 s
def test_sigkill_during_async_save_keeps_the_previous_checkpoint(tmp_path):
    root = tmp_path / "run" / "checkpoints"
    proc = torchrun("train", root, env={"CKPT_TEST_PAUSE_STEP": "2"})
    marker = root.parent / "paused"
    deadline = time.time() + 300
    while not marker.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert marker.exists(), proc.communicate()[1][-5000:]
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun; the trainers and their writers die with it
    proc.communicate(timeout=60)
    assert (root / "latest").read_text().strip() == "iter_0000001"
    assert checkpoint_dir.incomplete(root / "iter_0000001") is None
    assert not (root / "iter_0000002").exists() and (root / "iter_0000002.tmp").is_dir()  # never sealed
    assert checkpoint_dir.latest(root) == root / "iter_0000001"

    out = result(torchrun("resume", root))
    assert out["resumed_from"] == "iter_0000001" and out["note"] == "one"
    assert out["exact"]  # weights and optimizer as they were after step 1
    assert out["latest_after"] == "iter_0000002"
    assert out["left_over"] == ["iter_0000001", "iter_0000002", "latest"]  # the killed save's .tmp is gone
