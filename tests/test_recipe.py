"""Recipes: inheritance, dotted overrides, the schema's errors naming the key path and the file
that set it, and the paper recipe's dry run."""

import pytest

from megatron_ring.cli import main
from megatron_ring.recipe import RecipeError, load_recipe
from tests.conftest import ROOT

TINY = ROOT / "recipes/tiny/distill.yaml"
LING = ROOT / "recipes/ling_lite/distill.yaml"


def test_inheritance_and_overrides():
    r = load_recipe(TINY, ["optimizer.lr=1e-4", "data.pack=false", "parallel.ep=1"])
    assert r.optimizer.weight_decay == 0.1 and r.optimizer.lr_schedule == "cosine"  # from the base
    assert r.model.preset == "ling-tiny" and r.data.seq_length == 256  # from tiny
    assert r.optimizer.lr == 1e-4 and r.data.pack is False and r.parallel.ep == 1  # command line
    ling = load_recipe(LING)
    assert (ling.data.seq_length, ling.train.global_batch, ling.optimizer.lr, ling.train.epochs) == (32768, 96, 3e-4, 3)
    assert ling.model.arch().rope_theta == 600000


@pytest.mark.parametrize("override, message", [
    ("optimizer.lrr=3", "command line: optimizer.lrr: unknown key (did you mean 'lr'?)"),
    ("optimizer.lr=abc", "command line: optimizer.lr: expected float, got str 'abc'"),
    ("optimizer.lr=0", "command line: optimizer.lr: must be > 0, got 0"),
    # The optimizer keys left `train` for the `optimizer` section: an old recipe is told so.
    ("train.lr=1e-4", "command line: train.lr: unknown key: it moved to optimizer.lr"),
    ("train.adam_beta2=0.9", "command line: train.adam_beta2: unknown key: it moved to optimizer.adam_beta2"),
    ("train.warmup_fracc=0", "train.warmup_fracc: unknown key (did you mean 'warmup_frac'? it moved to optimizer.warmup_frac)"),
    ("train.epochs=2.5", "train.epochs: expected int"),
    ("data.bad_rows=maybe", "data.bad_rows: must be one of ['skip', 'fail']"),
    ("select.entropy_low=0.6", "command line: select.entropy_low; "),
    ("select.entropy_low=0.6", "distill.yaml: select.entropy_high: entropy_low (0.6) must be below entropy_high (0.5)"),
    ("train.global_batch=-4", "command line: train.global_batch: must be > 0, got -4"),
    ("optimizer.warmup_frac=1", "command line: optimizer.warmup_frac: must be in [0, 1), got 1.0"),
    ("cluster.time_limit=2days", "command line: cluster.time_limit: '2days' is not a SLURM time"),
    ("cluster.sglang=dedicated", "command line: cluster.sglang; default: cluster.sglang_nodes: sglang_nodes 0"),
    ("model.preset=ling-huge", "command line: model.preset: unknown model preset 'ling-huge'"),
    ("lr=3", "lr: unknown key"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(RecipeError) as e:
        load_recipe(TINY, [override])
    assert message in str(e.value)


def test_errors_name_the_file(tmp_path):
    (tmp_path / "base.yaml").write_text("stage: distill\ntrain:\n  epochs: three\n")
    (tmp_path / "child.yaml").write_text("defaults: base.yaml\noptimizer:\n  lr: 0.1\n")
    with pytest.raises(RecipeError, match=r"base.yaml: train.epochs: expected int, got str 'three'"):
        load_recipe(tmp_path / "child.yaml")
    # A section's own checks blame the file that set the key, not the one that opened the section.
    (tmp_path / "base.yaml").write_text("stage: distill\ntrain:\n  epochs: 3\n")
    (tmp_path / "child.yaml").write_text("defaults: base.yaml\ntrain:\n  global_batch: 0\n")
    with pytest.raises(RecipeError, match=r"child.yaml: train.global_batch: must be > 0, got 0"):
        load_recipe(tmp_path / "child.yaml")
    with pytest.raises(RecipeError, match=r"^command line: train.epochs: must be > 0, got -1$"):
        load_recipe(tmp_path / "base.yaml", ["train.epochs=-1"])
    (tmp_path / "broken.yaml").write_text("stage: distill\noptimizer:\n  lr: [1,\n")
    with pytest.raises(RecipeError, match=r"broken.yaml:\d+: invalid YAML"):
        load_recipe(tmp_path / "broken.yaml")
    (tmp_path / "a.yaml").write_text("defaults: b.yaml\n")
    (tmp_path / "b.yaml").write_text("defaults: a.yaml\n")
    with pytest.raises(RecipeError, match="cycle"):
        load_recipe(tmp_path / "a.yaml")


def test_dry_run_prints_recipe_and_layout(capsys):
    assert main(["distill", str(LING), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "seq_length: 32768" in out and "rope_theta: 600000" in out
    assert "TP 2 (sequence parallel on) x DP 16; EP 8" in out and "6 accumulation steps" in out
    assert main(["distill", str(LING), "--dry-run", "train.global_batch=100"]) == 2
    assert "train.global_batch: 100 rows do not split" in capsys.readouterr().err
    assert main(["distill", str(LING), "--dry-run", "parallel.ep=7"]) == 2
    assert "num_experts=64 is not divisible by ep=7" in capsys.readouterr().err


RL1 = ROOT / "recipes/ling_lite/rl_stage1_math.yaml"
RL2 = ROOT / "recipes/ling_lite/rl_stage2_code_science.yaml"


def test_rl_recipes_carry_the_paper_values():
    r = load_recipe(RL1)
    assert (r.rollout.prompts_per_step, r.rollout.samples_per_prompt, r.rl.token_budget) == (512, 16, 409600)
    assert (r.optimizer.lr, r.rl.eps_low, r.rl.eps_high, r.rl.kl_beta, r.rl.entropy_coef) == (3e-6, 0.2, 0.2, 1e-3, 5e-4)
    assert (r.model.aux_loss_coeff, r.model.z_loss_coeff, r.rollout.temperature) == (1e-5, 1e-7, 1.0)
    assert r.rollout.max_new_tokens == 24576 and r.data.domains == ["math"]
    assert (r.optimizer.lr_schedule, r.optimizer.weight_decay, r.optimizer.adam_beta2) == ("constant", 0.01, 0.999)
    r2 = load_recipe(RL2)
    assert r2.rollout.max_new_tokens == 32768 and r2.data.domains == ["code", "science"]
    assert r2.rl.token_budget == 409600  # inherited through stage 1 from the base
    for name in ("ling_lite", "tiny"):
        p = load_recipe(ROOT / f"recipes/{name}/pipeline.yaml")
        assert [s.kind for s in p.stages] == ["distill", "select", "rl", "rl"]


@pytest.mark.parametrize("override, message", [
    ("rl.loss_mode=ppo", "rl.loss_mode: must be one of ['c3po', 'grpo', 'token_mean']"),
    ("rl.token_budget=0", "command line: rl.token_budget: must be > 0"),
    ("rl.leftover=keep", "rl.leftover: must be one of ['carry', 'drop']"),
    ("rollout.samples_per_prompt=0", "command line: rollout.samples_per_prompt: must be > 0"),
    ("rl.tis_cap=-1", "command line: rl.tis_cap: must be >= 0"),
    ("model.init=null", "command line: model.init; "),
    ("model.init=null", "base/rl.yaml: rl.kl_beta: the KL reference is the model RL starts from"),
    ("rollout.engine=embedded", "command line: rollout.url, rollout.engine: rollout.url is only for rollout.engine=sglang"),
    ("rollout.replay_dir=runs/x/rollouts", "set rollout.replay_dir exactly when rollout.engine=replay"),
])
def test_bad_rl_values_name_the_key(override, message):
    with pytest.raises(RecipeError) as e:
        load_recipe(RL1, [override, "rollout.url=http://127.0.0.1:1"])
    assert message in str(e.value)


def test_rl_dry_run_and_stage_mismatch(capsys):
    assert main(["rl", str(RL1), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "token_budget: 409600" in out and "TP 2 (sequence parallel on) x DP 128; EP 8" in out
    assert "Phi 409600 per rank" in out
    assert main(["rl", str(TINY), "--dry-run"]) == 2
    assert "'distill' recipe given to `megatron-ring rl`" in capsys.readouterr().err
    assert main(["run", str(ROOT / "recipes/tiny/pipeline.yaml"), "nostage.optimizer.lr=1"]) == 2
    assert "pipeline overrides are STAGE.key=value" in capsys.readouterr().err
