"""No orphans and no second trainer: a tiny distillation under `megatron-ring distill` (torchrun,
its workers, Megatron's checkpoint writer processes) dies with its launcher, whether the
launcher or its process group is killed with SIGKILL, or a worker is killed in the middle of a
checkpoint save; a second launcher on the same run directory stops at once, naming the first
one's pid, and leaves its metrics alone. Processes are found in /proc."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_ring.data.demo_data import write_demo_data
from tests.conftest import ROOT

pytestmark = [pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux's"),
              pytest.mark.slow]  # end to end: `make test` only


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("lifetime_data")
    write_demo_data(out, n_sft=64, n_rl_math=4, n_rl_code_science=4, n_heldout=4, n_sft_heldout=4, n_eval=4)
    return out


def distill_argv(data, run_dir, *extra):
    return [sys.executable, "-m", "megatron_ring.cli", "distill", "recipes/tiny/distill.yaml", "--run-dir", str(run_dir),
            "data.demo=null", f"data.train=[{data}/sft_train.jsonl]", f"data.tokenizer={data}/tokenizer",
            f"select.prompts={data}/rl_heldout.jsonl", "data.seq_length=128", "train.epochs=50",
            "train.global_batch=4", "train.micro_batch=2", "logging.progress=false", "logging.wandb=disabled", *extra]


def start(data, run_dir, *extra, **kw):
    return subprocess.Popen(distill_argv(data, run_dir, *extra), cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, **kw)


def children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            pass
    return out


def descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        for c in children(todo.pop()):
            if c not in found:
                found.add(c)
                todo.append(c)
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
    except OSError:
        return ""


def workers_of(launcher: int) -> list[int]:
    """torchrun's workers. A process a worker forks (Megatron's checkpoint writer, briefly) carries
    the worker's command line too: only those whose parent is no worker count."""
    found = [p for p in descendants(launcher) if "megatron_ring.cli" in cmdline(p) and "-u" in cmdline(p).split()]
    return [p for p in found if not any(p in children(q) for q in found)]


def wait_for(condition, timeout: float, what: str, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the launcher ended ({proc.returncode}) while waiting for {what}: {proc.stderr.read()[-3000:]}")
        time.sleep(0.02)
    pytest.fail(f"timed out waiting for {what}")


def gone_within(pids: set[int], seconds: float) -> set[int]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.05)
    return {p for p in pids if alive(p)}


def metrics(run_dir):
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def first_step_logged(run_dir):
    return lambda: len(metrics(run_dir)) >= 1


def saved_once(run_dir):
    return lambda: (run_dir / "checkpoints" / "latest").is_file()  # the step-0 save: Megatron's helpers exist


@pytest.fixture(scope="module")
def runs(tmp_path_factory, data):
    """Three tiny distillations started together (their start-up, mostly imports, overlaps): the
    recipe's TP1/EP2 (two workers) and one at one process to kill from outside, and one at one
    process with a checkpoint every step, for the second launcher and the worker killed mid-save."""
    base = tmp_path_factory.mktemp("lifetime")
    one = ["cluster.gpus_per_node=1", "parallel.ep=1"]
    specs = {"launcher": [], "process group": one, "mid-save": [*one, "train.save_every_steps=1"]}
    started = {name: (start(data, base / name.replace(" ", "_"), *extra, start_new_session=True),
                      base / name.replace(" ", "_")) for name, extra in specs.items()}
    yield started
    for proc, _ in started.values():
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.mark.parametrize("target", ["launcher", "process group"])
def test_killed_launcher_takes_its_job_along(runs, target):
    """SIGKILL of the launcher (or of its process group, which holds torchrun's agent but not the
    workers: torchrun starts each in its own session) ends torchrun, the workers and the helpers
    Megatron's checkpoint writer spawned within seconds, and nothing trains on."""
    proc, run_dir = runs[target]
    wait_for(saved_once(run_dir), 240, "the first checkpoint", proc)
    job = descendants(proc.pid)
    assert len(workers_of(proc.pid)) == (2 if target == "launcher" else 1), [cmdline(p) for p in job]
    assert any("torchrun_agent" in cmdline(p) for p in job), [cmdline(p) for p in job]
    assert any("spawn_main" in cmdline(p) for p in job)  # the Manager Megatron's writer spawned
    if target == "launcher":
        os.kill(proc.pid, signal.SIGKILL)
    else:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    left = gone_within(job, 5.0)
    assert not left, [cmdline(p) for p in left]
    steps = [r["step"] for r in metrics(run_dir)]
    time.sleep(1.0)
    assert [r["step"] for r in metrics(run_dir)] == steps


def test_second_trainer_stops_and_a_worker_killed_mid_save_leaves_no_writer(runs, data):
    proc, run_dir = runs["mid-save"]
    wait_for(first_step_logged(run_dir), 240, "the first step", proc)

    # A second launcher on the same run directory stops before torchrun, naming the holder.
    t0 = time.monotonic()
    second = subprocess.run(distill_argv(data, run_dir), cwd=ROOT, capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t0
    assert second.returncode == 2, second.stderr[-3000:]
    assert f"{run_dir.resolve()} is in use by another trainer: pid {proc.pid} " in second.stderr, second.stderr
    assert len(list((run_dir / "logs").iterdir())) == 1  # it started no torchrun
    assert took < 30, took

    # Kill a worker while its forked checkpoint writer is writing (a checkpoint every step).
    def writing():
        for w in workers_of(proc.pid):
            forks = [c for c in children(w) if cmdline(c) == cmdline(w)]
            if forks:
                return w, forks
        return None

    worker, forks = wait_for(writing, 120, "a checkpoint save in progress", proc)
    helpers, job = descendants(worker), descendants(proc.pid)
    assert any("spawn_main" in cmdline(p) for p in helpers)  # the Manager Megatron's writer spawned
    os.kill(worker, signal.SIGKILL)
    left = gone_within(helpers | set(forks), 5.0)
    assert not left, [(p, cmdline(p)) for p in left]
    assert proc.wait(timeout=60) == 2
    assert not gone_within(job, 5.0)
    err = proc.stderr.read()
    assert "was killed by SIGKILL" in err.splitlines()[-1] and f"worker logs in {run_dir}/logs/distill-" in err, err[-3000:]
    assert "ChildFailedError" not in err and "Traceback" not in err, err[-3000:]

    # The first trainer's metrics: each step once, in order (the second trainer wrote nothing).
    steps = [r["step"] for r in metrics(run_dir)]
    assert steps == list(range(1, len(steps) + 1)), steps


def test_rank0_takes_the_lock_when_torchrun_runs_directly(tmp_path, data):
    """A SLURM batch script runs torchrun itself, with no launcher to hold the lock: rank 0 takes
    it, so a second job on the directory stops there (here the test holds the lock)."""
    from megatron_ring.platform import run_lock
    from megatron_ring.platform.distributed import torchrun

    run_dir = tmp_path / "run"
    run_lock.acquire(run_dir)
    try:
        r = torchrun(1, distill_argv(data, run_dir, "cluster.gpus_per_node=1", "parallel.ep=1")[1:], cwd=ROOT,
                     capture_output=True, text=True, timeout=120)
    finally:
        run_lock.release(run_dir)
    assert r.returncode != 0
    assert f"{run_dir.resolve()} is in use by another trainer: pid {os.getpid()} " in r.stderr, r.stderr[-3000:]
    assert not (run_dir / "recipe.yaml").exists()  # stopped before the stage wrote anything
