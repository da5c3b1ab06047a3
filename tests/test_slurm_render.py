"""`megatron-ring slurm` (`make recipes`): every recipe renders into a batch script that bash
accepts, carrying its cluster section; bad cluster settings are refused naming the key."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from megatron_ring.cli import main
from megatron_ring.recipe import RecipeError, load_recipe

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted(str(p.relative_to(ROOT)) for d in ("tiny", "ling_lite") for p in (ROOT / "recipes" / d).glob("*.yaml"))


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    out = tmp_path_factory.mktemp("slurm")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(ROOT)  # the scripts run where they were rendered (--chdir)
        assert main(["slurm", *RECIPES, "--out", str(out)]) == 0
    return out


def test_every_recipe_renders_and_passes_bash_n(rendered):
    scripts = sorted(rendered.rglob("*.sbatch")) + sorted(rendered.rglob("submit.sh"))
    # 3 stage recipes each + a pipeline of 4 jobs and its submit.sh, for tiny and ling_lite.
    assert len(scripts) == 2 * (3 + 4 + 1)
    for s in scripts:
        r = subprocess.run(["bash", "-n", str(s)], capture_output=True, text=True)
        assert r.returncode == 0, f"{s}: {r.stderr}"


def test_ling_lite_distill_job(rendered):
    text = (rendered / "ling_lite" / "distill.sbatch").read_text()
    for line in ("#SBATCH --nodes=4", "#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu",
                 "#SBATCH --time=2-00:00:00", "#SBATCH --requeue", "#SBATCH --signal=B:USR1@600",
                 "#SBATCH --exclusive", "#SBATCH --output=runs/ling-lite-distill/logs/%x-%j.out"):
        assert line + "\n" in text
    assert '"--container-image=/data/images/megatron-ring.sqsh"' in text
    assert f'"--container-mounts=/data:/data,{ROOT}:{ROOT}"' in text
    assert ("python -m torch.distributed.run --nnodes=4 --nproc-per-node=8 --node-rank=$SLURM_PROCID "
            "--master-addr=$MASTER_ADDR --master-port=$MASTER_PORT -m megatron_ring.cli distill "
            "recipes/ling_lite/distill.yaml --run-dir runs/ling-lite-distill'") in text
    assert 'scontrol requeue "$SLURM_JOB_ID"' in text and "sglang" not in text


def test_pipeline_is_a_chain_of_jobs(rendered):
    folder = rendered / "ling_lite" / "pipeline"
    names = ["01-distill", "02-select", "03-rl_stage1_math", "04-rl_stage2_code_science"]
    assert sorted(p.stem for p in folder.glob("*.sbatch")) == names
    chain = (folder / "submit.sh").read_text()
    assert chain.count("sbatch --parsable") == 4 and chain.count("--dependency=afterok:$job") == 3
    select = (folder / "02-select.sbatch").read_text()
    assert "#SBATCH --nodes=4\n" in select and "megatron_ring.cli select runs/ling-lite-pipeline/distill'" in select
    rl1 = (folder / "03-rl_stage1_math.sbatch").read_text()
    # The engines are colocated on the 32 training nodes: the trainer starts them, the job adds nothing.
    assert "#SBATCH --nodes=32\n" in rl1 and "sglang" not in rl1 and "rollout.url" not in rl1
    assert "model.init=runs/ling-lite-pipeline/distill/selection.json" in rl1
    rl2 = (folder / "04-rl_stage2_code_science.sbatch").read_text()
    assert "model.init=runs/ling-lite-pipeline/rl_stage1_math/checkpoints" in rl2


def test_dedicated_fleet_job(tmp_path, monkeypatch):
    """cluster.sglang=dedicated: the job's last nodes run the engine fleet (engines_per_node
    engines each, one --base-gpu-id and port apiece) and sglang-router in front of it; the
    trainer is given the router's URL."""
    from megatron_ring.launch import render

    monkeypatch.chdir(ROOT)
    sets = ["cluster.sglang=dedicated", "cluster.sglang_nodes=2", "rollout.engines=7"]
    script = render.write(str(LING_RL), sets, None, str(tmp_path))[0]
    text = script.read_text()
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "#SBATCH --nodes=34\n" in text  # 32 training nodes + 2 SGLang nodes
    assert "--nodes=2" in text and '--nodelist="$(IFS=,; echo "${nodes[*]:32:2}")"' in text
    engine = ("python -m sglang.launch_server --model-path /data/models/Ling-lite-1.5 --dtype bfloat16 "
              "--mem-fraction-static 0.85 --enable-return-routed-experts --tp 2 --context-length 32768 --base-gpu-id {g} "
                  "--port {p} --host 0.0.0.0 >> ")
    for j in range(4):
        assert text.count(engine.format(g=2 * j, p=30000 + j)) == 1
    # 7 engines: the second node runs slots 0-2 only.
    assert 'if [ "$SLURM_PROCID" -lt 1 ]; then ' + engine.format(g=6, p=30003) in text
    urls = [f"http://${{nodes[{n}]}}:{30000 + j}" for n, k in ((32, 4), (33, 3)) for j in range(k)]
    assert f'export SGLANG_WORKER_URLS="{" ".join(urls)}"' in text
    assert "export SGLANG_ROUTER=${nodes[32]}" in text
    router = text[text.index('if [ "$SLURM_PROCID" = 0 ]; then python -m sglang_router.launch_router'):]
    router = router[:router.index("\n")]
    for part in ("--host 0.0.0.0 --port 29000 --worker-urls $SGLANG_WORKER_URLS --policy round_robin",
                 "--request-timeout-secs 3600", "--worker-startup-timeout-secs 1800", "--prometheus-port 29001",
                 "--max-payload-size", "-sglang-$SLURMD_NODENAME-router.out 2>&1 & fi"):
        assert part in router, part
    assert '"rollout.url=http://$SGLANG_ROUTER:29000"\' &' in text
    assert "--nnodes 2" not in text and "--dp-size" not in text
    assert 'kill "$sglang_pid"' in text

    # Each fleet node's task, run with a stand-in `python` that records its arguments: node 0
    # starts 4 engines and the router, node 1 its 3 engines, each with a log of its own.
    task = text[text.index("    bash -c '# The engines"):]
    task = shlex.split(task[:task.index(" &\nsglang_pid")])[2]
    (tmp_path / "bin").mkdir()
    stub = tmp_path / "bin" / "python"
    stub.write_text(f'#!/bin/bash\necho "$@" >> {tmp_path}/calls-$SLURM_PROCID\n')
    stub.chmod(0o755)
    (tmp_path / "runs/ling-lite-rl-stage1-math/logs").mkdir(parents=True)
    for rank in (0, 1):
        env = {**os.environ, "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}", "SLURM_PROCID": str(rank),
               "SLURMD_NODENAME": f"gpu{rank}", "SLURM_JOB_ID": "7", "SGLANG_WORKER_URLS": "http://a:30000 http://b:30000"}
        r = subprocess.run(["bash", "-c", task], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        calls = (tmp_path / f"calls-{rank}").read_text().splitlines()
        engines = sorted(c for c in calls if "sglang.launch_server" in c)
        assert engines == sorted(engine.format(g=2 * j, p=30000 + j).split("python ", 1)[1][:-4] for j in range(4 - rank))
        routers = [c for c in calls if "sglang_router.launch_router" in c]
        assert len(routers) == (rank == 0) and all("--worker-urls http://a:30000 http://b:30000 --policy" in c for c in routers)
    logs = sorted(p.name for p in (tmp_path / "runs/ling-lite-rl-stage1-math/logs").iterdir())
    assert logs == sorted([*(f"ling-lite-rl-stage1-math-7-sglang-gpu0-{30000 + j}.out" for j in range(4)),
                           "ling-lite-rl-stage1-math-7-sglang-gpu0-router.out",
                           *(f"ling-lite-rl-stage1-math-7-sglang-gpu1-{30000 + j}.out" for j in range(3))])


def test_tiny_jobs_ask_for_no_gpus_and_no_container(rendered):
    text = (rendered / "tiny" / "distill.sbatch").read_text()
    assert "--gpus-per-node" not in text and "--container" not in text and "#SBATCH --partition" not in text
    assert "--nnodes=1 --nproc-per-node=2" in text


LING_RL = ROOT / "recipes/ling_lite/rl_stage1_math.yaml"


@pytest.mark.parametrize("recipe, override, message", [
    (LING_RL, "cluster.sglang=dedicated", "rl_stage1_math.yaml: cluster.sglang_nodes: sglang_nodes 0 with sglang dedicated"),
    (LING_RL, "cluster.sglang_nodes=1", "recipes/ling_lite/rl_stage1_math.yaml: cluster.sglang; command line: "
                                        "cluster.sglang_nodes: sglang_nodes 1 with sglang colocated"),
    (LING_RL, "cluster.time_limit=tomorrow", "command line: cluster.time_limit: 'tomorrow' is not a SLURM time"),
    (LING_RL, "cluster.container_mounts=[/data]", "container_mounts: ['/data'] are not SRC:DST"),
    (ROOT / "recipes/ling_lite/distill.yaml", "cluster.sglang=dedicated", "a distill recipe has none"),
])
def test_bad_cluster_settings_name_the_key(recipe, override, message):
    extra = ["cluster.sglang_nodes=1"] if "distill" in str(recipe) else []
    with pytest.raises(RecipeError) as e:
        load_recipe(recipe, [override, *extra])
    assert message in str(e.value)


def test_dedicated_nodes_need_sglang():
    with pytest.raises(RecipeError, match="dedicated SGLang nodes need rollout.engine=sglang"):
        load_recipe(LING_RL, ["cluster.sglang=dedicated", "cluster.sglang_nodes=1", "rollout.engine=embedded"])


def test_dedicated_fleet_and_a_url_are_refused_at_render(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    dedicated = ["cluster.sglang=dedicated", "cluster.sglang_nodes=1"]
    assert main(["slurm", str(LING_RL), *dedicated, "rollout.url=http://x:1", "--out", str(tmp_path)]) == 2
    assert "rollout.url: http://x:1 with cluster.sglang=dedicated" in capsys.readouterr().err
    # A fleet that does not fit is said at render, naming the key.
    assert main(["slurm", str(LING_RL), *dedicated, "rollout.engines=5", "--out", str(tmp_path)]) == 2
    assert "rollout.engines: 5 engines of --tp 2 need 10 GPUs; the 1 dedicated node(s)" in capsys.readouterr().err


def test_without_requeue_there_is_no_trap(tmp_path, monkeypatch):
    from megatron_ring.launch import render

    monkeypatch.chdir(ROOT)
    text = render.write("recipes/tiny/distill.yaml", ["cluster.requeue=false"], str(tmp_path / "run"),
                        str(tmp_path))[0].read_text()
    assert "--requeue" not in text and "--signal" not in text and "trap '" not in text
    assert "scontrol requeue" not in text and f"--run-dir {tmp_path / 'run'}'" in text
