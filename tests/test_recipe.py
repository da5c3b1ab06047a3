"""Recipes: inheritance, dotted overrides, the schema's errors naming the key path and the file
that set it, and the paper recipe's dry run."""

import pytest

from megatron_ring.cli import main
from megatron_ring.recipe import RecipeError, load_recipe
from tests.conftest import ROOT

TINY = ROOT / "recipes/tiny/distill.yaml"
LING = ROOT / "recipes/ling_lite/distill.yaml"


def test_inheritance_and_overrides():
    r = load_recipe(TINY, ["train.lr=1e-4", "data.pack=false", "parallel.ep=1"])
    assert r.train.weight_decay == 0.1 and r.train.lr_schedule == "cosine"  # from the base
    assert r.model.preset == "ling-tiny" and r.data.seq_length == 256  # from tiny
    assert r.train.lr == 1e-4 and r.data.pack is False and r.parallel.ep == 1  # command line
    ling = load_recipe(LING)
    assert (ling.data.seq_length, ling.train.global_batch, ling.train.lr, ling.train.epochs) == (32768, 256, 3e-4, 3)
    assert ling.model.arch().rope_theta == 600000


@pytest.mark.parametrize("override, message", [
    ("train.lrr=3", "command line: train.lrr: unknown key (did you mean 'lr'?)"),
    ("train.lr=abc", "command line: train.lr: expected float, got str 'abc'"),
    ("train.epochs=2.5", "train.epochs: expected int"),
    ("data.bad_rows=maybe", "data.bad_rows: must be one of ['skip', 'fail']"),
    ("select.entropy_low=0.6", "entropy_low (0.6) must be below entropy_high (0.5)"),
    ("model.preset=ling-huge", "unknown model preset 'ling-huge'"),
    ("lr=3", "lr: unknown key"),
])
def test_bad_values_name_the_key(override, message):
    with pytest.raises(RecipeError) as e:
        load_recipe(TINY, [override])
    assert message in str(e.value)


def test_errors_name_the_file(tmp_path):
    (tmp_path / "base.yaml").write_text("stage: distill\ntrain:\n  epochs: three\n")
    (tmp_path / "child.yaml").write_text("defaults: base.yaml\ntrain:\n  lr: 0.1\n")
    with pytest.raises(RecipeError, match=r"base.yaml: train.epochs: expected int, got str 'three'"):
        load_recipe(tmp_path / "child.yaml")
    (tmp_path / "broken.yaml").write_text("stage: distill\ntrain:\n  lr: [1,\n")
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
    assert "TP 2 (sequence parallel on) x DP 16; EP 8" in out and "16 accumulation steps" in out
    assert main(["distill", str(LING), "--dry-run", "train.global_batch=100"]) == 2
    assert "train.global_batch: 100 rows do not split" in capsys.readouterr().err
    assert main(["distill", str(LING), "--dry-run", "parallel.ep=7"]) == 2
    assert "num_experts=64 is not divisible by ep=7" in capsys.readouterr().err
