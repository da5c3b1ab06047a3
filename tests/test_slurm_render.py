"""`megatron-ring slurm` (`make recipes`): every recipe renders into a batch script that bash
accepts, carrying its cluster section; bad cluster settings are refused naming the key."""

from __future__ import annotations

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


def test_pipeline_is_a_chain_of_jobs_with_a_dedicated_sglang_node(rendered):
    folder = rendered / "ling_lite" / "pipeline"
    names = ["01-distill", "02-select", "03-rl_stage1_math", "04-rl_stage2_code_science"]
    assert sorted(p.stem for p in folder.glob("*.sbatch")) == names
    chain = (folder / "submit.sh").read_text()
    assert chain.count("sbatch --parsable") == 4 and chain.count("--dependency=afterok:$job") == 3
    select = (folder / "02-select.sbatch").read_text()
    assert "#SBATCH --nodes=4\n" in select and "megatron_ring.cli select runs/ling-lite-pipeline/distill'" in select
    rl1 = (folder / "03-rl_stage1_math.sbatch").read_text()
    assert "#SBATCH --nodes=33\n" in rl1  # 32 training nodes + 1 SGLang node
    assert "model.init=runs/ling-lite-pipeline/distill/selection.json" in rl1
    assert "sglang.launch_server --model-path /data/models/Ling-lite-1.5" in rl1 and "--dp-size 4" in rl1
    assert '"rollout.url=http://$SGLANG_HEAD:30000"' in rl1 and 'SGLANG_HEAD=${nodes[32]}' in rl1
    rl2 = (folder / "04-rl_stage2_code_science.sbatch").read_text()
    assert "model.init=runs/ling-lite-pipeline/rl_stage1_math/checkpoints" in rl2


def test_tiny_jobs_ask_for_no_gpus_and_no_container(rendered):
    text = (rendered / "tiny" / "distill.sbatch").read_text()
    assert "--gpus-per-node" not in text and "--container" not in text and "#SBATCH --partition" not in text
    assert "--nnodes=1 --nproc-per-node=2" in text


LING_RL = ROOT / "recipes/ling_lite/rl_stage1_math.yaml"


@pytest.mark.parametrize("recipe, override, message", [
    (LING_RL, "cluster.sglang_nodes=0", "command line: cluster.sglang_nodes: sglang_nodes 0 with sglang dedicated"),
    (LING_RL, "cluster.time_limit=tomorrow", "command line: cluster.time_limit: 'tomorrow' is not a SLURM time"),
    (LING_RL, "cluster.container_mounts=[/data]", "container_mounts: ['/data'] are not SRC:DST"),
    (LING_RL, "rollout.engine=embedded", "dedicated SGLang nodes need rollout.engine=sglang"),
    (ROOT / "recipes/ling_lite/distill.yaml", "cluster.sglang=dedicated", "a distill recipe has none"),
])
def test_bad_cluster_settings_name_the_key(recipe, override, message):
    extra = ["cluster.sglang_nodes=1"] if "distill" in str(recipe) else []
    with pytest.raises(RecipeError) as e:
        load_recipe(recipe, [override, *extra])
    assert message in str(e.value)


def test_dedicated_server_and_a_url_are_refused_at_render(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["slurm", str(LING_RL), "rollout.url=http://x:1", "--out", str(tmp_path)]) == 2
    assert "rollout.url: http://x:1 with cluster.sglang=dedicated" in capsys.readouterr().err


def test_without_requeue_there_is_no_trap(tmp_path, monkeypatch):
    from megatron_ring.launch import render

    monkeypatch.chdir(ROOT)
    text = render.write("recipes/tiny/distill.yaml", ["cluster.requeue=false"], str(tmp_path / "run"),
                        str(tmp_path))[0].read_text()
    assert "--requeue" not in text and "--signal" not in text and "trap '" not in text
    assert "scontrol requeue" not in text and f"--run-dir {tmp_path / 'run'}'" in text
